"""`kakehashi data convert coco`: COCO-style caption JSON (STAIR / YJ Captions) -> caption shards."""

import json

import pytest

from data_pipelines.read.shards import iter_raw_samples
from data_pipelines.synthetic.testing import jpeg_bytes, png_bytes
from data_pipelines.tools.verify import verify_shards
from tests.data_pipelines.test_data_commands import run, usage_error


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAKEHASHI_CACHE", str(tmp_path_factory.getbasetemp() / "kakehashi-cache"))


def test_one_caption_sample_per_annotation_japanese_kept_bad_ones_counted(tmp_path, capsys):
    images = tmp_path / "val2014"
    images.mkdir()
    (images / "COCO_1.jpg").write_bytes(jpeg_bytes(seed=1))
    (images / "COCO_2.png").write_bytes(png_bytes())
    document = {
        "images": [{"id": 1, "file_name": "COCO_1.jpg"}, {"id": 2, "file_name": "COCO_2.png"},
                   {"id": 3, "file_name": "COCO_3.jpg"}],  # file 3 is not on disk
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "白い皿の上にケーキが置かれている。"},
            {"id": 11, "image_id": 1, "caption": "テーブルの上のケーキ"},
            {"id": 20, "image_id": 2, "caption": "赤い四角。"},
            {"id": 21, "image_id": 2, "caption": "  "},           # empty
            {"id": 30, "image_id": 3, "caption": "見えない画像。"},  # image file missing
            {"id": 40, "image_id": 4, "caption": "画像の記載なし。"},  # image_id not in `images`
        ],
    }
    source = tmp_path / "stair_captions_v1.2_val.json"
    source.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "shards"
    assert run(["data", "convert", "coco", "--input", str(source), "--images", str(images), "--out", str(out),
                "--source", "stair", "--samples-per-shard", "2"]) == 0
    captured = capsys.readouterr()
    assert ("converted: kept 3, skipped 3, 2 shard(s)" in captured.out
            and "(skipped: empty_caption=1, image_missing=1, unknown_image_id=1)" in captured.out)
    assert "skipped 3_30: image file missing" in captured.err
    shards = sorted(str(p) for p in out.glob("coco-*.tar"))
    samples = [s for shard in shards for s in iter_raw_samples(shard)]
    assert [(s.key, s.meta) for s in samples] == [
        ("1_10", {"caption": "白い皿の上にケーキが置かれている。", "source": "stair"}),
        ("1_11", {"caption": "テーブルの上のケーキ", "source": "stair"}),
        ("2_20", {"caption": "赤い四角。", "source": "stair"})]
    assert samples[0].images == [(images / "COCO_1.jpg").read_bytes()] and samples[2].image_exts == ["png"]
    assert verify_shards(shards) == {"samples_ok": 3, "samples_bad": 0, "bad": []}
    index = json.loads((out / "index.json").read_text())
    assert index["skipped_by_reason"] == {"empty_caption": 1, "image_missing": 1, "unknown_image_id": 1}


def test_a_file_that_is_not_coco_captions_is_a_usage_error(tmp_path, capsys):
    source = tmp_path / "llava.json"
    source.write_text(json.dumps([{"id": 1}]))
    message = usage_error(["data", "convert", "coco", "--input", str(source), "--out", str(tmp_path / "o")], capsys)
    assert message == f"{source} is not COCO-style caption JSON: it needs `images` and `annotations` lists"
