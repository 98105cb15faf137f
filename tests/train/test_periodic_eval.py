"""Periodic evaluation inside training: eval records in metrics.jsonl and wandb, training unchanged by it."""

import json

import pytest
import yaml

from tests.conftest import kakehashi
from tests.train.conftest import losses, short_recipe, with_eval
from train.recipe import RecipeError, parse_recipe

EVAL_STEPS = (2, 4)


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short ZeRO-3 recipe twice: periodic eval (and offline wandb) in stage 2, and without."""
    results = {}
    for name in ("off", "on"):
        tmp = tmp_path_factory.mktemp(f"eval-{name}")
        recipe = short_recipe(tmp, zero_stage=3, steps=(2, 4), samples=100)
        env = {}
        if name == "on":
            with_eval(recipe)
            text = yaml.safe_load(recipe.read_text())
            text["wandb"] = {"project": "kakehashi-test"}
            recipe.write_text(yaml.safe_dump(text, allow_unicode=True))
            env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        result = kakehashi("train", recipe, "--output", tmp / "run", "--no-export", env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        results[name] = tmp / "run"
    return results


@pytest.mark.slow
def test_training_losses_are_identical_with_periodic_eval_on(runs):
    off, on = losses(runs["off"]), losses(runs["on"])
    assert len(off) == 6 and off == on  # exactly: eval neither draws from training's RNG nor moves a weight


@pytest.mark.slow
def test_eval_records_per_source_and_generation_metrics(runs):
    evals = [r for r in records(runs["on"]) if r.get("kind") == "eval"]
    assert [(r["stage"], r["step"]) for r in evals] == [("instruct", s) for s in EVAL_STEPS]
    for record in evals:
        assert set(record) >= {"eval_loss", "eval_loss/caption", "eval_loss/vqa", "eval_exact_match", "eval_rouge_l_chars_f1"}
        assert 0 < record["eval_loss/vqa"] < 20 and 0 < record["eval_loss/caption"] < 20
        assert record["eval_vqa_samples"] == 2 and 0 <= record["eval_rouge_l_chars_f1"] <= 1
    assert not [r for r in records(runs["off"]) if r.get("kind") == "eval"]


@pytest.mark.slow
def test_eval_is_repeatable_on_the_same_weights(runs, tmp_path):
    """The eval set is fixed: evaluating the same weights twice gives the same record, and leaves the RNG alone."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from train.models.llava import LlavaForTraining
    from train.periodic_eval import build_periodic_eval
    from train.recipe import load_recipe

    run = runs["on"]
    recipe = load_recipe(run / "recipe.yaml", check_files=False)
    processor = LlavaProcessor.from_pretrained(run / "processor")
    llava = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(run / "stages" / "02-instruct"))
    llava.load_state_dict(load_file(run / "stages" / "02-instruct" / "model.safetensors"))
    evaluator = build_periodic_eval(recipe, 1, processor, rank=0, world_size=1)
    model = LlavaForTraining(llava).train()
    rng = torch.get_rng_state()
    first, second = evaluator.run(model, 4), evaluator.run(model, 4)
    assert first == second and torch.equal(rng, torch.get_rng_state()) and model.training
    logged = [r for r in records(run) if r.get("kind") == "eval"][-1]
    for key in ("eval_loss/caption", "eval_loss/vqa"):  # the engine's last eval saw these very weights
        assert first[key] == pytest.approx(logged[key], rel=1e-5)


@pytest.mark.slow
def test_wandb_gets_the_eval_metrics_and_a_table_of_generations(runs):
    offline = list((runs["on"] / "wandb").glob("offline-run-*"))
    tables = sorted(p for run in offline for p in run.glob("files/media/table/instruct/eval_generations_*.table.json"))
    assert len(tables) == len(EVAL_STEPS), [p.name for p in tables]
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "source", "key", "image", "question", "answer", "reference"]
    assert len(table["data"]) == 2
    step, source, _, image, question, _, reference = table["data"][0]
    assert step == EVAL_STEPS[-1] and source == "vqa" and image is not None
    assert question.startswith("この図形は") and reference.endswith("です。")


@pytest.mark.slow
@pytest.mark.parametrize("fields, message", [
    ({"eval_every": 5}, "eval_data is missing but eval_every is 5"),
    ({"eval_data": [{"shards": "x.tar", "task": "vqa"}]}, "eval_data is set but eval_every is 0"),
    ({"eval_every": -1}, "eval_every: Input should be greater than or equal to 0"),
])
def test_eval_fields_are_validated(tiny_recipe_text, fields, message):
    recipe = yaml.safe_load(tiny_recipe_text)
    recipe["stages"][1].update(fields)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(yaml.safe_dump(recipe, allow_unicode=True), check_files=False)
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_an_eval_source_without_a_usable_sample_is_a_one_line_error(runs):
    from transformers import LlavaProcessor

    from train.periodic_eval import build_periodic_eval
    from train.recipe import UsageError, load_recipe

    recipe = load_recipe(runs["on"] / "recipe.yaml", check_files=False)
    recipe.stages[1].eval_data[1].task = "caption"  # VQA shards read as a caption source: every sample mismatches
    with pytest.raises(UsageError, match=r"stage instruct: eval_data source 'caption1' .*vqa-\*\.tar\) has no usable caption sample"):
        build_periodic_eval(recipe, 1, LlavaProcessor.from_pretrained(runs["on"] / "processor"), rank=0, world_size=1)
