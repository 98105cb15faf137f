import argparse
import json

import pytest

from data_pipelines.errors import UsageError
from data_pipelines.read.shards import ShardWriter
from data_pipelines.synthetic.testing import write_bad_shards
from data_pipelines.tools.commands import register
from tests.conftest import kakehashi


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAKEHASHI_CACHE", str(tmp_path_factory.getbasetemp() / "kakehashi-cache"))


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kakehashi")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def usage_error(argv, capsys) -> str:
    """The one-line message of the UsageError the command raises. The command prints no error itself: the CLI
    prints the message once, as `kakehashi: error: MESSAGE` (test_cli_prints_a_usage_error_as_one_line_and_exits_2)."""
    with pytest.raises(UsageError) as error:
        run(argv)
    message = str(error.value)
    assert message and "\n" not in message
    assert "kakehashi: error" not in capsys.readouterr().err
    return message


def test_synth_writes_shards_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert run(["data", "synth", "--out", str(out), "--samples", "12", "--samples-per-shard", "5",
                "--image-size", "16"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary == [f"synthesized 12 caption samples in {out}/captions-{{000000..000002}}.tar, "
                       f"12 vqa samples in {out}/vqa-{{000000..000002}}.tar"]
    assert len(list(out.glob("*.tar"))) == 6 and (out / "index.json").is_file()

    assert "--force" in usage_error(["data", "synth", "--out", str(out), "--samples", "5"], capsys)
    assert run(["data", "synth", "--out", str(out), "--samples", "5", "--image-size", "16", "--force"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["captions-000000.tar", "vqa-000000.tar"]


@pytest.mark.parametrize("command,message", [
    (["data", "synth", "--out", "{tmp}"], "{tmp} already holds shards; use --force to overwrite them"),
    (["data", "verify", "{tmp}/missing.tar"], "no shard '{tmp}/missing.tar'"),
])
def test_cli_prints_a_usage_error_as_one_line_and_exits_2(tmp_path, command, message):
    (tmp_path / "captions-000000.tar").write_bytes(b"")  # an occupied --out
    result = kakehashi(*[arg.replace("{tmp}", str(tmp_path)) for arg in command])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kakehashi: error:")]
    assert errors == [f"kakehashi: error: {message.replace('{tmp}', str(tmp_path))}"], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command,code,keys", [
    (["data", "preview", "--template", "asagi", "--limit", "0"], 0, {"samples", "shown", "bad"}),
    (["data", "verify"], 1, {"samples_ok", "samples_bad", "bad"}),
    (["data", "inspect"], 0, {"samples", "kinds", "sources", "images", "text_tokens"}),
])
def test_cli_json_is_one_document_on_stdout(tmp_path, command, code, keys):
    """What `| python -m json.tool` needs, through the real CLI (which logs to stdout), on shards with bad samples."""
    paths, _ = write_bad_shards(tmp_path, good=4)
    result = kakehashi(*command[:2], *paths, *command[2:], "--json")
    assert result.returncode == code, result.stderr[-3000:]
    assert keys <= json.loads(result.stdout).keys()


def test_preview_json_shows_rendered_text_targets_and_bad_samples(tmp_path, capsys, make_png):
    with ShardWriter(tmp_path, "mixed", 10) as writer:
        writer.write("cap", {"caption": "赤色の円。"}, [("png", make_png())])
        writer.write("qa", {"conversations": [{"role": "user", "content": "<image>\nこの図形は何ですか？"},
                                              {"role": "assistant", "content": "円です。"}]}, [("png", make_png())])
        writer.write("broken", {"caption": "x"}, [("png", b"not a png")])
        writer.write("more", {"caption": "y"}, [("png", make_png())])
    assert run(["data", "preview", f"{tmp_path}/mixed-*.tar", "--template", "sarashina", "--json", "--limit", "3"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # the whole of stdout is one JSON document
    samples = report["samples"]
    assert samples == [
        {"key": "cap", "text": "<image>\n赤色の円。</s>", "targets": ["赤色の円。</s>"]},
        {"key": "qa", "text": "### Human: <image>\nこの図形は何ですか？\n### Assistant: 円です。</s>\n",
         "targets": ["円です。</s>"]},
        {"key": "broken", "error": samples[2]["error"]},
    ]
    assert samples[2]["error"].startswith("not_an_image")
    assert report["shown"] == 3 and report["bad"] == 1
    assert "3 sample(s), 1 bad" in captured.err


def test_preview_readable_form(synth_dir, capsys):
    assert run(["data", "preview", f"{synth_dir}/vqa-000000.tar", "--template", "asagi", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == 2 and out.count("--- targets: ") == 2
    assert "以下は、タスクを説明する指示です。" in out


@pytest.mark.parametrize("argv_tail,message", [
    (["missing-*.tar", "--template", "asagi"], "no shard matches"),
    (["missing.tar", "--template", "asagi"], "missing.tar"),
    (["{synth}/vqa-000000.tar", "--template", "alpaca"], "unknown template 'alpaca'"),
    (["{synth}/vqa-000000.tar", "--template", "chat"], "chat_template"),
    (["{synth}/vqa-000000.tar", "--template", "asagi", "--tokenizer", "no-such-dir"], "no-such-dir"),
])
def test_preview_bad_input_is_a_one_line_usage_error(synth_dir, tmp_path, capsys, argv_tail, message):
    argv_tail = [arg.replace("{synth}", str(synth_dir)) for arg in argv_tail]
    if argv_tail[0].startswith("missing"):
        argv_tail[0] = f"{tmp_path}/{argv_tail[0]}"
    assert message in usage_error(["data", "preview", *argv_tail], capsys)


def test_synth_bench_writes_a_benchmark_set_and_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "vg"
    for _ in range(2):  # a second run replaces its own set
        assert run(["data", "synth-bench", "--task", "ja-vg-vqa-500", "--out", str(out), "--samples", "3",
                    "--json"]) == 0
        written = json.loads(capsys.readouterr().out)
        assert written == {"task": "ja-vg-vqa-500", "out": str(out), "path": str(out), "format": "disk",
                           "split": "test", "rows": 3, "questions": 6}
    assert (out / "dataset_dict.json").is_file() and (out / "test").is_dir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    message = usage_error(["data", "synth-bench", "--task", "jmmmu", "--out", str(tmp_path / "mine")], capsys)
    assert "is not empty" in message and (tmp_path / "mine" / "notes.txt").is_file()
