"""`kakehashi data convert llamafactory-dpo|preference-table`: preference pairs (DPO/MPO) -> preference shards, read
back exactly; bad pairs skipped and counted by reason; a wrong input or column is a one-line usage error (exit 2)."""

import json
import tarfile

import pytest

from data_pipelines.read.shards import iter_raw_samples
from data_pipelines.synthetic.testing import jpeg_bytes, png_bytes
from tests.conftest import kakehashi
from tests.data_pipelines.test_data_commands import run

RED, BLUE = "赤色です。", "青色です。"


def read_out(out, name):
    shards = sorted(str(p) for p in out.glob(f"{name}-*.tar"))
    return shards, [sample for shard in shards for sample in iter_raw_samples(shard)]


def llamafactory_file(tmp_path):
    """A LLaMA-Factory ranking JSON (sharegpt from/value, and role/content `messages`) with real images: two good
    records, then one bad record of each kind."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (images / "b.png").write_bytes(png_bytes())
    (images / "bad.jpg").write_bytes(b"not an image")
    absolute_jpg = tmp_path / "elsewhere.jpg"
    absolute_jpg.write_bytes(jpeg_bytes(seed=2))

    def pair(question, chosen=RED, rejected=BLUE, images=("a.jpg",)):
        return {"conversations": [{"from": "human", "value": question}], "chosen": {"from": "gpt", "value": chosen},
                "rejected": {"from": "gpt", "value": rejected}, "images": list(images)}

    records = [
        pair("<image>\nこの図形は何色ですか？"),
        {"messages": [{"role": "user", "content": "<image>\n一枚目は何ですか？"}, {"role": "assistant", "content": "円です。"},
                      {"role": "user", "content": "<image>\n二枚目と比べてください。"}],
         "chosen": {"role": "assistant", "content": "二枚目は四角形です。"},
         "rejected": {"role": "assistant", "content": "どちらも円です。"}, "images": ["b.png", str(absolute_jpg)]},
        pair("<image>\n同じ答え", chosen=RED, rejected=RED),                        # identical_answers
        pair("<image>\n空の答え", rejected="  "),                                    # empty_answer
        pair("<image>\n二枚", images=("a.jpg", "b.png")),                           # image_count_mismatch
        pair("<image>\n答えに画像", chosen="<image> 赤色です。"),                      # placeholder_in_answer
        pair("<image>\nない画像", images=("gone.jpg",)),                            # image_missing
        pair("<image>\n壊れた画像", images=("bad.jpg",)),                             # not_an_image
        {**pair("<image>\n質問"), "conversations": [{"from": "human", "value": "<image>\n質問"},
                                                    {"from": "gpt", "value": "答え"}]},  # ends on an answer
    ]
    source = tmp_path / "dpo.json"
    source.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return source, images, absolute_jpg


def test_llamafactory_dpo_through_the_cli_writes_exact_samples_and_counts_skips(tmp_path):
    source, images, absolute_jpg = llamafactory_file(tmp_path)
    out = tmp_path / "out"
    done = kakehashi("data", "convert", "llamafactory-dpo", "--input", source, "--images", images, "--out", out,
                     "--name", "dpo", "--source", "rlaif-ja", "--samples-per-shard", "1", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    reasons = {"identical_answers": 1, "empty_answer": 1, "image_count_mismatch": 1, "placeholder_in_answer": 1,
               "image_missing": 1, "not_an_image": 1, "malformed_conversation": 1}
    assert json.loads(done.stdout) == {"out": str(out), "name": "dpo", "kept": 2, "skipped": 7,
                                       "skipped_by_reason": dict(sorted(reasons.items())), "shards": 2}
    assert "skipped 2: chosen and rejected are the same answer" in done.stderr
    assert "skipped 8: the prompt is not a list of turns ending with a user turn" in done.stderr
    assert "converted: kept 2, skipped 7, 2 shard(s)" in done.stderr
    shards, samples = read_out(out, "dpo")
    assert [tarfile.open(shard).getnames() for shard in shards] == [
        ["0.json", "0.jpg"], ["1.json", "1.0.png", "1.1.jpg"]]
    assert samples[0].meta == {"prompt": [{"role": "user", "content": "<image>\nこの図形は何色ですか？"}],
                               "chosen": RED, "rejected": BLUE, "source": "rlaif-ja"}
    assert samples[1].meta == {
        "prompt": [{"role": "user", "content": "<image>\n一枚目は何ですか？"}, {"role": "assistant", "content": "円です。"},
                   {"role": "user", "content": "<image>\n二枚目と比べてください。"}],
        "chosen": "二枚目は四角形です。", "rejected": "どちらも円です。", "source": "rlaif-ja"}
    assert samples[0].images == [(images / "a.jpg").read_bytes()]
    assert samples[1].images == [png_bytes(), absolute_jpg.read_bytes()] and samples[1].image_exts == ["png", "jpg"]
    index = json.loads((out / "index.json").read_text())
    assert (index["kept"], index["skipped_by_reason"]) == (2, reasons)
    assert [shard["samples"] for shard in index["shards"]] == [1, 1]


TABLE = {
    "id": ["p0", "p1", "p2", "p3", "p4", "p5", "p6"],
    "image": [jpeg_bytes(seed=3), png_bytes(), png_bytes(), png_bytes(), png_bytes(), b"garbage", None],
    "question": ["この図形は何色ですか？", "写真を見て答えて。<image>", "同じ答え", "空の答え",
                 "<image><image>\n二つの画像", "壊れた画像", "画像なし"],
    "chosen": [RED, "犬です。", RED, "", RED, RED, RED],
    "rejected": [BLUE, "猫です。", RED, BLUE, BLUE, BLUE, BLUE],
}
TABLE_SKIPS = {"identical_answers": 1, "empty_answer": 1, "image_count_mismatch": 1, "not_an_image": 1,
               "image_missing": 1}


def table_inputs(tmp_path):
    """The same rows as a parquet file ({bytes, path} image structs), a folder of two parquet files (raw bytes)
    and a datasets save_to_disk folder (an Image feature)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    as_structs = [None if data is None else {"bytes": data, "path": None} for data in TABLE["image"]]
    pq.write_table(pa.table({**TABLE, "image": as_structs}), tmp_path / "rlaif.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    table = pa.table(TABLE)
    pq.write_table(table.slice(0, 3), folder / "train-00000.parquet")
    pq.write_table(table.slice(3), folder / "train-00001.parquet")
    dataset = datasets.Dataset.from_dict({**TABLE, "image": as_structs}).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    return {"pq": tmp_path / "rlaif.parquet", "parts": folder, "saved": tmp_path / "saved"}


def test_preference_table_from_parquet_and_a_datasets_folder_keeps_the_original_bytes(tmp_path, capsys):
    for name, source in table_inputs(tmp_path).items():
        out = tmp_path / f"out-{name}"
        assert run(["data", "convert", "preference-table", "--input", str(source), "--out", str(out),
                    "--name", name]) == 0, name
        captured = capsys.readouterr()
        assert "converted: kept 2, skipped 5, 1 shard(s)" in captured.out, name
        assert "skipped p4: 2 <image> for 1 image(s)" in captured.err
        assert json.loads((out / "index.json").read_text())["skipped_by_reason"] == TABLE_SKIPS, name
        shards, samples = read_out(out, name)
        assert [(s.key, s.meta) for s in samples] == [
            ("p0", {"prompt": [{"role": "user", "content": "<image>\nこの図形は何色ですか？"}], "chosen": RED,
                    "rejected": BLUE}),
            ("p1", {"prompt": [{"role": "user", "content": "写真を見て答えて。<image>"}], "chosen": "犬です。",
                    "rejected": "猫です。"})], name
        assert [(s.images, s.image_exts) for s in samples] == [([jpeg_bytes(seed=3)], ["jpg"]),
                                                               ([png_bytes()], ["png"])], name


def test_preference_table_column_options_name_other_columns(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"idx": [7], "img": [png_bytes()], "prompt": ["何色？"], "good": [RED], "bad": [BLUE]}),
                   tmp_path / "t.parquet")
    out = tmp_path / "out"
    assert run(["data", "convert", "preference-table", "--input", str(tmp_path / "t.parquet"), "--out", str(out),
                "--image-column", "img", "--question-column", "prompt", "--chosen-column", "good",
                "--rejected-column", "bad", "--id-column", "idx", "--source", "vlfeedback"]) == 0
    (sample,) = read_out(out, "preference-table")[1]
    assert (sample.key, sample.meta) == ("7", {"prompt": [{"role": "user", "content": "<image>\n何色？"}],
                                               "chosen": RED, "rejected": BLUE, "source": "vlfeedback"})


@pytest.mark.parametrize("kind, tail, message", [
    ("llamafactory-dpo", ["--input", "{tmp}/missing.json"], "input {tmp}/missing.json does not exist"),
    ("preference-table", ["--input", "{tmp}/t.parquet", "--question-column", "prompt"],
     "{tmp}/t.parquet has no column 'prompt' (columns: id, image, question, chosen, rejected)"),
])
def test_a_missing_input_or_column_is_a_one_line_usage_error_exit_2(tmp_path, kind, tail, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: values[:1] for key, values in TABLE.items()}), tmp_path / "t.parquet")
    done = kakehashi("data", "convert", kind, *[arg.replace("{tmp}", str(tmp_path)) for arg in tail],
                     "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("kakehashi: error:")]
    assert errors == [f"kakehashi: error: {message.replace('{tmp}', str(tmp_path))}"], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()
