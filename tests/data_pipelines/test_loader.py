import itertools
import logging
from collections import Counter

import pytest
import torch

from data_pipelines.loader import MixtureLoader, SourceSpec
from data_pipelines.shards import ShardWriter, iter_raw_samples
from data_pipelines.tokenize import IGNORE_INDEX

TOKENS_PER_IMAGE = 4


def make_loader(sources, tokenizer, transform, **overrides):
    options = dict(tokenizer=tokenizer, image_transform=transform, template="asagi", tokens_per_image=TOKENS_PER_IMAGE,
                   max_length=128, micro_batch_size=4, seed=0)
    return MixtureLoader(sources, **{**options, **overrides})


def synth_sources(synth_dir, caption_weight=0.5, vqa_weight=0.5):
    return [SourceSpec([f"{synth_dir}/captions-{{000000..000002}}.tar"], caption_weight, "caption", "captions"),
            SourceSpec([f"{synth_dir}/vqa-*.tar"], vqa_weight, "vqa", "vqa")]


def test_same_seed_same_batches_and_images_match_placeholders(synth_dir, tiny_tokenizer, image_transform):
    runs = [list(itertools.islice(make_loader(synth_sources(synth_dir), tiny_tokenizer, image_transform, seed=seed), 6))
            for seed in (0, 0, 1)]
    for a, b in zip(runs[0], runs[1]):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert [b["keys"] for b in runs[0]] != [b["keys"] for b in runs[2]]
    for batch in runs[0]:
        image_tokens = int((batch["input_ids"] == tiny_tokenizer.convert_tokens_to_ids("<image>")).sum())
        assert batch["pixel_values"].shape[0] * TOKENS_PER_IMAGE == image_tokens
        assert batch["pixel_values"].shape[1:] == (3, 16, 16)
        assert batch["num_target_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0


def test_ranks_split_an_epoch_disjointly(synth_dir, tiny_tokenizer, image_transform):
    source = synth_sources(synth_dir)[1]
    all_keys = {s.key for i in range(3) for s in iter_raw_samples(f"{synth_dir}/vqa-{i:06d}.tar")}
    assert len(all_keys) == 60
    seen = []
    for rank in (0, 1):
        loader = make_loader([source], tiny_tokenizer, image_transform, rank=rank, world_size=2, shuffle_buffer=16)
        seen.append({example.key for example in itertools.islice(loader.examples(0), 30)})
    assert seen[0] | seen[1] == all_keys
    assert not seen[0] & seen[1]


def test_source_weights_are_respected(synth_dir, tiny_tokenizer, image_transform):
    loader = make_loader(synth_sources(synth_dir, 0.8, 0.2), tiny_tokenizer, image_transform, micro_batch_size=10)
    counts = Counter(source for batch in itertools.islice(loader, 50) for source in batch["sources"])
    assert sum(counts.values()) == 500
    assert abs(counts["captions"] - 400) < 40
    assert loader.stats == {"samples": 500, "bad": {}}


def write_mixed_vqa(out, png):
    def turns(question, answer="赤色です。"):
        return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    samples = [
        ("corrupt", turns("<image>\nこの図形は何色ですか？"), [("png", b"\x89PNG broken")]),
        ("two_placeholders", turns("<image>\n<image>\nこの図形は何色ですか？"), [("png", png())]),
        ("caption_in_vqa", {"caption": "赤色の円。"}, [("png", png())]),
        ("ends_with_user", {"conversations": [{"role": "user", "content": "質問"}]}, []),
        ("too_long", turns("長い" * 400), []),
        ("good0", turns("<image>\nこの図形は何色ですか？"), [("png", png())]),
        ("good1", turns("赤と青を混ぜると何色になりますか？", "紫色です。"), []),
        ("good2", turns("<image>\n<image>\n同じ色ですか？", "はい。"), [("png", png()), ("jpg", png())]),
    ]
    with ShardWriter(out, "vqa", 100) as writer:
        for key, meta, images in samples:
            writer.write(key, meta, images)
    return writer.paths


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, tiny_tokenizer, image_transform, make_png, caplog):
    (path,) = write_mixed_vqa(tmp_path, make_png)
    loader = make_loader([SourceSpec([path], 1.0, "vqa", "mixed")], tiny_tokenizer, image_transform,
                         shuffle_buffer=1, max_length=96)  # buffer 1 keeps shard order: bad ones come first
    with caplog.at_level(logging.WARNING, logger="data_pipelines.loader"):
        keys = [example.key for example in itertools.islice(loader.examples(0), 3)]
    assert keys == ["good0", "good1", "good2"]
    assert loader.stats == {"samples": 3, "bad": {"undecodable_image": 1, "image_count_mismatch": 1,
                                                  "task_mismatch": 1, "malformed_conversation": 1, "too_long": 1}}
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 5
    assert all(path in line for line in warnings)
    assert any("key=corrupt undecodable_image" in line for line in warnings)
    assert any("key=caption_in_vqa task_mismatch" in line for line in warnings)


def test_truncated_shard_counts_once_and_keeps_earlier_samples(tmp_path, synth_dir, tiny_tokenizer, image_transform):
    data = (synth_dir / "captions-000000.tar").read_bytes()
    cut = tmp_path / "captions-000000.tar"
    cut.write_bytes(data[: len(data) // 2])
    good = len(list(iter_raw_samples(str(cut)))) - 1
    loader = make_loader([SourceSpec([str(cut)], 1.0, "caption", "cut")], tiny_tokenizer, image_transform,
                         shuffle_buffer=1)
    examples = list(itertools.islice(loader.examples(0), good + 1))  # the last one starts the second epoch
    assert [e.key for e in examples] == [f"captions{i:06d}" for i in range(good)] + ["captions000000"]
    assert loader.stats == {"samples": good + 1, "bad": {"truncated_shard": 1}}


def test_source_without_usable_samples_fails_instead_of_spinning(tmp_path, tiny_tokenizer, image_transform, make_png):
    with ShardWriter(tmp_path, "c", 10) as writer:
        writer.write("only", {"caption": "赤色の円。"}, [("png", make_png())])
    loader = make_loader([SourceSpec([f"{tmp_path}/c-*.tar"], 1.0, "vqa", "wrong")], tiny_tokenizer, image_transform)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader))


def test_invalid_arguments_fail_at_construction(synth_dir, tiny_tokenizer, image_transform):
    sources = synth_sources(synth_dir)
    with pytest.raises(ValueError, match="unknown template"):
        make_loader(sources, tiny_tokenizer, image_transform, template="alpaca")
    with pytest.raises(FileNotFoundError):
        make_loader([SourceSpec([f"{synth_dir}/nothing-*.tar"], 1.0, "vqa", "x")], tiny_tokenizer, image_transform)
    with pytest.raises(ValueError, match="weight"):
        make_loader([SourceSpec(sources[0].shards, 0.0, "caption", "x")], tiny_tokenizer, image_transform)
