"""One stage of training on a DeepSpeed engine: `setup_stage` (plan, fast paths, optimizer, `deepspeed.initialize`,
resume) -> `train_step` per optimizer step -> the hooks of train/hooks.py after each step (metrics and progress,
the non-finite guard, periodic eval, fault injection, checkpoints and preemption)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipelines.batch.collate import model_inputs
from data_pipelines.render.tokenize import IGNORE_INDEX
from train import checkpoint, distributed, watchdog
from train.hooks import StageSummary, Totals, stage_hooks  # noqa: F401 (StageSummary: what a stage returns)
from train.models.base import ModelFamily
from train.models.loss import SourceTokens
from train.recipe import Stage
from train.stages import ResolvedStage, StagePlan, build_optimizer, plan_stage, resolve_stage
from train.step import StepResult, counts

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What the step and the hooks share during one stage."""

    family: ModelFamily
    stage: Stage
    resolved: ResolvedStage  # what the stage runs as on these ranks (train/stages.py resolve_stage)
    engine: object           # deepspeed.DeepSpeedEngine around family.training_module(model)
    optimizer: torch.optim.Optimizer
    plan: StagePlan
    batches: BatchStream
    accumulation: int        # micro-batches per optimizer step on each rank
    rank: int
    world_size: int
    device: torch.device
    image_token_id: int
    vision_length: int | None
    hooks: list = field(default_factory=list)
    start_step: int = 0      # the last step done before this process started (resume), else 0
    poison_loss: bool = False  # set by fault injection before a step: the step's loss becomes NaN
    source_names: list[str] = field(default_factory=list)    # the stage's data sources (loss/<name>)
    source_weights: list[float] = field(default_factory=list)  # their loss_weight
    reference: object = None  # preference stages: train.objectives.Reference (the frozen starting policy)


def enable_fast_paths(family: ModelFamily, model, resolved: ResolvedStage) -> None:
    """The stage's activation checkpointing (per component) and torch.compile of the LLM's decoder layers."""
    parts = family.towers(model)
    for component in resolved.checkpointed:  # non-reentrant: works with frozen inputs and under ZeRO-3
        parts[component].activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if resolved.stage.compile:
        for layer in parts["llm"].layers:  # per block: the graphs stay small and ZeRO hooks stay outside
            layer.compile()


class BatchStream:
    """The loader's micro-batches, with a resumable position (the loader's own state when it has one)."""

    def __init__(self, loader):
        self.loader, self.iterator, self.consumed = loader, None, 0
        # uint8 pixels from the loader's workers are normalised on the device with these (None: already float)
        self.image_mean, self.image_std = getattr(loader, "image_mean", None), getattr(loader, "image_std", None)

    def __next__(self) -> dict:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        self.consumed += 1
        return next(self.iterator)

    def skip(self, count: int) -> None:
        for _ in range(count):
            next(self)

    def bad_samples(self) -> dict[str, int]:
        """{reason: count} of the bad samples the loader skipped on this rank."""
        stats = getattr(self.loader, "stats", None)
        return dict(stats["bad"]) if stats else {}

    def close(self) -> None:
        """Stop the loader's worker processes (before Slurm's SIGTERM reaches them)."""
        getattr(self.loader, "close", lambda: None)()

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


def setup_stage(family: ModelFamily, model, stage: Stage, loader, *, rank: int, world_size: int, hooks: list,
                resume_from: Path | None = None, reference_model=None,
                reference_logps: Path | None = None) -> StageContext:
    """Plan the stage, enable its fast paths, build the optimizer and the DeepSpeed engine (and a preference
    stage's reference), and resume. `reference_model`: the frozen copy of a `reference: copy` stage;
    `reference_logps`: where a `reference: precomputed` stage keeps this rank's first-pass table."""
    import deepspeed

    resolved = resolve_stage(stage, world_size)
    plan = plan_stage(family, model, stage)  # before ZeRO-3 partitions the parameters
    log.info("stage %s plan:\n%s", stage.name, plan.describe())
    enable_fast_paths(family, model, resolved)
    optimizer, scheduler = build_optimizer(family, model, stage, resolved)
    if resolved.zero_stage != stage.zero_stage:
        log.info("stage %s: ZeRO-%d on one rank runs as ZeRO-0 (nothing to partition)", stage.name, stage.zero_stage)
    engine, _, _, _ = deepspeed.initialize(model=family.training_module(model), optimizer=optimizer,
                                           lr_scheduler=scheduler, config=resolved.deepspeed_config())
    if world_size == 1 and resolved.zero_stage == 0:
        engine.enable_backward_allreduce = False  # ZeRO-0 all-reduces every gradient: over one rank, copies for nothing
    ctx = StageContext(family=family, stage=stage, resolved=resolved, engine=engine, optimizer=optimizer, plan=plan,
                       batches=BatchStream(loader), accumulation=resolved.accumulation, rank=rank,
                       world_size=world_size, device=distributed.device(),
                       image_token_id=model.config.image_token_index,
                       vision_length=family.vision_length(model.config), hooks=hooks,
                       source_names=stage.source_names(), source_weights=[s.loss_weight for s in stage.data])
    if stage.objective != "sft":  # before a resume loads a checkpoint: a first pass needs the starting weights
        from train.objectives import Reference, precomputed_logps, reference_copy

        copy = None if reference_model is None else reference_copy(family, reference_model, resolved)
        table = precomputed_logps(ctx, reference_logps) if stage.preference.reference == "precomputed" else None
        ctx.reference = Reference(engine, stage.preference.reference, copy, table)
    if resume_from is not None:
        resume(ctx, resume_from)
    return ctx


def resume(ctx: StageContext, path: Path) -> None:
    """Restore the engine, the data position and the hooks' state from a checkpoint."""
    state = checkpoint.load(ctx.engine, path, ctx.rank, ctx.world_size, ctx.resolved.zero_stage)
    ctx.start_step = state["step"]
    if state["world_size"] == ctx.world_size:
        ctx.batches.load_state_dict(state["data"])
    else:  # elastic: a new split of the data; carry over the number of samples consumed, not the order
        ctx.batches.skip(state["data"]["consumed"] * state["world_size"] // ctx.world_size)
    saved = state.get("hooks") or {"totals": state["totals"]}  # a checkpoint from before hooks kept only totals
    for hook in ctx.hooks:
        if hook.name in saved:
            hook.load_state_dict(saved[hook.name])
    log.info("stage %s: resumed from %s at step %d", ctx.stage.name, path, ctx.start_step)


def train_step(ctx: StageContext, micro_batches: list[dict], step: int) -> StepResult:
    """One optimizer step over this rank's micro-batches; every figure returned is summed over all ranks."""
    engine, started = ctx.engine, time.perf_counter()
    lrs = {group["name"]: group["lr"] for group in ctx.optimizer.param_groups}
    per_source = PerSource.of(ctx, micro_batches)
    # normalise over every target token of the optimizer step, on all ranks (not a mean of per-batch means);
    # with loss weights, over the weighted count of them
    watchdog.phase(f"step {step}: all-reduce of the target count")
    targets = distributed.all_reduce_sum(per_source.weighted_targets() if per_source and per_source.weighted
                                         else sum(b["num_target_tokens"] for b in micro_batches))
    scale = ctx.world_size * ctx.accumulation / max(targets, 1.0)  # DeepSpeed divides by both; undo it
    # the step's figures stay on the device until one all-reduce at its end: no host sync per micro-batch;
    # [loss sum, tokens, samples, positions, flops, per source: loss sums (S), target tokens (S)]
    extra = per_source.figures() if per_source else []
    figures = torch.tensor([0.0, *counts(ctx, micro_batches), *extra], dtype=torch.float64, device=ctx.device)
    for micro, batch in enumerate(micro_batches):
        inputs = model_inputs(batch, ctx.device, ctx.batches.image_mean, ctx.batches.image_std)
        if per_source:
            inputs["sources"] = per_source.tokens(batch, ctx.device)
        watchdog.phase(f"step {step}: forward of micro-batch {micro + 1}")
        outputs = engine(**inputs)
        micro_loss = outputs[0]
        if ctx.poison_loss:
            micro_loss = micro_loss * float("nan")
        watchdog.phase(f"step {step}: backward of micro-batch {micro + 1}")
        engine.backward(micro_loss * scale)
        watchdog.phase(f"step {step}: optimizer step (micro-batch {micro + 1})")
        engine.step()  # the optimizer runs at the accumulation boundary, unless a gradient is not finite
        figures[0] += micro_loss.detach().double()
        if per_source and outputs[2] is not None:
            figures[5:5 + per_source.count] += outputs[2]
    if ctx.world_size > 1:
        watchdog.phase(f"step {step}: all-reduce of the step's figures")
        torch.distributed.all_reduce(figures)
    loss_sum, tokens, samples, positions, step_flops = figures[:5].tolist()
    loss = loss_sum / max(targets, 1.0)
    applied = engine.was_step_applied() and math.isfinite(loss)  # DeepSpeed all-reduces the non-finite flag
    source_losses, source_targets = per_source.results(figures[5:].tolist()) if per_source else ({}, {})
    if per_source and per_source.weighted:  # `targets` was the weighted count; report the tokens
        targets = sum(source_targets.values())
    return StepResult(step=step, loss=loss, applied=applied, targets=int(targets),
                      tokens=int(tokens), samples=int(samples), positions=int(positions), flops=step_flops,
                      seconds=time.perf_counter() - started, lrs=lrs, source_losses=source_losses,
                      source_targets=source_targets)


@dataclass
class PerSource:
    """The loss per data source of one step: the loader's label_sources ([B, T], each label's index in the stage's
    `data`) group the per-token losses the forward computes anyway (train/models/base.py: lm_loss_sum)."""

    names: list[str]
    weights: list[float]
    counts: list[torch.Tensor]  # per micro-batch: target tokens per source [S] (host)

    @classmethod
    def of(cls, ctx: StageContext, micro_batches: list[dict]) -> PerSource | None:
        if not ctx.source_names or any(b.get("label_sources") is None for b in micro_batches):
            return None  # batches that do not say their sources (tests' hand-made ones): the step's loss only
        size = len(ctx.source_names)
        counts = [torch.bincount(b["label_sources"][:, 1:][b["labels"][:, 1:] != IGNORE_INDEX], minlength=size)
                  for b in micro_batches]
        return cls(ctx.source_names, ctx.source_weights, counts)

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def weighted(self) -> bool:
        return any(weight != 1.0 for weight in self.weights)

    def weighted_targets(self) -> float:
        return float(sum(counts.double() @ torch.tensor(self.weights, dtype=torch.float64) for counts in self.counts))

    def figures(self) -> list[float]:
        return [0.0] * self.count + sum(self.counts).tolist()

    def tokens(self, batch: dict, device) -> SourceTokens:
        weights = torch.tensor(self.weights, dtype=torch.float32, device=device) if self.weighted else None
        return SourceTokens(batch["label_sources"].to(device, non_blocking=True), self.count, weights)

    def results(self, figures: list[float]) -> tuple[dict[str, float], dict[str, int]]:
        sums, targets = figures[:self.count], figures[self.count:]
        return ({name: s / t for name, s, t in zip(self.names, sums, targets) if t},
                {name: int(t) for name, t in zip(self.names, targets) if t})


def train_stage(family: ModelFamily, model, stage: Stage, loader, *, rank: int, world_size: int,
                hooks: list | None = None, resume_from: Path | None = None, reference_model=None,
                reference_logps: Path | None = None):
    """Train `model` for one stage. Returns (engine, summary); the engine holds the (possibly sharded) weights.

    `hooks`: train.hooks.stage_hooks(...) by default (a progress display and the non-finite guard only).
    The stage's objective picks the step: `train_step` (sft), train.objectives' (dpo, mpo)."""
    totals = Totals()
    hooks = [totals, *(stage_hooks(stage, rank=rank) if hooks is None else hooks)]
    ctx = setup_stage(family, model, stage, loader, rank=rank, world_size=world_size, hooks=hooks,
                      resume_from=resume_from, reference_model=reference_model, reference_logps=reference_logps)
    step_fn = train_step
    if stage.objective != "sft":
        from train.objectives import STEPS

        step_fn = STEPS[stage.objective]
    try:
        for hook in hooks:
            hook.start_stage(ctx)
        watchdog.arm(stage.name, stage.watchdog_s, ctx.start_step)  # from here on, a step at least every watchdog_s
        for step in range(ctx.start_step + 1, stage.steps + 1):
            for hook in hooks:
                hook.before_step(ctx, step)
            watchdog.phase(f"loading step {step}'s batches")
            result = step_fn(ctx, [next(ctx.batches) for _ in range(ctx.accumulation)], step)
            watchdog.step_done(step)
            for hook in hooks:
                watchdog.phase(f"the {type(hook).__name__} hook after step {step}")
                hook.after_step(ctx, result)
        watchdog.phase("the end of the stage")
        for hook in hooks:
            hook.end_stage(ctx)
    finally:
        ctx.batches.close()  # the workers joined now: none outlives its stage into the next one's start
    return ctx.engine, totals.summary(ctx)


def consolidated_state_dict(family: ModelFamily, engine, rank: int) -> dict[str, torch.Tensor] | None:
    """Full weights of the engine's model on rank 0 (gathering ZeRO-3 shards one tensor at a time)."""
    import deepspeed

    model = family.unwrap(engine.module)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    state = {}
    for name, value in model.state_dict().items():
        param = parameters.get(name)
        if param is None:
            state[name] = value.detach().cpu().clone()
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    return state if rank == 0 else None
