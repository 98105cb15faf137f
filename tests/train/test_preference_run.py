"""A preference stage through the real command, on 2 ZeRO-3 ranks, with each way of holding the reference: a frozen
copy, LoRA adapters switched off, log-probabilities from a first pass; killed with -9 mid-stage and resumed to the
uninterrupted run's losses and weights."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.train.conftest import losses, torchrun

pytestmark = pytest.mark.slow  # whole trainings on two ranks, killed and resumed

MPO_RECIPE = REPO / "recipes" / "tiny" / "asagi-mpo.yaml"
LORA = {"train": ["llm"], "lr": {"llm": 1.0e-3}, "lora": {"llm": {"rank": 4, "alpha": 8}}}


def short_mpo_recipe(tmp_path, reference: str):
    """The tiny MPO recipe on 2 ranks under ZeRO-3: one step of each SFT stage, then 4 preference steps that
    checkpoint every 2, with periodic eval on held-out pairs (the chosen answers' loss) at steps 2 and 4;
    `reference`: copy (as shipped), precomputed, or adapters (the stage then trains the LLM through LoRA)."""
    recipe = yaml.safe_load(MPO_RECIPE.read_text())
    data = tmp_path / "shapes"
    recipe["synthesize"].update(out=str(data), samples=64, preferences=64)
    for stage, steps in zip(recipe["stages"], (1, 1, 4)):
        stage.update(steps=steps, zero_stage=3, global_batch_size=8, micro_batch_size=4, data_workers=1)
        for source in stage["data"]:
            source["shards"] = source["shards"].replace("data/tiny-shapes-prefs", str(data))
    prefer = recipe["stages"][2]
    prefer.update(save_every=2, eval_every=2, eval_samples=4, eval_generate=0,
                  eval_data=[{"shards": str(data / "prefs-*.tar"), "task": "preference"}])
    prefer["preference"]["reference"] = reference
    if reference == "adapters":
        prefer.update(LORA)
    path = tmp_path / f"mpo-{reference}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def whole_run(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    result = torchrun(recipe, run, "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def killed_and_resumed(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("killed") / "run"
    killed = torchrun(recipe, run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "after_step:prefer:3"})
    assert killed.returncode != 0
    resumed = torchrun(recipe, run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    return run, resumed


def assert_same_run(run, whole):
    got, want = losses(run), losses(whole)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    weights, expected = (load_file(r / "stages" / "03-prefer" / "model.safetensors") for r in (run, whole))
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in expected)


@pytest.fixture(scope="module")
def with_copy(tmp_path_factory):
    """The uninterrupted run with a frozen reference copy."""
    return whole_run(short_mpo_recipe(tmp_path_factory.mktemp("recipe"), "copy"), tmp_path_factory)


def test_a_preference_stage_starts_at_its_reference_and_logs_trls_metrics(with_copy):
    first = next(r for r in metrics(with_copy) if r["stage"] == "prefer")
    # the policy starts as its reference: each log-ratio 0, so DPO's term is log 2 and BCO pair's 2 log 2
    assert first["loss/preference"] == pytest.approx(0.693147, abs=1e-5)
    assert first["loss/quality"] == pytest.approx(2 * 0.693147, abs=1e-5)
    assert first["loss"] == pytest.approx(0.8 * 0.693147 + 0.2 * 2 * 0.693147 + first["loss/generation"], rel=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= first.keys()
    assert [r["step"] for r in metrics(with_copy) if r.get("kind") == "eval"] == [2, 4]
    last = [r for r in metrics(with_copy) if r["stage"] == "prefer" and "kind" not in r][-1]
    assert last["rewards/chosen"] != 0 and last["rewards/margins"] != 0  # the policy moved; the reference did not


def test_with_a_reference_copy_kill9_and_resume_give_the_uninterrupted_run(with_copy, tmp_path_factory):
    run, _ = killed_and_resumed(short_mpo_recipe(tmp_path_factory.mktemp("recipe"), "copy"), tmp_path_factory)
    assert_same_run(run, with_copy)


def test_precomputed_reference_logps_train_as_the_copy_does_and_are_reused_on_resume(with_copy, tmp_path_factory):
    """The first pass's table stands in for the copy exactly (the same losses and weights as the copy's run), is
    stored per rank, and a resumed run reads it instead of passing over the data again."""
    run, resumed = killed_and_resumed(short_mpo_recipe(tmp_path_factory.mktemp("recipe"), "precomputed"),
                                      tmp_path_factory)
    tables = sorted((run / "checkpoints" / "03-prefer" / "reference-logps").iterdir())
    assert [t.name for t in tables] == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    assert load_file(tables[0])["logps"].shape == (4, 8)  # 4 micro-batches of 4 pairs: 8 rows
    assert "reference log-probabilities read from" in resumed.stderr and "reference pass" not in resumed.stderr
    assert_same_run(run, with_copy)


def test_with_adapters_as_the_reference_kill9_and_resume_give_the_uninterrupted_run(tmp_path_factory):
    recipe = short_mpo_recipe(tmp_path_factory.mktemp("recipe"), "adapters")
    whole = whole_run(recipe, tmp_path_factory)
    assert next(r for r in metrics(whole) if r["stage"] == "prefer")["loss/preference"] == pytest.approx(0.693147,
                                                                                                          abs=1e-5)
    last = [r for r in metrics(whole) if r["stage"] == "prefer" and "kind" not in r][-1]
    assert last["rewards/margins"] != 0  # with the adapters off, the reference is not the policy
    run, _ = killed_and_resumed(recipe, tmp_path_factory)
    assert_same_run(run, whole)
    weights = load_file(run / "stages" / "03-prefer" / "model.safetensors")
    assert not any("lora_" in name for name in weights)  # merged into plain weights, the adapters saved beside
    assert (run / "stages" / "03-prefer" / "adapters" / "adapter_model.safetensors").is_file()
