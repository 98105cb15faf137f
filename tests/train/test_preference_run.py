"""A preference stage through the real command, on 2 ZeRO-3 ranks: with a frozen reference copy and with LoRA
adapters switched off as the reference, killed with -9 mid-stage and resumed to the uninterrupted run's losses."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.train.conftest import losses, torchrun

pytestmark = pytest.mark.slow  # whole trainings on two ranks, killed and resumed

MPO_RECIPE = REPO / "recipes" / "tiny" / "asagi-mpo.yaml"
LORA = {"train": ["llm"], "lr": {"llm": 1.0e-3}, "lora": {"llm": {"rank": 4, "alpha": 8}},
        "preference": {"beta": 0.1, "loss": "sigmoid", "reference": "adapters"}}


def short_dpo_recipe(tmp_path, reference: str):
    """The tiny DPO recipe on 2 ranks under ZeRO-3: one step of each SFT stage, then 4 preference steps that
    checkpoint every 2; `reference`: copy (as shipped) or adapters (the stage trains the LLM through LoRA)."""
    recipe = yaml.safe_load(MPO_RECIPE.read_text())
    data = tmp_path / "shapes"
    recipe["synthesize"].update(out=str(data), samples=64, preferences=64)
    for stage, steps in zip(recipe["stages"], (1, 1, 4)):
        stage.update(steps=steps, zero_stage=3, global_batch_size=8, micro_batch_size=4, data_workers=1)
        for source in stage["data"]:
            source["shards"] = source["shards"].replace("data/tiny-shapes-prefs", str(data))
    recipe["stages"][2].update(save_every=2, **(LORA if reference == "adapters" else {}))
    if reference == "copy":  # periodic eval in lockstep on both ranks: the chosen answers' loss on held-out pairs
        recipe["stages"][2].update(eval_every=2, eval_samples=4, eval_generate=0,
                                   eval_data=[{"shards": str(data / "prefs-*.tar"), "task": "preference"}])
    path = tmp_path / f"dpo-{reference}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reference", ["copy", "adapters"])
def test_a_two_rank_zero3_preference_stage_resumes_after_kill9_to_the_uninterrupted_losses(reference,
                                                                                             tmp_path_factory):
    recipe = short_dpo_recipe(tmp_path_factory.mktemp("recipe"), reference)
    whole, run = tmp_path_factory.mktemp("whole") / "run", tmp_path_factory.mktemp("killed") / "run"
    result = torchrun(recipe, whole, "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    first = next(r for r in metrics(whole) if r["stage"] == "prefer")
    # the policy starts as its reference: each log-ratio 0, so DPO's term is log 2 and BCO pair's 2 log 2
    assert first["loss/preference"] == pytest.approx(0.693147, abs=1e-5)
    assert first["loss/quality"] == pytest.approx(2 * 0.693147, abs=1e-5)
    assert first["loss"] == pytest.approx(0.8 * 0.693147 + 0.2 * 2 * 0.693147 + first["loss/generation"], rel=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= first.keys()

    killed = torchrun(recipe, run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "after_step:prefer:3"})
    assert killed.returncode != 0
    resumed = torchrun(recipe, run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    got, want = losses(run), losses(whole)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    weights, expected = (load_file(r / "stages" / "03-prefer" / "model.safetensors") for r in (run, whole))
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in expected)
    if reference == "copy":
        assert [r["step"] for r in metrics(whole) if r.get("kind") == "eval"] == [2, 4]
    if reference == "adapters":  # trained through adapters, merged into plain weights; the adapters saved beside
        assert not any("lora_" in name for name in weights)
        assert (run / "stages" / "03-prefer" / "adapters" / "adapter_model.safetensors").is_file()
