"""The engine on real DeepSpeed (one gloo rank in-process): freeze plans and loss normalisation."""

import copy
import json

import pytest
import torch

from tests.train.conftest import make_stage, random_batch
from train.engine import consolidated_state_dict, train_stage
from train.hooks import stage_hooks
from train.models.llava import LLAVA, LlavaForTraining
from train.reporting import MetricsLog


def snapshot(model):
    return {c: {n: p.detach().clone() for n, p in ps} for c, ps in LLAVA.component_parameters(model).items()}


@pytest.mark.parametrize("trained, zero_stage", [(["projector"], 2), (["llm"], 0), (["vision_encoder", "projector"], 3)])
def test_frozen_weights_are_bit_identical_after_a_stage(world, tiny_model, trained, zero_stage):
    rank, world_size = world
    before = snapshot(tiny_model)
    generator = torch.Generator().manual_seed(1)
    batches = iter([random_batch(generator, 2, 40, 20) for _ in range(4)])
    stage = make_stage(train=trained, lr={c: 1e-2 for c in trained}, zero_stage=zero_stage)
    engine, summary = train_stage(LLAVA, tiny_model, stage, batches, rank=rank, world_size=world_size)
    after = consolidated_state_dict(LLAVA, engine, rank)
    for component, params in before.items():
        changed = [name for name, value in params.items() if not torch.equal(after[name], value)]
        if component in trained:
            assert changed, f"{component} was trained but no weight moved"
        else:
            assert not changed, f"{component} is frozen but {changed[:3]} changed"
    assert summary.trainable[trained[0]] > 0 and all(summary.trainable[c] == 0 for c in summary.frozen if c not in trained)


def test_loss_is_normalised_over_all_target_tokens_of_the_step(world, tiny_model, tmp_path):
    """Two micro-batches with 10x different target counts: the step's gradient is that of sum(token losses) / N."""
    rank, world_size = world
    generator = torch.Generator().manual_seed(2)
    few, many = random_batch(generator, 2, 40, 36), random_batch(generator, 2, 40, 17)
    assert many["num_target_tokens"] > 5 * few["num_target_tokens"]

    reference = LlavaForTraining(copy.deepcopy(tiny_model))
    total = few["num_target_tokens"] + many["num_target_tokens"]
    per_token, per_batch = 0.0, 0.0
    for batch in (few, many):
        loss_sum, count = reference(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"])
        per_token = per_token + loss_sum / total
        per_batch = per_batch + loss_sum / count / 2
    trained = [p for n, p in reference.named_parameters() if "multi_modal_projector" in n or "language_model" in n or "lm_head" in n]

    def norm_of(loss):
        grads = torch.autograd.grad(loss, trained, retain_graph=True)
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))

    expected_norm, mean_of_means_norm = norm_of(per_token).item(), norm_of(per_batch).item()
    assert abs(expected_norm - mean_of_means_norm) / expected_norm > 0.01  # the test can tell them apart

    stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-3, "llm": 1e-3}, steps=1,
                       max_grad_norm=1e9, zero_stage=2)
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    train_stage(LLAVA, tiny_model, stage, iter([few, many]), rank=rank, world_size=world_size,
                hooks=stage_hooks(stage, rank=rank, metrics=metrics))
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["loss"] == pytest.approx(per_token.item(), rel=1e-5)
    assert record["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
    assert record["target_tokens"] == total


def test_fp32_zero1_and_zero2_run_as_zero0_on_one_rank_only():
    """Partitioning over one rank saves nothing and copies every gradient and weight (train/stages.py)."""
    from train.stages import resolve_stage

    def run_as(world_size, **fields):
        config = resolve_stage(make_stage(**fields), world_size).deepspeed_config()
        return config["zero_optimization"]["stage"], config["gradient_clipping"]

    assert run_as(1, zero_stage=2) == run_as(1, zero_stage=1) == (0, 0.0)  # the optimizer clips (GuardedAdamW)
    assert run_as(2, zero_stage=2) == (2, 1.0)
    assert run_as(1, zero_stage=2, precision="bf16") == (2, 1.0)  # DeepSpeed's ZeRO-0 bf16 keeps flat copies too
    assert run_as(1, zero_stage=3) == (3, 1.0)
    assert run_as(1, zero_stage=0) == (0, 0.0)


def test_the_guarded_optimizer_clips_with_the_norm_it_reports():
    from train.stages import GuardedAdamW

    torch.manual_seed(0)
    layer, twin = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    twin.load_state_dict(layer.state_dict())
    for module in (layer, twin):
        (module(torch.randn(3, 8, generator=torch.Generator().manual_seed(1))) * 100).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    reference = torch.optim.AdamW(twin.parameters(), lr=0.1)
    reference.step()
    guarded = GuardedAdamW(layer.parameters(), lr=0.1, max_grad_norm=0.5)
    guarded.step()
    assert expected > 0.5 and guarded._global_grad_norm == pytest.approx(float(expected), rel=1e-6)
    assert not guarded.overflow
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(layer.parameters(), twin.parameters()))
