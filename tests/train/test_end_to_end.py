"""The tiny recipe end to end through the real command, then its export through plain transformers only."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_RECIPE, kakehashi

pytestmark = pytest.mark.slow  # whole trainings through the real command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")  # the recipe's relative data path lands here
    result = kakehashi("train", TINY_RECIPE, "--output", workdir / "run", cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, workdir / "run", result.stdout


def test_every_stage_runs_and_reports(tiny_run):
    _, run, stdout = tiny_run
    assert "stage 1/2 align: 60 steps" in stdout and "stage 2/2 instruct: 300 steps" in stdout
    summaries = [json.loads((run / "stages" / d / "summary.json").read_text()) for d in ("01-align", "02-instruct")]
    assert summaries[0]["trainable"]["llm"] == 0 and summaries[1]["trainable"]["llm"] > 0
    assert summaries[1]["final_loss"] < 0.5 * summaries[1]["first_loss"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records].count("instruct") == 300
    assert {"stage", "step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[-1])


def test_export_answers_the_colour_question_with_plain_transformers(tiny_run):
    from train.shapes_eval import shapes_accuracy

    report = shapes_accuracy(tiny_run[1] / "export", samples=100, seed=2024)
    assert report["colour_accuracy"] >= 0.9, report


def test_export_logits_equal_the_training_model(tiny_run):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from data_pipelines.synthetic.synth import draw_shape
    from train.models.llava import LLAVA, LlavaForTraining
    from train.recipe import load_recipe

    _, run, _ = tiny_run
    exported = LlavaForConditionalGeneration.from_pretrained(run / "export").eval()
    processor = AutoProcessor.from_pretrained(run / "export")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "この図形は何色ですか？"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("### 指示:\n<image>\nこの図形は何色ですか？\n\n### 応答:\n")
    import random

    image = draw_shape(random.Random(7), "円", "赤")
    inputs = processor(images=[image], text=prompt, return_tensors="pt")

    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    trained = LLAVA.build(recipe.model, exported.config, load_weights=False)
    trained.load_state_dict(load_file(run / "stages" / "02-instruct" / "model.safetensors"))
    with torch.no_grad():
        expected = LlavaForTraining(trained).eval().logits(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        actual = exported(**inputs).logits
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()


def test_rerun_skips_finished_stages_and_keeps_the_export(tiny_run):
    workdir, run, _ = tiny_run
    weights = (run / "export" / "model.safetensors").read_bytes()
    result = kakehashi("train", TINY_RECIPE, "--output", run, cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage 1/2 align: already complete" in result.stderr and "stage 2/2 instruct: already complete" in result.stderr
    assert (run / "export" / "model.safetensors").read_bytes() == weights


def test_a_different_recipe_is_refused_in_the_same_output(tiny_run):
    workdir, run, _ = tiny_run
    result = kakehashi("train", TINY_RECIPE, "--output", run, "--set", "stages.1.steps=5", cwd=workdir)
    assert result.returncode == 2 and "holds a run of a different recipe" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_command_for_any_finished_stage(tiny_run):
    workdir, run, _ = tiny_run
    out = workdir / "align-export"
    result = kakehashi("export", run, "--out", out, "--stage", "align")
    assert result.returncode == 0, result.stderr
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    stage_one = load_file(run / "stages" / "01-align" / "model.safetensors")
    name = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(model.state_dict()[name], stage_one[name])
    again = kakehashi("export", run, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_chat_command(tiny_run, tmp_path):
    import random

    from data_pipelines.synthetic.synth import draw_shape

    image_path = tmp_path / "blue.png"
    draw_shape(random.Random(3), "四角形", "青").save(image_path)
    result = kakehashi("chat", tiny_run[1] / "export", "--image", image_path, "--prompt", "この図形は何色ですか？")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("青色")


def test_training_survives_every_kind_of_bad_sample_and_reports_them(tmp_path):
    from data_pipelines.synthetic.testing import write_bad_shards
    from tests.train.conftest import short_recipe

    paths, expected = write_bad_shards(tmp_path / "bad", good=20, max_length=128, tokens_per_image=16)
    recipe = short_recipe(tmp_path, steps=(2, 8), stage_fields={"bad_sample_limit": 0.5})
    result = kakehashi("train", recipe, "--output", tmp_path / "run", "--no-export",
                       "--set", f"stages.1.data.1.shards={tmp_path / 'bad'}/bad-*.tar")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "stages" / "02-instruct" / "summary.json").read_text())
    assert summary["bad_samples"] >= sum(expected.values())  # at least one full pass over the bad shards
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(last["bad_samples"]) == set(expected), (last["bad_samples"], expected)
    assert f"{summary['bad_samples']} bad samples skipped" in result.stdout


def test_report_writes_plots_a_summary_and_the_export_has_a_model_card(tiny_run):
    from PIL import Image

    _, run, _ = tiny_run
    result = kakehashi("report", run)
    assert result.returncode == 0, result.stderr
    for stage in ("align", "instruct"):
        with Image.open(run / "report" / f"{stage}.png") as plot:
            assert plot.format == "PNG" and plot.width >= 500 and plot.height >= 400
            colours = plot.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 10  # lines and labels drawn, not a blank canvas
    summary = (run / "report" / "summary.md").read_text()
    assert "| align | projector | 60 |" in summary and "![instruct](instruct.png)" in summary
    card = (run / "export" / "README.md").read_text()
    assert "# tiny-asagi-2stage" in card and "**instruct**: trains projector, llm" in card
    assert kakehashi("report", run / "nope").returncode == 2


def test_eval_reports_loss_exact_match_rouge_and_the_judge(tiny_run):
    import threading
    from http.server import HTTPServer

    from tests.train.test_evaluate import StubJudge

    workdir, run, _ = tiny_run
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = kakehashi("eval", run / "export", "--data", workdir / "data/tiny-shapes/vqa-000005.tar",
                           "--max-samples", "30", "--json",
                           env={"KAKEHASHI_JUDGE_URL": f"http://127.0.0.1:{server.server_port}/v1"})
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["samples"] == 30 and report["vqa_samples"] >= 20
    assert 0 < report["loss"] < 2 and set(report["loss_by_source"]) == {"synth-shapes"}
    assert report["exact_match"] >= 0.5 and report["rouge_l_chars_f1"] >= report["exact_match"]
    assert report["judge"] == 8.0


def test_stages_chain_bit_exactly_and_frozen_components_never_move(tiny_run):
    """Stage 1 froze vision and LLM (bit-identical to the seeded init); stage 2 froze vision (identical again)."""
    from transformers import LlavaConfig

    from train.models.llava import LLAVA
    from train.recipe import load_recipe

    _, run, _ = tiny_run
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    torch.manual_seed(recipe.seed)  # as the run did before building stage 1's model
    initial = LLAVA.build(recipe.model, LlavaConfig.from_pretrained(run / "stages" / "01-align")).state_dict()
    align = load_file(run / "stages" / "01-align" / "model.safetensors")
    instruct = load_file(run / "stages" / "02-instruct" / "model.safetensors")
    names = {c: [n for n, _ in ps] for c, ps in LLAVA.component_parameters(LLAVA.build(
        recipe.model, LlavaConfig.from_pretrained(run / "stages" / "01-align"), load_weights=False)).items()}
    assert all(torch.equal(align[n], initial[n]) for n in names["vision_encoder"] + names["llm"])
    assert not all(torch.equal(align[n], initial[n]) for n in names["projector"])
    assert all(torch.equal(instruct[n], align[n]) for n in names["vision_encoder"])
    assert not all(torch.equal(instruct[n], align[n]) for n in names["llm"])
