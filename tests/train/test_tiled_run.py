"""The tiny tiled recipe through the real command on 2 ZeRO-3 ranks, packed: killed with -9 mid-stage and resumed
to the uninterrupted run's losses and weights; its export loads in plain transformers and answers through
shapes-eval."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

from tests.conftest import REPO, kakehashi
from tests.train.conftest import losses, torchrun

pytestmark = pytest.mark.slow  # whole trainings on two ranks, killed and resumed

TILED_RECIPE = REPO / "recipes" / "tiny" / "onevision-tiles.yaml"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """One align step, then 4 packed instruct steps that checkpoint every 2, on 2 ranks under ZeRO-3."""
    tmp = tmp_path_factory.mktemp("tiled")
    recipe = yaml.safe_load(TILED_RECIPE.read_text())
    out = recipe["synthesize"]["out"]
    recipe["synthesize"].update(out=str(tmp / "shapes"), samples=64, details=64)
    for stage, steps in zip(recipe["stages"], (1, 4)):
        stage.update(steps=steps, zero_stage=3, global_batch_size=8, micro_batch_size=4, data_workers=1,
                     save_every=2)
        for source in stage["data"]:
            source["shards"] = source["shards"].replace(out, str(tmp / "shapes"))
    path = tmp / "tiled.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def whole(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    result = torchrun(recipe, run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_kill9_and_resume_give_the_uninterrupted_tiled_run(recipe, whole, tmp_path):
    run = tmp_path / "run"
    killed = torchrun(recipe, run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "after_step:instruct:3"})
    assert killed.returncode != 0
    resumed = torchrun(recipe, run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    got, want = losses(run), losses(whole)
    assert got.keys() == want.keys() and len(want) == 5
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    weights, expected = (load_file(r / "stages" / "02-instruct" / "model.safetensors") for r in (run, whole))
    assert weights.keys() == expected.keys() and "model.image_newline" in weights
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in expected)


def test_the_tiled_export_loads_in_transformers_and_answers(whole):
    model = AutoModelForImageTextToText.from_pretrained(whole / "export")
    assert type(model) is LlavaOnevisionForConditionalGeneration
    stage = load_file(whole / "stages" / "02-instruct" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stage.items())
    result = kakehashi("shapes-eval", whole / "export", "--detail", "--samples", "3", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["images"] == "detail" and report["samples"] == 3 and 0 <= report["colour_accuracy"] <= 1
