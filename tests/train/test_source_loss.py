"""The loss per source (train/models/base.py: lm_loss_sum with SourceTokens; train/engine.py: PerSource): the step's
loss and gradients are bit-identical with and without it (loss_weight 1), the sources' token-weighted mean is the
step's loss, and a source's loss_weight makes the step loss a weighted token mean."""

import copy
import json

import pytest
import torch

from tests.train.conftest import make_stage, random_batch
from train.engine import train_stage
from train.hooks import stage_hooks
from train.models.llava import LLAVA, LlavaForTraining
from train.models.loss import SourceTokens
from train.recipe import DataSource
from train.reporting import MetricsLog


def two_source_batch(seed: int, rows: int = 2, length: int = 40) -> dict:
    """random_batch with the first half of each row's positions from source 0, the rest from source 1."""
    batch = random_batch(torch.Generator().manual_seed(seed), rows, length, 17)
    sources = torch.zeros_like(batch["labels"])
    sources[:, length // 2:] = 1
    return {**batch, "label_sources": sources}


def forward_backward(model, batch, loss, sources=None):
    model.llava.kakehashi_loss = loss
    model.zero_grad(set_to_none=True)
    outputs = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"],
                    sources=sources)
    (outputs[0] / outputs[1]).backward()
    return outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", [("chunked", 7), ("chunked", 4096), ("full", 0)])
def test_per_source_sums_leave_the_loss_and_gradients_bit_identical(tiny_model, loss):
    model = LlavaForTraining(tiny_model)
    batch = two_source_batch(0)
    (total, count), grads = forward_backward(model, batch, loss)
    (total_s, count_s, per_source), grads_s = forward_backward(model, batch, loss,
                                                              SourceTokens(batch["label_sources"], 2))
    assert torch.equal(total, total_s) and torch.equal(count, count_s)
    assert grads.keys() == grads_s.keys() and all(torch.equal(grads[n], grads_s[n]) for n in grads)
    assert per_source.dtype == torch.float64 and per_source.shape == (2,) and not per_source.requires_grad
    assert per_source.sum().item() == pytest.approx(total.item(), rel=1e-6)
    targets = batch["labels"][:, 1:] != -100
    first = (batch["label_sources"][:, 1:] == 0) & targets
    assert int(first.sum()) > 0 and int((~first & targets).sum()) > 0  # both sources have targets


def test_loss_weight_makes_the_loss_a_weighted_token_sum(tiny_model):
    model = LlavaForTraining(tiny_model)
    batch = two_source_batch(1)
    (_, _, per_source), _ = forward_backward(model, batch, ("chunked", 7), SourceTokens(batch["label_sources"], 2))
    weights = torch.tensor([0.5, 2.0])
    (weighted, _, per_source_w), _ = forward_backward(model, batch, ("chunked", 7),
                                                      SourceTokens(batch["label_sources"], 2, weights))
    assert torch.equal(per_source, per_source_w)  # the per-source figures stay unweighted
    assert weighted.item() == pytest.approx((per_source * weights.double()).sum().item(), rel=1e-6)


def run_stage(model, tmp_path, batches, **stage_fields):
    stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-3, "llm": 1e-3}, steps=2, zero_stage=2,
                       data=[DataSource(shards="a.tar", task="caption", name="ja"),
                             DataSource(shards="b.tar", task="vqa", name="en", **stage_fields)])
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    train_stage(LLAVA, model, stage, iter(batches), rank=0, world_size=1,
                hooks=stage_hooks(stage, rank=0, metrics=metrics))
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_a_steps_record_carries_each_sources_loss_and_the_losses_are_todays(world, tiny_model, tmp_path):
    batches = [two_source_batch(seed) for seed in range(4)]
    plain = [{k: v for k, v in b.items() if k != "label_sources"} for b in batches]
    (tmp_path / "today").mkdir()
    (tmp_path / "sources").mkdir()
    today = run_stage(copy.deepcopy(tiny_model), tmp_path / "today", plain)
    records = run_stage(tiny_model, tmp_path / "sources", batches)
    assert [r["loss"] for r in records] == [r["loss"] for r in today]  # bit for bit (JSON keeps every digit)
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in today]
    for record in records:
        tokens = {name: record[f"target_tokens/{name}"] for name in ("ja", "en")}
        assert sum(tokens.values()) == record["target_tokens"]
        mean = sum(record[f"loss/{name}"] * n for name, n in tokens.items()) / record["target_tokens"]
        assert mean == pytest.approx(record["loss"], abs=1e-6)


def test_a_sources_loss_weight_weights_the_step_loss(world, tiny_model, tmp_path):
    (record, _) = run_stage(tiny_model, tmp_path, [two_source_batch(seed) for seed in range(4)], loss_weight=3.0)
    tokens = {name: record[f"target_tokens/{name}"] for name in ("ja", "en")}
    weighted = (record["loss/ja"] * tokens["ja"] + 3.0 * record["loss/en"] * tokens["en"]) / (tokens["ja"]
                                                                                                + 3 * tokens["en"])
    assert record["loss"] == pytest.approx(weighted, rel=1e-6)
    assert record["target_tokens"] == sum(tokens.values())


@pytest.mark.parametrize("change, problem", [
    (lambda r: r["stages"][1]["data"][0].update(loss_weight=0), "stages.1.data.0.loss_weight: Input should be greater than 0"),
    (lambda r: r["stages"][1]["data"][0].update(task="documents"), "stages.1.data.0.task: unknown task 'documents'; "
                                                                   "known: caption, vqa, interleaved"),
])
def test_the_recipe_names_a_bad_source_field(change, problem):
    import yaml

    from tests.conftest import TINY_RECIPE
    from train.recipe import RecipeError, parse_recipe

    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    change(recipe)
    with pytest.raises(RecipeError) as error:
        parse_recipe(yaml.safe_dump(recipe, allow_unicode=True), check_files=False)
    assert problem in str(error.value)
