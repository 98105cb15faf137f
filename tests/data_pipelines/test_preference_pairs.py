"""Preference pairs ({"prompt", "chosen", "rejected"}): rendered as two sequences whose last answer alone is the
target, checked and skipped by reason, and batched as [chosen rows, rejected rows] with each pair's images once."""

import json

import pytest

from data_pipelines.batch.loader import MixtureLoader, SourceSpec
from data_pipelines.read.shards import RawSample, ShardWriter
from data_pipelines.render.samples import BadSample, prepare_sample
from data_pipelines.render.tokenize import IGNORE_INDEX
from data_pipelines.synthetic.synth import synthesize
from data_pipelines.synthetic.testing import png_bytes
from data_pipelines.tools.verify import verify_shards
from tests.data_pipelines.test_data_commands import run

TOKENS_PER_IMAGE = 4
PROMPT = [{"role": "user", "content": "<image>\nこの図形は何色ですか？"}]


def pair(meta: dict, images: int = 1) -> RawSample:
    return RawSample(key="k", shard="s.tar", meta=meta, images=[png_bytes()] * images)


def test_a_pair_renders_the_prompt_twice_with_only_each_last_answer_as_target():
    prompt = [{"role": "user", "content": "<image>\n何色？"}, {"role": "assistant", "content": "赤色です。"},
              {"role": "user", "content": "形は？"}]
    sample = prepare_sample(pair({"prompt": prompt, "chosen": "円です。", "rejected": "四角形です。"}),
                            task="preference", template="plain", eos_token="</s>", decode_images=False)
    assert [s.text for s in sample.segments if s.is_target] == ["円です。</s>"]
    assert [s.text for s in sample.rejected if s.is_target] == ["四角形です。</s>"]
    assert "".join(s.text for s in sample.segments) == "<image>\n何色？赤色です。</s>形は？円です。</s>"
    assert sample.num_images == 1


@pytest.mark.parametrize("meta, images, reason", [
    ({"prompt": PROMPT, "chosen": "赤色です。", "rejected": " 赤色です。 "}, 1, "identical_answers"),
    ({"prompt": PROMPT, "chosen": "", "rejected": "赤色です。"}, 1, "empty_answer"),
    ({"prompt": PROMPT, "chosen": "赤色です。", "rejected": 3}, 1, "malformed_conversation"),
    ({"prompt": [*PROMPT, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, 1,
     "malformed_conversation"),
    ({"prompt": PROMPT, "chosen": "赤色です。", "rejected": "青色です。"}, 2, "image_count_mismatch"),
    ({"prompt": PROMPT, "chosen": "<image>赤色です。", "rejected": "青色です。"}, 1, "image_count_mismatch"),
])
def test_a_bad_pair_is_skipped_with_its_reason(meta, images, reason):
    with pytest.raises(BadSample) as bad:
        prepare_sample(pair(meta, images), task="preference", template="plain", eos_token="</s>",
                       decode_images=False)
    assert bad.value.reason == reason


def test_pairs_batch_as_chosen_rows_then_rejected_rows_with_each_pairs_image_once(tmp_path, tiny_tokenizer):
    synthesize(tmp_path, samples=20, preferences=40, samples_per_shard=20, image_size=16)
    loader = MixtureLoader([SourceSpec([f"{tmp_path}/prefs-*.tar"], 1.0, "preference", "prefs")],
                           tokenizer=tiny_tokenizer, image_size=16, template="asagi", tokens_per_image=TOKENS_PER_IMAGE,
                           max_length=96, micro_batch_size=3, seed=0, num_workers=0, packing=False)
    batch = next(loader)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 6 and batch["num_pairs"] == 3 and batch["num_samples"] == 3
    assert batch["pixel_values"].shape[0] == 3  # one image per pair, not per row
    assert int((ids == 4).sum()) == 2 * 3 * TOKENS_PER_IMAGE  # both rows of a pair hold the image's tokens
    for row in range(3):
        chosen, rejected = ids[row][mask[row].bool()], ids[row + 3][mask[row + 3].bool()]
        start = int((labels[row] != IGNORE_INDEX).nonzero()[0])  # where the chosen answer starts
        assert chosen[:start].tolist() == rejected[:start].tolist()  # the same prompt
        answer = tiny_tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX])
        rejected_answer = tiny_tokenizer.decode(labels[row + 3][labels[row + 3] != IGNORE_INDEX])
        assert answer.replace(" ", "").startswith("この図形は") and answer.replace(" ", "").endswith(
            rejected_answer.replace(" ", ""))


def test_verify_and_preview_read_pairs(tmp_path, capsys):
    with ShardWriter(tmp_path, "prefs", 10) as writer:
        writer.write("ok", {"prompt": PROMPT, "chosen": "この図形は赤色です。", "rejected": "赤色です。"},
                     [("png", png_bytes())])
        writer.write("same", {"prompt": PROMPT, "chosen": "赤色です。", "rejected": "赤色です。"}, [("png", png_bytes())])
    report = verify_shards(writer.paths)
    assert report["samples_ok"] == 1 and [b["reason"] for b in report["bad"]] == ["identical_answers"]
    assert run(["data", "preview", *writer.paths, "--template", "plain", "--json"]) == 0
    ok, bad = json.loads(capsys.readouterr().out)["samples"]
    assert ok["targets"] == ["この図形は赤色です。</s>"] and ok["rejected_targets"] == ["赤色です。</s>"]
    assert ok["rejected_text"] == "<image>\nこの図形は何色ですか？赤色です。</s>" and "identical_answers" in bad["error"]
