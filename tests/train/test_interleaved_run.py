"""The tiny interleaved recipe through the real command: a stage mixing captions, VQA and documents trains with
packing, logs each source's loss and the wsd schedule, resumes exactly after kill -9, and runs on 2 ranks under
ZeRO-3."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, kakehashi
from tests.train.conftest import losses, torchrun

pytestmark = pytest.mark.slow  # whole trainings

RECIPE = REPO / "recipes" / "tiny" / "asagi-interleaved.yaml"
SOURCES = ("captions", "vqa", "docs")


def short(tmp_path, steps=(2, 6), **stage_fields):
    """The tiny interleaved recipe, shortened, on a small synthetic set (captions, VQA, documents) in tmp_path."""
    recipe = yaml.safe_load(RECIPE.read_text())
    data = tmp_path / "shapes"
    recipe["synthesize"].update(out=str(data), samples=120, documents=120)
    for stage, n in zip(recipe["stages"], steps):
        stage.update(steps=n, save_every=2, **stage_fields)
        for source in stage["data"]:
            source["shards"] = source["shards"].replace("data/tiny-shapes-docs", str(data))
    path = tmp_path / "interleaved.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def records(run, stage="pretrain"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == stage and r.get("kind") != "eval"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return short(tmp_path_factory.mktemp("recipe"))


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = kakehashi("train", recipe, "--output", run, "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_the_mixed_stage_logs_each_sources_loss_and_the_wsd_rates(uninterrupted):
    steps = records(uninterrupted)
    assert [r["step"] for r in steps] == list(range(1, 7))
    for record in steps:
        present = [s for s in SOURCES if f"loss/{s}" in record]
        assert "docs" in present and len(present) >= 2  # packed rows of 128 tokens mix the sources
        mean = sum(record[f"loss/{s}"] * record[f"target_tokens/{s}"] for s in present) / record["target_tokens"]
        assert mean == pytest.approx(record["loss"], abs=1e-6)
    # warmup ceil(0.1 * 6) = 1 step, decay over the last ceil(0.2 * 6) = 2 steps, linear to 0
    assert [r["lr_by_group"]["llm"] for r in steps] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 0.0])


def test_kill9_then_resume_equals_the_uninterrupted_run(recipe, uninterrupted, tmp_path):
    run = tmp_path / "run"
    killed = kakehashi("train", recipe, "--output", run, "--no-export",
                       env={"KAKEHASHI_FAULT_KILL": "after_step:pretrain:5"})
    assert killed.returncode == -9
    resumed = kakehashi("train", recipe, "--output", run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stderr
    got, want = losses(run), losses(uninterrupted)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
    for step, expected in zip(records(run)[-2:], records(uninterrupted)[-2:]):
        assert all(step[f"loss/{s}"] == pytest.approx(expected[f"loss/{s}"], abs=1e-6)
                   for s in SOURCES if f"loss/{s}" in expected)
    weights = load_file(run / "stages" / "02-pretrain" / "model.safetensors")
    reference = load_file(uninterrupted / "stages" / "02-pretrain" / "model.safetensors")
    assert all(torch.allclose(weights[k], reference[k], atol=1e-6, rtol=0) for k in reference)


def test_the_report_plots_the_loss_per_source(uninterrupted):
    from train.report import read_metrics, training_panels

    panels = training_panels(read_metrics(uninterrupted)["pretrain"])
    assert [label for label, _ in panels][:3] == ["loss", "loss per source", "learning rate"]
    assert set(panels[1][1]) == set(SOURCES)
    result = kakehashi("report", uninterrupted)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(uninterrupted.rglob("pretrain.png"))


def test_two_ranks_under_zero3(tmp_path):
    recipe = short(tmp_path, steps=(1, 3), zero_stage=3)
    run = tmp_path / "run"
    result = torchrun(recipe, run, "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = records(run)
    assert len(steps) == 3 and all("loss/docs" in r for r in steps)
    for record in steps:
        present = [s for s in SOURCES if f"loss/{s}" in record]
        mean = sum(record[f"loss/{s}"] * record[f"target_tokens/{s}"] for s in present) / record["target_tokens"]
        assert mean == pytest.approx(record["loss"], abs=1e-6)
