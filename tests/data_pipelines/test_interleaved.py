"""Interleaved image-text documents (task interleaved): rendering, the cut between segments, images past
max_images_per_sample, the OBELICS / MMC4 converters with `data verify`, and packing beside captions and VQA."""

import json

import pytest

from data_pipelines.batch.loader import MixtureLoader, SourceSpec
from data_pipelines.read.shards import ShardWriter, iter_raw_samples
from data_pipelines.render.samples import BadSample, document_segments, prepare_sample
from data_pipelines.render.templates import Segment
from data_pipelines.render.tokenize import IGNORE_INDEX, encode
from data_pipelines.synthetic.synth import synthesize
from data_pipelines.synthetic.testing import jpeg_bytes, png_bytes
from data_pipelines.tools.verify import inspect_shards, verify_shards
from tests.data_pipelines.test_data_commands import run

TOKENS_PER_IMAGE = 4
DOC = [{"text": "図形を順に紹介します。"}, {"image": 0}, {"text": "赤色の円です。"}, {"image": 1},
       {"text": "青色の四角形です。"}]


def test_a_document_renders_every_text_as_target_and_images_and_separators_never():
    segments, kept = document_segments(DOC, 2, "</s>")
    assert kept == 2 and segments == [
        Segment("図形を順に紹介します。", True), Segment("\n<image>\n", False), Segment("赤色の円です。", True),
        Segment("\n<image>\n", False), Segment("青色の四角形です。</s>", True)]


def test_images_past_the_limit_are_dropped_and_the_text_around_them_kept():
    segments, kept = document_segments(DOC, 2, "</s>", max_images=1)
    assert kept == 1
    assert [s.text for s in segments] == ["図形を順に紹介します。", "\n<image>\n", "赤色の円です。", "\n",
                                          "青色の四角形です。</s>"]


@pytest.mark.parametrize("document, images, reason", [
    ([], 0, "empty_document"),
    ([{"image": 0}], 1, "empty_document"),
    ([{"text": "a"}, {"image": 1}], 2, "image_count_mismatch"),
    ([{"text": "a"}, {"image": 0}], 2, "image_count_mismatch"),
    ([{"text": "a <image> b"}], 0, "malformed_document"),
    ([{"text": "a", "image": 0}], 1, "malformed_document"),
    ("text", 0, "empty_document"),
])
def test_a_bad_document_is_skipped_with_its_reason(document, images, reason):
    with pytest.raises(BadSample) as bad:
        document_segments(document, images, "</s>")
    assert bad.value.reason == reason


def test_a_long_document_is_cut_between_segments_never_inside_an_image(tiny_tokenizer):
    segments, _ = document_segments(DOC, 2, tiny_tokenizer.eos_token)
    whole = encode(segments, tiny_tokenizer, tokens_per_image=TOKENS_PER_IMAGE, max_length=10_000)
    for max_length in range(8, len(whole.input_ids)):
        cut = encode(segments, tiny_tokenizer, tokens_per_image=TOKENS_PER_IMAGE, max_length=max_length,
                     cut_between_segments=True)
        assert len(cut.input_ids) <= max_length and cut.input_ids == whole.input_ids[:len(cut.input_ids)]
        ends_of_text = {len(encode(segments[:n], tiny_tokenizer, tokens_per_image=TOKENS_PER_IMAGE,
                                   max_length=10_000).input_ids) for n in (1, 3)}
        first_text = min(ends_of_text)
        if max_length >= first_text:  # at the end of a whole text segment, never an image without text after it
            assert len(cut.input_ids) in ends_of_text
        assert cut.num_images == cut.input_ids.count(4) // TOKENS_PER_IMAGE  # <image> is id 4: whole images only
        image_positions = [i for i, token in enumerate(cut.input_ids) if token == 4]
        assert all(cut.labels[i] == IGNORE_INDEX for i in image_positions)


def write_docs(out, samples):
    with ShardWriter(out, "docs", 100) as writer:
        for key, meta, images in samples:
            writer.write(key, meta, images)
    return writer.paths


def test_obelics_parquet_and_datasets_folder_convert_and_verify_exactly(tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (images / "b.png").write_bytes(png_bytes())
    (images / "bad.jpg").write_bytes(b"not an image")
    rows = {
        "id": ["d0", "d1", "d2", "d3", "d4", "d5"],
        "texts": [["春の写真です。", None, "桜が咲いています。"], [None, "二枚目の前の文。", None],
                  [None, "画像がない。"], ["文だけ。"], [None, "壊れた画像。"], ["a", None]],
        "images": [[None, "a.jpg", None], ["b.png", None, "a.jpg"], ["gone.jpg", None], [None],
                   ["bad.jpg", None], [None, None]],
    }
    pq.write_table(pa.table(rows), tmp_path / "obelics.parquet")
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    for name, source in (("pq", tmp_path / "obelics.parquet"), ("saved", tmp_path / "saved")):
        out = tmp_path / f"out-{name}"
        assert run(["data", "convert", "obelics", "--input", str(source), "--images", str(images), "--out", str(out),
                    "--name", name, "--source", "obelics-ja"]) == 0
        assert ("kept 3, skipped 3, 1 shard(s)" in capsys.readouterr().out)
        assert json.loads((out / "index.json").read_text())["skipped_by_reason"] == {
            "image_missing": 1, "malformed_document": 1, "not_an_image": 1}
        shards = [str(p) for p in sorted(out.glob(f"{name}-*.tar"))]
        assert verify_shards(shards)["samples_ok"] == 3 and verify_shards(shards)["samples_bad"] == 0
        samples = [s for shard in shards for s in iter_raw_samples(shard)]
        assert [s.key for s in samples] == ["d0", "d1", "d3"]
        assert samples[0].meta == {"document": [{"text": "春の写真です。"}, {"image": 0}, {"text": "桜が咲いています。"}],
                                   "source": "obelics-ja"}
        assert samples[1].images == [png_bytes(), jpeg_bytes(seed=1)] and samples[1].image_exts == ["png", "jpg"]
        assert inspect_shards(shards, _tokenizer())["kinds"] == {"interleaved": 2, "interleaved (text only)": 1}


def _tokenizer():
    from data_pipelines.tools.cli_common import load_tokenizer

    return load_tokenizer(None)


def test_mmc4_jsonl_puts_each_image_before_its_sentence(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "x.jpg").write_bytes(jpeg_bytes(seed=2))
    (images / "y.png").write_bytes(png_bytes())
    lines = [
        {"text_list": ["一文目。", "二文目。", "三文目。"], "image_info": [
            {"image_name": "y.png", "matched_text_index": 2}, {"image_name": "x.jpg", "matched_text_index": 0}]},
        {"text_list": ["一文。"], "image_info": [{"image_name": "missing.jpg", "matched_text_index": 0}]},
        {"text_list": ["一文。"], "image_info": [{"image_name": "x.jpg", "matched_text_index": 5}]},
        {"text_list": [], "image_info": [], "id": "empty"},
    ]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n{oops\n")
    out = tmp_path / "out"
    assert run(["data", "convert", "mmc4", "--input", str(source), "--images", str(images), "--out", str(out)]) == 0
    assert "kept 1, skipped 4, 1 shard(s)" in capsys.readouterr().out
    assert json.loads((out / "index.json").read_text())["skipped_by_reason"] == {
        "image_missing": 1, "malformed_document": 1, "no_text": 1, "not_an_object": 1}
    shards = [str(p) for p in sorted(out.glob("mmc4-*.tar"))]
    assert verify_shards(shards) == {"samples_ok": 1, "samples_bad": 0, "bad": []}
    (sample,) = [s for shard in shards for s in iter_raw_samples(shard)]
    assert sample.meta["document"] == [{"image": 0}, {"text": "一文目。"}, {"text": "二文目。"}, {"image": 1},
                                       {"text": "三文目。"}]
    assert sample.images == [jpeg_bytes(seed=2), png_bytes()]


def test_verify_counts_bad_documents_by_reason(tmp_path):
    shards = write_docs(tmp_path, [
        ("ok", {"document": DOC}, [("png", png_bytes()), ("jpg", jpeg_bytes())]),
        ("count", {"document": DOC}, [("png", png_bytes())]),
        ("notext", {"document": [{"image": 0}]}, [("png", png_bytes())]),
    ])
    report = verify_shards(shards)
    assert report["samples_ok"] == 1 and [b["reason"] for b in report["bad"]] == ["image_count_mismatch",
                                                                                    "empty_document"]


def test_documents_pack_beside_captions_and_vqa_with_their_source_ids(tmp_path, tiny_tokenizer):
    synthesize(tmp_path, samples=40, documents=40, samples_per_shard=20, image_size=16)
    sources = [SourceSpec([f"{tmp_path}/captions-*.tar"], 1.0, "caption", "captions"),
               SourceSpec([f"{tmp_path}/vqa-*.tar"], 1.0, "vqa", "vqa"),
               SourceSpec([f"{tmp_path}/docs-*.tar"], 1.0, "interleaved", "docs")]
    loader = MixtureLoader(sources, tokenizer=tiny_tokenizer, image_size=16, template="asagi",
                           tokens_per_image=TOKENS_PER_IMAGE, max_length=96, micro_batch_size=2, seed=0,
                           num_workers=0, packing=True, max_images_per_sample=3)
    seen = set()
    for _ in range(6):
        batch = next(loader)
        images = (batch["input_ids"] == 4)
        assert int(images.sum()) == TOKENS_PER_IMAGE * batch["pixel_values"].shape[0]
        assert (batch["labels"][images] == IGNORE_INDEX).all()
        assert ((batch["label_sources"] >= 0) == batch["attention_mask"].bool()).all()
        seen |= set(batch["label_sources"][batch["labels"] != IGNORE_INDEX].tolist())
    assert seen == {0, 1, 2}
    raw = next(iter_raw_samples(f"{tmp_path}/docs-000000.tar"))
    prepared = prepare_sample(raw, task="interleaved", template="asagi", eos_token="</s>", max_images=1)
    assert prepared.num_images == 1 and len(raw.images) > 1


def test_preview_and_inspect_show_documents(tmp_path, capsys):
    shards = write_docs(tmp_path, [("ok", {"document": DOC}, [("png", png_bytes()), ("jpg", jpeg_bytes())])])
    assert run(["data", "preview", *shards, "--template", "asagi", "--json"]) == 0
    (sample,) = json.loads(capsys.readouterr().out)["samples"]
    assert sample["text"] == "図形を順に紹介します。\n<image>\n赤色の円です。\n<image>\n青色の四角形です。</s>"
    assert sample["targets"] == ["図形を順に紹介します。", "赤色の円です。", "青色の四角形です。</s>"]
    assert run(["data", "inspect", *shards, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kinds"] == {"interleaved": 1} and report["images_per_sample"] == {"2": 1}
