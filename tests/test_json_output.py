"""Every command that takes --json prints exactly one JSON document on stdout, through the real CLI, with the logs,
progress, freeze tables and third-party output (DeepSpeed's op build included) on stderr."""

import argparse
import json

import pytest

from tests.conftest import REPO, kakehashi
from tests.train.conftest import short_recipe
from train.cli import build_parser

pytestmark = pytest.mark.slow  # a training and a benchmark through the real command


def json_commands() -> set[str]:
    """Every `kakehashi ...` command line (as 'bench train', 'data verify') whose parser has a --json option."""
    found = set()

    def walk(parser, prefix):
        for action in parser._actions:
            if "--json" in action.option_strings:
                found.add(prefix.strip())
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{prefix} {name}")

    walk(build_parser(), "")
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A very short tiny run through `kakehashi train --json`: its result document, and the run directory."""
    tmp = tmp_path_factory.mktemp("json")
    recipe = short_recipe(tmp, steps=(2, 2), samples=40)
    done = kakehashi("train", recipe, "--output", tmp / "run", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), tmp


def converter_inputs(tmp) -> dict[str, list]:
    """One small input of each converter's format, written once under tmp: its arguments before --out."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.synthetic.testing import png_bytes

    inputs = tmp / "convert-inputs"
    if not inputs.is_dir():
        inputs.mkdir()
        (inputs / "a.png").write_bytes(png_bytes())
        turns = [{"from": "human", "value": "<image>\n何色？"}, {"from": "gpt", "value": "赤色です。"}]
        (inputs / "llava.json").write_text(json.dumps([{"id": "0", "image": "a.png", "conversations": turns}]))
        (inputs / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "赤い円。"}) + "\n")
        (inputs / "coco.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                     "annotations": [{"image_id": 1, "caption": "赤い円。"}]}))
        image = {"bytes": png_bytes(), "path": None}
        datasets.Dataset.from_dict({"caption": ["赤い円。"], "image": [image]}, features=datasets.Features(
            {"caption": datasets.Value("string"), "image": datasets.Image()})).save_to_disk(str(inputs / "hf"))
        pq.write_table(pa.table({"id": ["d0"], "texts": [["円です。", None]], "images": [[None, "a.png"]]}),
                       inputs / "obelics.parquet")
        (inputs / "mmc4.jsonl").write_text(json.dumps({"text_list": ["円です。"], "image_info": [
            {"image_name": "a.png", "matched_text_index": 0}]}) + "\n")
        (inputs / "dpo.json").write_text(json.dumps([{"conversations": turns[:1], "images": ["a.png"],
                                                      "chosen": {"from": "gpt", "value": "赤色の円です。"},
                                                      "rejected": {"from": "gpt", "value": "青色です。"}}]))
        pq.write_table(pa.table({"image": [image], "question": ["何色？"], "chosen": ["赤色です。"],
                                 "rejected": ["青色です。"]}), inputs / "prefs.parquet")
    images = ["--images", inputs]
    return {"llava": ["--input", inputs / "llava.json", *images], "jsonl": ["--input", inputs / "captions.jsonl"],
            "hf": ["--input", inputs / "hf"], "coco": ["--input", inputs / "coco.json", *images],
            "obelics": ["--input", inputs / "obelics.parquet", *images],
            "mmc4": ["--input", inputs / "mmc4.jsonl", *images],
            "llamafactory-dpo": ["--input", inputs / "dpo.json", *images],
            "preference-table": ["--input", inputs / "prefs.parquet"]}


def command_lines(trained) -> dict[str, list]:
    _, tmp = trained
    shards = sorted(str(p) for p in (tmp / "shapes").glob("*.tar"))
    converters = {f"data convert {kind}": ["data", "convert", kind, *arguments, "--out", tmp / "converted" / kind]
                  for kind, arguments in converter_inputs(tmp).items()}
    return {**converters,
        "recipe check": ["recipe", "check", REPO / "recipes/tiny/asagi-lora.yaml", "--skip-data"],
        "bench train": ["bench", "train", REPO / "recipes/tiny/asagi-2stage.yaml", "--stage", "2", "--packing", "on",
                        "--steps", "1", "--warmup", "0", "--synthetic", "40"],
        "bench data": ["bench", "data", *shards[:1], "--samples", "8", "--rounds", "1", "--image-size", "32"],
        "data verify": ["data", "verify", *shards],
        "data inspect": ["data", "inspect", *shards],
        "data preview": ["data", "preview", shards[0], "--template", "asagi", "--limit", "2"],
        "data synth-bench": ["data", "synth-bench", "--task", "jmmmu", "--out", tmp / "jmmmu", "--samples", "2"],
        "eval": ["eval", tmp / "run" / "export", "--data", shards[-1], "--max-samples", "2"],
        "shapes-eval": ["shapes-eval", tmp / "run" / "export", "--samples", "2"],
    }


def variant_lines(trained) -> dict[str, list]:
    """Options that change a --json command's document: the same one-document rule."""
    return {
        "recipe check --gpus": ["recipe", "check", REPO / "recipes/asagi-2b.yaml", "--skip-data", "--gpus", "8",
                                "--gpu-memory", "80GB"],
        "bench train --baseline trainer": ["bench", "train", REPO / "recipes/tiny/asagi-2stage.yaml", "--stage", "2",
                                           "--packing", "off", "--baseline", "trainer", "--steps", "1", "--warmup",
                                           "0", "--synthetic", "40"],
    }


def test_every_json_command_is_tested(trained):
    assert json_commands() == set(command_lines(trained)) | {"train"}


def test_train_json_is_the_run_result(trained):
    document, tmp = trained
    assert [s["stage"] for s in document["stages"]] == ["align", "instruct"]
    assert document["export"] == str(tmp / "run" / "export") and document["run"] == str(tmp / "run")


CONVERTERS = ["llava", "jsonl", "hf", "coco", "obelics", "mmc4", "llamafactory-dpo", "preference-table"]


@pytest.mark.parametrize("command", ["recipe check", "bench train", "bench data", "data verify", "data inspect",
                                     "data preview", "data synth-bench", "eval", "shapes-eval", "recipe check --gpus",
                                     "bench train --baseline trainer", *(f"data convert {c}" for c in CONVERTERS)])
def test_json_output_is_one_document_on_stdout(trained, command):
    # what else writes to stdout meanwhile (a compiler DeepSpeed runs, native code) goes to stderr:
    # tests/data_pipelines/test_output.py
    done = kakehashi(*{**command_lines(trained), **variant_lines(trained)}[command], "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)  # the whole of stdout
    assert isinstance(document, dict) and document
    if command == "bench train":
        assert document["packing"] is True and "INFO" in done.stderr
    if command == "recipe check --gpus":
        assert all("memory" in stage for stage in document["stages"]) and document["gpus"] == 8
    if command == "bench train --baseline trainer":
        assert document["baseline"]["unpacked"]["runner"] == "trainer" and document["runner"] == "ours"
    if command.startswith("data convert"):  # every converter's one input record kept
        assert document["kept"] == 1 and document["skipped"] == 0, document
