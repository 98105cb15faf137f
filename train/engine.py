"""One stage of training on a DeepSpeed engine: the train step reads top to bottom."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipelines.images import normalize
from train import checkpoint, distributed, faults, flops, preemption
from train.model import towers, training_module
from train.recipe import Stage, UsageError
from train.reporting import MetricsLog, Progress
from train.stages import apply_freeze_plan, build_optimizer

log = logging.getLogger(__name__)


@dataclass
class StageSummary:
    stage: str
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    samples: int
    tokens: int              # real (non-pad) tokens, all ranks
    bad_samples: int
    skipped_steps: int       # optimizer steps skipped for a non-finite loss or gradient
    trainable: dict
    frozen: dict


def deepspeed_config(stage: Stage, world_size: int) -> dict:
    per_step = stage.micro_batch_size * world_size
    if stage.global_batch_size % per_step:
        raise UsageError(
            f"stage {stage.name}: global_batch_size {stage.global_batch_size} is not a multiple of "
            f"micro_batch_size x ranks = {stage.micro_batch_size} x {world_size}"
        )
    zero = {"stage": stage.zero_stage}
    if stage.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.global_batch_size // per_step,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam would JIT-compile
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


def enable_fast_paths(llava, stage: Stage) -> None:
    """The stage's activation checkpointing (per component) and torch.compile of the LLM's decoder layers."""
    checkpointed = (["vision_encoder", "llm"] if stage.gradient_checkpointing is True
                    else stage.gradient_checkpointing or [])
    parts = towers(llava)
    for component in checkpointed:  # non-reentrant: works with frozen inputs and under ZeRO-3
        parts[component].activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if stage.compile:
        for layer in parts["llm"].layers:  # per block: the graphs stay small and ZeRO hooks stay outside
            layer.compile()


class NonFiniteLimit(Exception):
    """Too many optimizer steps in a row had a non-finite loss or gradient; the run stops without a checkpoint."""


EXIT_NONFINITE = 3
EXIT_BAD_DATA = 4  # more bad samples than the stage's bad_sample_limit


class BatchStream:
    """The loader's micro-batches, with a resumable position (the loader's own state when it has one)."""

    def __init__(self, loader):
        self.loader, self.iterator, self.consumed = loader, None, 0

    def __next__(self) -> dict:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        self.consumed += 1
        return next(self.iterator)

    def skip(self, count: int) -> None:
        for _ in range(count):
            next(self)

    def state_dict(self) -> dict:
        has_state = hasattr(self.loader, "state_dict")
        return {"consumed": self.consumed, "loader": self.loader.state_dict() if has_state else None}

    def load_state_dict(self, state: dict) -> None:
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
            self.iterator = None
        else:  # a loader without state: replay to the same position (exact, but decodes what it skips)
            self.skip(state["consumed"] - self.consumed)
        self.consumed = state["consumed"]


def train_stage(
    llava, stage: Stage, loader, metrics: MetricsLog | None, *, rank: int, world_size: int,
    checkpoint_dir: Path | None = None, resume_from: Path | None = None, keep_last: int = 2,
    max_nonfinite_steps: int = 3, bad_samples=lambda: {}, periodic_eval=None,
):
    """Train `llava` for one stage. Returns (engine, summary); the engine holds the (possibly sharded) weights."""
    import deepspeed

    if stage.lora_components():
        from train.lora import inject_adapters

        inject_adapters(llava, stage)
    freeze_table = apply_freeze_plan(llava, stage)
    flop_plan = flops.plan_flops(llava)  # from the freeze plan, before ZeRO-3 partitions the parameters
    image_token_id, vision_length = _image_token_and_vision_length(llava.config)
    enable_fast_paths(llava, stage)
    optimizer, scheduler = build_optimizer(llava, stage)
    config = deepspeed_config(stage, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=training_module(llava), optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    accumulation = config["gradient_accumulation_steps"]
    device = distributed.device()
    peak = flops.peak_flops(device)
    batches = BatchStream(loader)
    totals = {"first_loss": float("nan"), "samples": 0, "tokens": 0, "skipped_steps": 0, "seconds": 0.0}
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from, rank, world_size, stage.zero_stage)
        start_step, totals = state["step"], state["totals"]
        if state["world_size"] == world_size:
            batches.load_state_dict(state["data"])
        else:  # elastic: a new split of the data; carry over the number of samples consumed, not the order
            batches.skip(state["data"]["consumed"] * state["world_size"] // world_size)
        if rank == 0:
            print(f"  [{stage.name}] resumed from {resume_from} at step {start_step}", flush=True)
    nan_steps = faults.nan_steps(rank)
    progress = Progress(stage, enabled=rank == 0, initial=start_step)
    resumed_at = time.perf_counter() - totals["seconds"]
    loss, consecutive_skips = float("nan"), 0

    for step in range(start_step + 1, stage.steps + 1):
        step_start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accumulation)]
        # normalise over every target token of the optimizer step, on all ranks (not a mean of per-batch means)
        targets = distributed.all_reduce_sum(sum(b["num_target_tokens"] for b in micro_batches))
        scale = world_size * accumulation / max(targets, 1.0)  # DeepSpeed divides by both; undo it
        loss_sum = 0.0
        for batch in micro_batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "position_ids")
                      if k in batch}
            pixels = batch["pixel_values"]
            if pixels is not None:
                pixels = pixels.to(device, non_blocking=True)
                if pixels.dtype == torch.uint8:  # the loader's workers hand over uint8 at the model's input size
                    pixels = normalize(pixels, loader.image_mean, loader.image_std)
            extra = {"image_grid_thw": batch["image_grid_thw"].to(device)} if batch.get("image_grid_thw") is not None else {}
            micro_loss, _ = engine(**inputs, pixel_values=pixels, **extra)
            if step in nan_steps:
                micro_loss = micro_loss * float("nan")
            engine.backward(micro_loss * scale)
            engine.step()  # the optimizer runs at the accumulation boundary, unless a gradient is not finite
            loss_sum += micro_loss.item()
        loss = distributed.all_reduce_sum(loss_sum) / max(targets, 1.0)
        # real (non-pad) tokens, samples, padded positions and model FLOPs of the step, all ranks
        step_tokens, step_samples, step_positions, step_flops = distributed.all_reduce_sum([
            sum(int(b["attention_mask"].sum()) for b in micro_batches),
            sum(b.get("num_samples", b["input_ids"].shape[0]) for b in micro_batches),
            sum(b["attention_mask"].numel() for b in micro_batches),
            sum(flop_plan.step_flops(flops.batch_counts(b, image_token_id, vision_length)) for b in micro_batches),
        ])
        applied = engine.was_step_applied() and math.isfinite(loss)
        totals["samples"] += int(step_samples)
        totals["tokens"] += int(step_tokens)
        if step == 1:
            totals["first_loss"] = loss
        seconds = time.perf_counter() - step_start

        if applied:
            consecutive_skips = 0
        else:  # every rank saw the same non-finite flag (DeepSpeed all-reduces it), so all skipped this step
            consecutive_skips += 1
            totals["skipped_steps"] += 1
            log.warning("stage %s step %d: non-finite loss or gradient; optimizer step skipped (%d in a row)",
                        stage.name, step, consecutive_skips)
        if metrics is not None and (step % stage.log_every == 0 or step == stage.steps or not applied):
            grad_norm = engine.get_global_grad_norm()
            metrics.write({
                "stage": stage.name,
                "step": step,
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "lr_by_group": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "skipped": not applied,
                "target_tokens": int(targets),
                "tokens": int(step_tokens),
                "samples": int(step_samples),
                "seconds": seconds,
                "tokens_per_s": step_tokens / seconds,
                "samples_per_s": step_samples / seconds,
                "nonpad_fraction": step_tokens / step_positions,
                "tflops_per_device": step_flops / seconds / world_size / 1e12,
                "mfu": None if peak is None else step_flops / seconds / world_size / peak,
                "bad_samples": bad_samples(),  # {reason: count} on rank 0
            })
        if consecutive_skips >= max_nonfinite_steps:
            raise NonFiniteLimit(
                f"stage {stage.name}: {consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {step}); stopped without saving this state"
            )
        progress.update(step, loss)
        if periodic_eval is not None:  # train/periodic_eval.py: every rank joins, training's RNG untouched
            periodic_eval.maybe_run(engine, step)
        faults.maybe_kill("after_step", stage.name, step)
        stop = distributed.all_reduce_sum(preemption.stop_requested()) > 0  # every rank stops at the same step
        due = stage.save_every and step % stage.save_every == 0
        if checkpoint_dir is not None and step < stage.steps and consecutive_skips == 0 and (due or stop):
            totals["seconds"] = time.perf_counter() - resumed_at
            rank_state = {"data": batches.state_dict(), "totals": dict(totals)}
            checkpoint.save(engine, checkpoint_dir, step, rank_state, rank=rank, keep_last=keep_last, stage=stage.name)
        if stop and step < stage.steps:  # at a stage's last step the stage finishes; the next one stops at step 1
            if hasattr(loader, "close"):
                loader.close()  # stop the dataloader workers before Slurm's SIGTERM reaches them
            raise preemption.Preempted(f"stage {stage.name}: stopped at step {step} on request; checkpoint saved")
    progress.close()

    summary = StageSummary(
        stage=stage.name, steps=stage.steps, first_loss=totals["first_loss"], final_loss=loss,
        seconds=time.perf_counter() - resumed_at, samples=totals["samples"], tokens=totals["tokens"],
        bad_samples=int(distributed.all_reduce_sum(sum(bad_samples().values()))),
        skipped_steps=totals["skipped_steps"],
        trainable={c: r["trainable"] for c, r in freeze_table.items()},
        frozen={c: r["frozen"] for c, r in freeze_table.items()},
    )
    return engine, summary


def _image_token_and_vision_length(config) -> tuple[int, int | None]:
    """The image token id, and the vision tower's tokens per image when fixed (None: read from image_grid_thw)."""
    image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        image_token_id = config.image_token_id
    vision = getattr(config, "vision_config", None)
    fixed = vision is not None and hasattr(vision, "image_size") and hasattr(vision, "patch_size")
    return image_token_id, flops.vision_sequence_length(vision) if fixed else None


def consolidated_state_dict(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """Full weights of the wrapped LLaVA model on rank 0 (gathering ZeRO-3 shards one tensor at a time)."""
    import deepspeed

    llava = getattr(engine.module, "llava", engine.module)  # LlavaForTraining wraps; train.qwen2vl's model is itself
    parameters = dict(llava.named_parameters(remove_duplicate=False))
    state = {}
    for name, value in llava.state_dict().items():
        param = parameters.get(name)
        if param is None:
            state[name] = value.detach().cpu().clone()
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    return state if rank == 0 else None
