"""Elastic resume: a checkpoint saved on 2 ranks resumes on 1 and one saved on 1 resumes on 2, with the weights, fp32
master weights, AdamW moments and step, learning-rate schedule and data position carried over: ZeRO-3, and fp32
ZeRO-2, which runs as ZeRO-0 on one rank (AdamW's per-parameter state there, flat partitions on 2 ranks).

What a resumed engine holds is compared with what the saving engine held at the checkpoint's step, both read through
DeepSpeed's own gathers (GatheredParameters, safe_get_full_fp32_param / safe_get_full_optimizer_state), not through
the checkpoint files the resume reads."""

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RECIPE, kakehashi
from tests.ranks import run_on_ranks
from tests.train.conftest import IMAGE_TOKEN_ID, VOCAB, losses, random_batch, short_recipe, torchrun
from train.hooks import Hook

pytestmark = pytest.mark.slow  # DeepSpeed engines on 1 and 2 ranks, and whole runs killed and resumed

# ZeRO-3 on the tiny model, every component trained but the first vision block (frozen parameters must come back
# from the checkpoint too), a vision MLP width of 127 (odd sizes: the last rank's partition is padded), warmup over
# half the stage (the learning rate changes every step), 2 rows per micro-batch: 1 micro-batch per step on 2 ranks,
# 2 on 1 rank.
OVERRIDES = [
    "model.vision_encoder.config.intermediate_size=127",
    "stages.1.steps=6", "stages.1.save_every=2", "stages.1.warmup_ratio=0.5",
    "stages.1.global_batch_size=4", "stages.1.micro_batch_size=2",
    "stages.1.train=[vision_encoder, projector, llm]", "stages.1.vision_encoder_last_blocks=1",
    "stages.1.lr={vision_encoder: 1.0e-3, projector: 1.0e-3, llm: 1.0e-3}",
]


def snapshot(ctx) -> dict:
    """Everything a resume must carry, gathered whole (collective: every rank calls it; rank 0's copy is kept)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = ctx.engine
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps AdamW; fp32 ZeRO-0 steps it itself
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link each parameter to its AdamW moments once, right after the first group's first step, when the
        # other groups have no moments yet (so safe_get_full_optimizer_state finds none for them): link them again
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    weights, masters, moments = {}, {}, {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            weights[name] = param.detach().clone()
        if param.requires_grad:
            zero = adam is not engine.optimizer
            masters[name] = (safe_get_full_fp32_param(param) if zero else param.detach()).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                moment = safe_get_full_optimizer_state(param, key) if zero else adam.state[param][key]
                moments[f"{name}:{key}"] = moment.clone()
    adam_steps = sorted({float(state["step"]) for state in adam.state.values()})
    return {"weights": weights, "masters": masters, "moments": moments, "adam_steps": adam_steps,
            "lrs": [group["lr"] for group in engine.optimizer.param_groups],
            "last_epoch": engine.lr_scheduler.last_epoch, "global_steps": engine.global_steps,
            "micro_batches_read": ctx.batches.consumed * ctx.world_size}


class Enough(Exception):
    """Raised on every rank at the same step once a run has trained as far as a test needs."""


class Capture(Hook):
    """Snapshots right after the resume (`resumed`) and after the listed steps; stops the stage after `last`."""

    def __init__(self, steps, last):
        self.steps, self.last, self.taken = steps, last, {}

    def start_stage(self, ctx):
        if ctx.start_step:
            self.taken["resumed"] = {**snapshot(ctx), "start_step": ctx.start_step}

    def after_step(self, ctx, result):
        assert result.applied and result.loss == result.loss, result
        if result.step in self.steps:
            self.taken[result.step] = snapshot(ctx)
        if result.step == self.last:
            raise Enough


def train_on_ranks(rank, world_size, out, resume_from, seed, steps, last, precision="fp32", zero_stage=3):
    """Stage 2 of the tiny recipe (OVERRIDES), checkpoints under `out`; the model is initialised from
    `seed`, so whatever a resumed run holds came from the checkpoint. Rank 0 writes the snapshots to `out`/captured.pt
    (tensors do not outlive a spawned process through its result queue) and returns that path."""
    from train.engine import train_stage
    from train.hooks import Checkpoints
    from train.models.llava import LLAVA
    from train.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, [*OVERRIDES, f"stages.1.precision={precision}",
                                       f"stages.1.zero_stage={zero_stage}"], check_files=False)
    torch.manual_seed(seed)
    model = LLAVA.build(recipe.model, LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID}))
    batches = [random_batch(torch.Generator().manual_seed(1000 * rank + i), 2, 40, 20) for i in range(16)]
    capture = Capture(steps, last)
    try:
        train_stage(LLAVA, model, recipe.stages[1], iter(batches), rank=rank, world_size=world_size,
                    hooks=[Checkpoints(Path(out), keep_last=3), capture],
                    resume_from=Path(resume_from) if resume_from else None)
    except Enough:
        pass
    if rank:
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(capture.taken, Path(out) / "captured.pt")
    return str(Path(out) / "captured.pt")


def captured(out) -> dict:
    return torch.load(out, weights_only=True)


def assert_carried(resumed: dict, saved: dict, step: int):
    assert resumed["start_step"] == step and resumed["global_steps"] == step
    assert resumed["adam_steps"] == saved["adam_steps"] == [float(step)]
    assert resumed["last_epoch"] == saved["last_epoch"] == step
    assert resumed["lrs"] == saved["lrs"]
    assert resumed["micro_batches_read"] == saved["micro_batches_read"] == 2 * step  # 4 rows a step, 2 per micro-batch
    for part in ("weights", "masters", "moments"):
        assert resumed[part].keys() == saved[part].keys(), part
        for key, value in saved[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    assert any(value.abs().sum() > 0 for value in saved["moments"].values())
    frozen = saved["weights"].keys() - saved["masters"].keys()
    assert any("vision_tower" in name and ".layers.0." in name for name in frozen)  # the first vision block
    for names in (saved["masters"], frozen):  # sizes that leave the last of 2 partitions padded, trained and frozen
        assert any(saved["weights"][name].numel() % 2 for name in names)


def test_a_zero3_checkpoint_resumes_from_two_ranks_on_one_and_from_one_on_two(tmp_path):
    """Stage of 6 steps: 2 ranks train steps 1-2 and save; 1 rank resumes, trains steps 3-4 and saves; 2 ranks
    resume and train step 5."""
    two = captured(run_on_ranks(train_on_ranks, str(tmp_path / "two"), None, 0, (2,), 2, world_size=2)[0])
    one = captured(run_on_ranks(train_on_ranks, str(tmp_path / "one"), str(tmp_path / "two" / "step-0000002"), 1,
                                (4,), 4, world_size=1)[0])
    assert_carried(one["resumed"], two[2], step=2)  # 2 -> 1
    back = captured(run_on_ranks(train_on_ranks, str(tmp_path / "back"), str(tmp_path / "one" / "step-0000004"), 2,
                                 (), 5, world_size=2)[0])
    assert_carried(back["resumed"], one[4], step=4)  # 1 -> 2


def test_an_fp32_zero2_checkpoint_resumes_from_two_ranks_on_one_as_zero0_and_back(tmp_path):
    """fp32 ZeRO-2 on one rank runs as ZeRO-0 (train/stages.py zero_stage_on): 2 ranks' flat partitions become
    AdamW's per-parameter state on 1 rank, and that state becomes 2 ranks' partitions again."""
    two = captured(run_on_ranks(train_on_ranks, str(tmp_path / "two"), None, 0, (2,), 2, "fp32", 2, world_size=2)[0])
    one = captured(run_on_ranks(train_on_ranks, str(tmp_path / "one"), str(tmp_path / "two" / "step-0000002"), 1,
                                (4,), 4, "fp32", 2, world_size=1)[0])
    assert_carried(one["resumed"], two[2], step=2)  # 2 -> 1
    assert not list((tmp_path / "one" / "step-0000004").glob("*optim_states.pt"))  # saved in ZeRO-0's layout
    back = captured(run_on_ranks(train_on_ranks, str(tmp_path / "back"), str(tmp_path / "one" / "step-0000004"), 2,
                                 (), 5, "fp32", 2, world_size=2)[0])
    assert_carried(back["resumed"], one[4], step=4)  # 1 -> 2


def test_a_bf16_zero3_checkpoint_resumes_from_two_ranks_on_one(tmp_path):
    """bf16: DeepSpeed names the optimizer files bf16_zero_pp_rank_*; the bf16 weights are the fp32 masters cast."""
    two = captured(run_on_ranks(train_on_ranks, str(tmp_path / "two"), None, 0, (2,), 2, "bf16", world_size=2)[0])
    assert sorted(p.name for p in (tmp_path / "two" / "step-0000002").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    one = captured(run_on_ranks(train_on_ranks, str(tmp_path / "one"), str(tmp_path / "two" / "step-0000002"), 1,
                                (), 3, "bf16", world_size=1)[0])
    assert_carried(one["resumed"], two[2], step=2)
    assert {value.dtype for value in two[2]["weights"].values()} == {torch.bfloat16}


def test_zero3_runs_resume_on_another_world_size_through_the_command_and_export(tmp_path):
    """1 rank killed after step 3 -> 2 ranks resume from step 2, killed after step 5 -> 1 rank resumes from step 4
    and finishes the run with its export."""
    recipe = short_recipe(tmp_path, zero_stage=3, steps=(2, 6), save_every=2)
    run = tmp_path / "run"
    killed = kakehashi("train", recipe, "--output", run, "--no-export",
                       env={"KAKEHASHI_FAULT_KILL": "after_step:instruct:3"})
    assert killed.returncode == -9, killed.stderr[-3000:]

    grown = torchrun(recipe, run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "after_step:instruct:5"})
    assert grown.returncode != 0
    assert "saved on 1 ranks; resuming on 2" in grown.stderr and "at step 2" in grown.stderr, grown.stderr[-3000:]
    assert (run / "checkpoints" / "02-instruct" / "latest").read_text().strip() == "step-0000004"

    shrunk = kakehashi("train", recipe, "--output", run)
    assert shrunk.returncode == 0, shrunk.stderr[-3000:]
    assert "saved on 2 ranks; resuming on 1" in shrunk.stderr and "at step 4" in shrunk.stderr
    assert (run / "export" / "config.json").is_file() and (run / "export" / "model.safetensors").is_file()
    assert sorted(step for stage, step in losses(run) if stage == "instruct") == [1, 2, 3, 4, 5, 6]
