"""`kakehashi report` on a synthetic run: training, throughput (MFU only where logged) and periodic-eval plots."""

import json

import yaml
from PIL import Image

from tests.conftest import TINY_RECIPE, kakehashi
from train.report import read_metrics

PANEL_HEIGHT = 220  # pixels per stacked panel (2.2 inches at 100 dpi)


def train_record(stage, step, mfu="absent"):
    record = {"stage": stage, "step": step, "loss": 3.0 / step, "lr": 1e-3, "grad_norm": 1.0 + step % 3,
              "tokens_per_s": 1000.0 + 10 * step}
    if mfu != "absent":
        record["mfu"] = mfu
    return record


def write_run(run):
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    (run / "stages").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    lines = [train_record("align", s, mfu=None if s % 2 else "absent") for s in range(1, 11)]  # MFU unknown
    for step in range(1, 21):
        lines.append({**train_record("instruct", step, mfu=0.01 * step), "tflops_per_device": 0.5 + step / 100})
        if step % 5 == 0:  # an eval record shares its (stage, step) with a train record
            lines.append({"kind": "eval", "stage": "instruct", "step": step, "eval_loss/caption": 4.0 / step,
                          "eval_loss/vqa": 5.0 / step, "eval_loss": 4.5 / step, "eval_vqa_samples": 4,
                          "eval_exact_match": step / 20, "eval_rouge_l_chars_f1": min(1.0, step / 10)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for index, (stage, steps, trains) in enumerate([("align", 10, "projector"), ("instruct", 20, "llm")]):
        (run / "stages" / f"0{index + 1}-{stage}").mkdir()
        summary = {"stage": stage, "steps": steps, "first_loss": 3.0, "final_loss": 0.15, "seconds": 10.0,
                   "samples": 160, "tokens": 10000, "bad_samples": 0, "skipped_steps": 0,
                   "trainable": {"vision_encoder": 0, "projector": 0, "llm": 0, trains: 100},
                   "frozen": {"vision_encoder": 100}}
        (run / "stages" / f"0{index + 1}-{stage}" / "summary.json").write_text(json.dumps(summary))


def panels(path):
    with Image.open(path) as plot:
        assert plot.format == "PNG" and plot.width >= 500
        colours = plot.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 10  # lines and labels drawn, not a blank canvas
        return round(plot.height / PANEL_HEIGHT)


def test_report_plots_throughput_mfu_where_logged_and_periodic_eval(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    result = kakehashi("report", run)
    assert result.returncode == 0, result.stderr
    report = run / "report"
    assert panels(report / "align.png") == panels(report / "instruct.png") == 3  # loss, lr, grad norm
    assert panels(report / "align-throughput.png") == 1  # tokens/s; MFU all null or missing: no empty panel
    assert panels(report / "instruct-throughput.png") == 3  # tokens/s, TFLOP/s and MFU
    assert panels(report / "instruct-eval.png") == 3  # loss per source, exact match, ROUGE-L
    assert not (report / "align-eval.png").exists()
    summary = (report / "summary.md").read_text()
    assert "![instruct-eval](instruct-eval.png)" in summary and "![align-throughput](align-throughput.png)" in summary
    assert "| instruct | 20 | 0.2250 | caption 0.2000, vqa 0.2500 | 1.0000 | 1.0000 |" in summary


def test_eval_records_do_not_replace_the_train_record_of_their_step(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    train, evals = read_metrics(run), read_metrics(run, "eval")
    assert [r["step"] for r in train["instruct"]] == list(range(1, 21)) and all("loss" in r for r in train["instruct"])
    assert [r["step"] for r in evals["instruct"]] == [5, 10, 15, 20] and "align" not in evals
