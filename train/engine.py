"""One stage of training on a DeepSpeed engine: the train step reads top to bottom."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from train import distributed
from train.model import LlavaForTraining
from train.recipe import Stage, UsageError
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


class MetricsLog:
    """metrics.jsonl (rank 0), plus wandb when the recipe configures it."""

    def __init__(self, path: Path, wandb_run=None):
        self.path, self.wandb_run = path, wandb_run

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{record['stage']}/{k}": v for k, v in record.items() if k != "stage"})


class Progress:
    """A progress bar with loss and ETA on a terminal; a line every ~10% of the stage otherwise."""

    def __init__(self, stage: Stage, enabled: bool):
        self.stage, self.enabled, self.start = stage, enabled, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=stage.steps, desc=stage.name, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        every = max(1, self.stage.steps // 10)
        if step % every == 0 or step == self.stage.steps:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (self.stage.steps - step)
            print(f"  [{self.stage.name}] step {step}/{self.stage.steps}  loss {loss:.4f}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_stage(
    llava, stage: Stage, batches: Iterator[dict], metrics: MetricsLog | None, *, rank: int, world_size: int,
    checkpoint_dir: Path | None = None, bad_sample_count=lambda: 0,
):
    """Train `llava` for one stage. Returns (engine, summary); the engine holds the (possibly sharded) weights."""
    import deepspeed

    freeze_table = apply_freeze_plan(llava, stage)
    if stage.gradient_checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, scheduler = build_optimizer(llava, stage)
    config = deepspeed_config(stage, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=LlavaForTraining(llava), optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    accumulation = config["gradient_accumulation_steps"]
    device = distributed.device()
    progress = Progress(stage, enabled=rank == 0)
    start = time.perf_counter()
    first_loss = loss = float("nan")
    samples = tokens = 0

    for step in range(1, stage.steps + 1):
        step_start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accumulation)]
        # normalise over every target token of the optimizer step, on all ranks (not a mean of per-batch means)
        targets = distributed.all_reduce_sum(sum(b["num_target_tokens"] for b in micro_batches))
        scale = world_size * accumulation / max(targets, 1.0)  # DeepSpeed divides by both; undo it
        loss_sum = 0.0
        for batch in micro_batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            pixels = batch["pixel_values"]
            micro_loss, _ = engine(**inputs, pixel_values=None if pixels is None else pixels.to(device))
            engine.backward(micro_loss * scale)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            loss_sum += micro_loss.item()
        loss = distributed.all_reduce_sum(loss_sum) / max(targets, 1.0)
        step_tokens = distributed.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in micro_batches))
        step_samples = stage.global_batch_size
        samples += step_samples
        tokens += int(step_tokens)
        first_loss = loss if step == 1 else first_loss
        seconds = time.perf_counter() - step_start

        if metrics is not None and (step % stage.log_every == 0 or step == stage.steps):
            grad_norm = engine.get_global_grad_norm()
            metrics.write({
                "stage": stage.name,
                "step": step,
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "lr_by_group": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "target_tokens": int(targets),
                "tokens_per_s": step_tokens / seconds,
                "samples_per_s": step_samples / seconds,
            })
        progress.update(step, loss)
        if checkpoint_dir is not None and stage.save_every and step % stage.save_every == 0 and step < stage.steps:
            engine.save_checkpoint(str(checkpoint_dir), tag=f"step-{step:07d}")
    progress.close()

    summary = StageSummary(
        stage=stage.name, steps=stage.steps, first_loss=first_loss, final_loss=loss,
        seconds=time.perf_counter() - start, samples=samples, tokens=tokens,
        bad_samples=int(distributed.all_reduce_sum(bad_sample_count())),
        trainable={c: r["trainable"] for c, r in freeze_table.items()},
        frozen={c: r["frozen"] for c, r in freeze_table.items()},
    )
    return engine, summary


def consolidated_state_dict(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """Full weights of the wrapped LLaVA model on rank 0 (gathering ZeRO-3 shards one tensor at a time)."""
    import deepspeed

    llava = engine.module.llava
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


def summary_dict(summary: StageSummary) -> dict:
    return asdict(summary)
