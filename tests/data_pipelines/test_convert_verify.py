import io
import json

import pytest
from PIL import Image

from data_pipelines.read.shards import iter_raw_samples
from data_pipelines.synthetic.testing import jpeg_bytes, png_bytes, write_bad_shards
from tests.data_pipelines.test_data_commands import run


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAKEHASHI_CACHE", str(tmp_path_factory.getbasetemp() / "kakehashi-cache"))


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def turns(*pairs):
    return [{"from": speaker, "value": text} for pair in pairs for speaker, text in zip(("human", "gpt"), pair)]


def read_out(out, name):
    return [sample for path in sorted(out.glob(f"{name}-*.tar")) for sample in iter_raw_samples(str(path))]


def test_convert_llava_keeps_kinds_and_skips_with_reasons(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (images / "b.png").write_bytes(png_bytes())
    (images / "c.jpg").write_bytes(cmyk_jpeg())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    records = [
        {"id": "one", "image": "a.jpg", "conversations": turns(("<image>\n何ですか？", "猫です。"))},
        {"id": "multi.turn", "image": "b.png", "conversations": turns(("<image>\n色は？", "赤。"), ("形は？", "四角。"))},
        {"id": "text", "conversations": turns(("こんにちは", "はい。"))},
        {"id": "two", "image": ["a.jpg", "c.jpg"], "conversations": turns(("<image>\n<image>\n違いは？", "色。"))},
        {"id": "missing", "image": "nope.jpg", "conversations": turns(("<image>\nq", "a"))},
        {"id": "count", "image": "a.jpg", "conversations": turns(("q", "a"))},
        {"id": "undecodable", "image": "broken.jpg", "conversations": turns(("<image>\nq", "a"))},
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "out"
    assert run(["data", "convert", "llava", "--input", str(source), "--images", str(images), "--out", str(out),
                "--samples-per-shard", "3"]) == 0
    captured = capsys.readouterr()
    assert "converted: kept 4, skipped 3, 2 shard(s)" in captured.out
    assert "skipped missing: image file missing" in captured.err and "skipped count: 0 <image> for 1" in captured.err
    assert "skipped undecodable: not_an_image" in captured.err
    samples = read_out(out, "llava")
    assert [s.key for s in samples] == ["one", "multi_turn", "text", "two"]
    assert samples[0].images == [(images / "a.jpg").read_bytes()] and samples[0].image_exts == ["jpg"]
    assert samples[3].images == [(images / "a.jpg").read_bytes(), cmyk_jpeg()]  # original bytes, not re-encoded
    assert samples[1].meta["conversations"][2] == {"role": "user", "content": "形は？"}
    assert samples[2].images == []
    index = json.loads((out / "index.json").read_text())
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [("llava-000000.tar", 3), ("llava-000001.tar", 1)]
    assert index["kept"] == 4 and index["skipped"] == 3 and all(len(s["sha256"]) == 64 for s in index["shards"])


def test_convert_jsonl_captions_and_conversations(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes())
    lines = [{"image": "a.png", "caption": "赤い四角。"},
             {"id": "conv", "image": ["a.png"], "conversations": [{"role": "user", "content": "<image>\nq"},
                                                                  {"role": "assistant", "content": "a"}]},
             {"caption": "画像なし"}]
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n{oops\n")
    assert run(["data", "convert", "jsonl", "--input", str(source), "--out", str(tmp_path / "o"),
                "--source", "mine"]) == 0
    assert "kept 2, skipped 2" in capsys.readouterr().out
    samples = read_out(tmp_path / "o", "jsonl")
    assert [s.meta for s in samples] == [{"caption": "赤い四角。", "source": "mine"},
                                         {"conversations": lines[1]["conversations"], "source": "mine"}]


def test_convert_hf_saved_dataset_and_parquet(tmp_path, capsys):
    import datasets

    rows = {"id": ["r0", "r1", "r2"], "caption": ["一つ目。", "二つ目。", "三つ目。"],
            "image": [{"bytes": jpeg_bytes(seed=3), "path": None}, {"bytes": png_bytes(), "path": None},
                      {"bytes": b"garbage", "path": None}]}
    features = datasets.Features({"id": datasets.Value("string"), "caption": datasets.Value("string"),
                                  "image": datasets.Image()})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    for name, source in (("saved", tmp_path / "saved"), ("pq", tmp_path / "data.parquet")):
        assert run(["data", "convert", "hf", "--input", str(source), "--out", str(tmp_path / name),
                    "--name", name]) == 0
        assert "kept 2, skipped 1" in capsys.readouterr().out
        samples = read_out(tmp_path / name, name)
        assert [(s.key, s.meta["caption"]) for s in samples] == [("r0", "一つ目。"), ("r1", "二つ目。")]
        assert samples[0].images == [jpeg_bytes(seed=3)]


def test_verify_reports_every_bad_sample_and_truncation(tmp_path, capsys):
    paths, expected = write_bad_shards(tmp_path, good=12)
    assert run(["data", "verify", *paths, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    too_long = 1  # verify checks data, not a max length: that sample is fine here
    assert report["samples_ok"] == 12 + 6 + too_long  # second shard: 6 good before the cut
    reasons = sorted(entry["reason"] for entry in report["bad"])
    assert reasons == sorted(reason for reason in expected if reason != "too_long")
    cut = [entry for entry in report["bad"] if entry["reason"] == "truncated_shard"]
    assert cut == [{"shard": paths[1], "key": "cut", "reason": "truncated_shard", "detail": "truncated_shard"}]
    assert run(["data", "verify", paths[0].replace("000000", "00000{0..0}")]) == 1
    assert "13 sample(s) ok, 10 bad in 1 shard(s)" in capsys.readouterr().out  # 12 good + too_long


def test_inspect_counts_kinds_sources_and_histograms(synth_dir, capsys):
    assert run(["data", "inspect", f"{synth_dir}/*.tar", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 120 and report["sources"] == {"synth-shapes": 120}
    assert report["kinds"]["caption"] == 60
    assert report["kinds"]["vqa"] + report["kinds"].get("vqa (text only)", 0) == 60
    assert report["image_width"] == {"32-64": report["images"]}
    assert sum(report["text_tokens"].values()) == 120
