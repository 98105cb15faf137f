"""What runs around each optimizer step of a stage (OLMo-core's callbacks): totals, metrics and progress, the
non-finite guard, periodic eval, fault injection, checkpoints and preemption.

A hook with state (`name` set) saves it in every checkpoint and gets it back on resume. Hooks run in list order
after each step; `stage_hooks` gives the order a run uses (the checkpoint last, so it saves what the others did).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train import checkpoint, distributed, faults, flops, preemption
from train.errors import NonFiniteLimit, Preempted
from train.reporting import MetricsLog

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



class Hook:
    name: str | None = None  # stateful hooks: the key of their state in checkpoints

    def start_stage(self, ctx) -> None:
        """After setup and resume, before the first step this process runs."""

    def before_step(self, ctx, step: int) -> None:
        pass

    def after_step(self, ctx, result) -> None:
        pass

    def end_stage(self, ctx) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Totals(Hook):
    """The stage's running totals: its summary, carried across resumes."""

    name = "totals"

    def __init__(self):
        self.first_loss, self.last_loss = float("nan"), float("nan")
        self.samples = self.tokens = self.skipped_steps = 0
        self.seconds, self.started = 0.0, time.perf_counter()

    def start_stage(self, ctx) -> None:
        self.started = time.perf_counter() - self.seconds  # the time before a resume counts

    def after_step(self, ctx, result) -> None:
        self.samples += result.samples
        self.tokens += result.tokens
        self.skipped_steps += not result.applied
        self.first_loss = result.loss if result.step == 1 else self.first_loss
        self.last_loss = result.loss

    def state_dict(self) -> dict:
        return {"first_loss": self.first_loss, "samples": self.samples, "tokens": self.tokens,
                "skipped_steps": self.skipped_steps, "seconds": time.perf_counter() - self.started}

    def load_state_dict(self, state: dict) -> None:
        self.first_loss, self.samples, self.tokens = state["first_loss"], state["samples"], state["tokens"]
        self.skipped_steps, self.seconds = state["skipped_steps"], state["seconds"]

    def summary(self, ctx) -> StageSummary:
        table = ctx.plan.table
        return StageSummary(
            stage=ctx.stage.name, steps=ctx.stage.steps, first_loss=self.first_loss, final_loss=self.last_loss,
            seconds=time.perf_counter() - self.started, samples=self.samples, tokens=self.tokens,
            bad_samples=int(distributed.all_reduce_sum(sum(ctx.batches.bad_samples().values()))),
            skipped_steps=self.skipped_steps, trainable={c: r["trainable"] for c, r in table.items()},
            frozen={c: r["frozen"] for c, r in table.items()},
        )


class Metrics(Hook):
    """One metrics.jsonl record (and wandb) every `log_every` steps, at the stage's end and at every skipped step."""

    def __init__(self, metrics: MetricsLog):
        self.metrics = metrics
        self.peak = None

    def start_stage(self, ctx) -> None:
        self.peak = flops.peak_flops(ctx.device)

    def after_step(self, ctx, r) -> None:
        stage = ctx.stage
        if not (r.step % stage.log_every == 0 or r.step == stage.steps or not r.applied):
            return
        grad_norm = ctx.engine.get_global_grad_norm()
        per_device = r.flops / r.seconds / ctx.world_size
        self.metrics.write({
            "stage": stage.name, "step": r.step, "loss": r.loss, "lr": next(iter(r.lrs.values())),
            "lr_by_group": r.lrs,  # the rates this step used
            "grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not r.applied,
            "target_tokens": r.targets, "tokens": r.tokens, "samples": r.samples, "seconds": r.seconds,
            "tokens_per_s": r.tokens / r.seconds, "samples_per_s": r.samples / r.seconds,
            "nonpad_fraction": r.tokens / r.positions, "tflops_per_device": per_device / 1e12,
            "mfu": None if self.peak is None else per_device / self.peak,
            "bad_samples": ctx.batches.bad_samples(),  # {reason: count} on rank 0
            **{f"loss/{name}": loss for name, loss in r.source_losses.items()},  # sources in this step only
            **{f"target_tokens/{name}": n for name, n in r.source_targets.items()},
            **r.extra,  # the objective's metrics (preference stages: TRL's rewards/*, logps/*)
        })


class NonFiniteGuard(Hook):
    """Counts skipped steps in a row; past the limit the run stops (no checkpoint of the bad state is written)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0

    def after_step(self, ctx, r) -> None:
        if r.applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1  # every rank saw the same non-finite flag (DeepSpeed all-reduces it), so all skipped
        log.warning("stage %s step %d: non-finite loss or gradient; optimizer step skipped (%d in a row)",
                    ctx.stage.name, r.step, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLimit(f"stage {ctx.stage.name}: {self.in_a_row} optimizer steps in a row had a non-finite "
                                 f"loss or gradient (last at step {r.step}); stopped without saving this state")


class Progress(Hook):
    """A progress bar with loss on a terminal (stderr); else a log line every ~10% of the stage. Rank 0 only."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.started, self.initial = enabled, None, time.perf_counter(), 0

    def start_stage(self, ctx) -> None:
        self.started, self.initial = time.perf_counter(), ctx.start_step
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=ctx.stage.steps, initial=ctx.start_step, desc=ctx.stage.name, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def after_step(self, ctx, r) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{r.loss:.4f}")
            return
        steps = ctx.stage.steps
        if r.step % max(1, steps // 10) == 0 or r.step == steps:
            eta = (time.perf_counter() - self.started) / max(1, r.step - self.initial) * (steps - r.step)
            log.info("[%s] step %d/%d  loss %.4f  eta %.0fs", ctx.stage.name, r.step, steps, r.loss, eta)

    def end_stage(self, ctx) -> None:
        if self.bar is not None:
            self.bar.close()


class PeriodicEvalHook(Hook):
    """train/periodic_eval.py every `eval_every` steps and at the stage's end; every rank joins."""

    def __init__(self, periodic_eval):
        self.periodic_eval = periodic_eval

    def after_step(self, ctx, r) -> None:
        self.periodic_eval.maybe_run(ctx.engine, r.step)


class FaultInjection(Hook):
    """The reliability tests' faults (train/faults.py): a NaN loss on one rank, a kill or a SIGSTOP after a step."""

    def __init__(self, rank: int):
        self.rank, self.nan_steps = rank, faults.nan_steps(rank)

    def before_step(self, ctx, step: int) -> None:
        ctx.poison_loss = step in self.nan_steps

    def after_step(self, ctx, r) -> None:
        faults.maybe_kill("after_step", ctx.stage.name, r.step)
        faults.maybe_stop(self.rank, ctx.stage.name, r.step)


class Checkpoints(Hook):
    """A checkpoint every `save_every` steps, and when a stop is asked for (SIGTERM / SIGUSR1 on any rank): then
    every rank stops at the same step, after the checkpoint. None at a stage's last step (the stage finishes),
    and none of a skipped step's state."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = root, keep_last

    def after_step(self, ctx, r) -> None:
        stage = ctx.stage
        stop = distributed.all_reduce_sum(preemption.stop_requested()) > 0  # every rank stops at the same step
        due = stage.save_every and r.step % stage.save_every == 0
        if r.step < stage.steps and r.applied and (due or stop):
            rank_state = {"data": ctx.batches.state_dict(),
                          "hooks": {hook.name: hook.state_dict() for hook in ctx.hooks if hook.name}}
            checkpoint.save(ctx.engine, self.root, r.step, rank_state, rank=ctx.rank, keep_last=self.keep_last,
                            stage=stage.name)
        if stop and r.step < stage.steps:  # at a stage's last step the stage finishes; the next one stops at step 1
            ctx.batches.close()
            raise Preempted(f"stage {stage.name}: stopped at step {r.step} on request; checkpoint saved")


def stage_hooks(stage, *, rank: int, metrics: MetricsLog | None = None, max_nonfinite_steps: int = 3,
                periodic_eval=None, checkpoint_dir: Path | None = None, keep_last: int = 2) -> list[Hook]:
    """The hooks of a run's stage, in the order they run after each step."""
    hooks: list[Hook] = [Metrics(metrics)] if metrics is not None else []
    hooks += [NonFiniteGuard(max_nonfinite_steps), Progress(enabled=rank == 0)]
    if periodic_eval is not None:
        hooks.append(PeriodicEvalHook(periodic_eval))
    hooks.append(FaultInjection(rank))
    if checkpoint_dir is not None:
        hooks.append(Checkpoints(checkpoint_dir, keep_last))
    return hooks
