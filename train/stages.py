"""A stage's plan (what trains: adapters, frozen and trained components, its FLOPs per token), optimizer parameter
groups and learning-rate schedule.

`plan_stage` is the one place that decides what a stage trains: training, `recipe check` (on the meta device) and
the FLOP accounting all read its plan, so they cannot disagree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from train import flops
from train.errors import RecipeError, UsageError
from train.models.base import ModelFamily
from train.models.weights import parameter_size
from train.recipe import COMPONENTS, SCHEDULES, Stage

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    stage: str
    table: dict[str, dict[str, int]]  # component -> {"trainable", "frozen"} parameters (adapters included)
    adapters: dict[str, int]          # LoRA component -> its adapter parameters (all trainable)
    vision_blocks: tuple[int, int] | None  # (last k trained, of n blocks) with partial unfreezing
    flops: flops.FlopPlan

    def describe(self) -> str:
        notes = [f"  vision_encoder: last {k} of {n} blocks trained" for k, n in [self.vision_blocks or (0, 0)] if k]
        notes += [f"  {c}: trained through LoRA adapters ({n:,} parameters)" for c, n in self.adapters.items()]
        return "\n".join([format_freeze_table(self.table), *notes])


def plan_stage(family: ModelFamily, model: nn.Module, stage: Stage) -> StagePlan:
    """Inject the stage's adapters, train exactly its components (a LoRA component: its adapters only; with
    vision_encoder_last_blocks: the vision encoder's last k blocks only), freeze the rest."""
    if stage.lora_components():
        from train.lora import inject_adapters

        inject_adapters(family, model, stage)
    blocks = None
    if stage.vision_encoder_last_blocks is not None:
        blocks = (stage.vision_encoder_last_blocks, check_vision_last_blocks(family, model, stage))
    table, adapters = freeze(family, model, stage)
    return StagePlan(stage.name, table, adapters, blocks, flops.plan_flops(family, model))


def freeze(family: ModelFamily, model: nn.Module, stage: Stage) -> tuple[dict, dict]:
    """Set requires_grad per the stage; returns ({component: {trainable, frozen}}, {component: adapter count})."""
    lora = stage.lora_components()
    last_blocks = stage.vision_encoder_last_blocks
    unfrozen = set()
    if last_blocks is not None:
        unfrozen = {id(p) for block in family.vision_blocks(model)[-last_blocks:] for p in block.parameters()}
    table, adapters = {}, {}
    for component, params in family.component_parameters(model).items():
        for name, param in params:
            partial = component == "vision_encoder" and last_blocks is not None and id(param) not in unfrozen
            param.requires_grad_(stage.trains(component) and not partial and (component not in lora or "lora_" in name))
        trainable = sum(parameter_size(p) for _, p in params if p.requires_grad)
        table[component] = {"trainable": trainable, "frozen": sum(parameter_size(p) for _, p in params) - trainable}
        if component in lora:
            adapters[component] = trainable
    return table, adapters


def check_vision_last_blocks(family: ModelFamily, model: nn.Module, stage: Stage) -> int:
    """The vision encoder's block count; RecipeError when the stage unfreezes more blocks than it has."""
    blocks = len(family.vision_blocks(model))
    if stage.vision_encoder_last_blocks > blocks:
        asked = stage.vision_encoder_last_blocks
        raise RecipeError("recipe", [f"stages.{stage.name}.vision_encoder_last_blocks: {asked} is more than the "
                                     f"vision encoder's {blocks} blocks"])
    return blocks


def format_freeze_table(table: dict[str, dict[str, int]]) -> str:
    rows = [f"  {'component':<16}{'trainable':>16}{'frozen':>16}"]
    rows += [f"  {c:<16}{table[c]['trainable']:>16,}{table[c]['frozen']:>16,}" for c in COMPONENTS]
    return "\n".join(rows)


def parameter_groups(family: ModelFamily, model: nn.Module, stage: Stage) -> list[dict]:
    """One AdamW group per trained component (its own lr), split so biases and norms get no weight decay."""
    groups = []
    for component, params in family.component_parameters(model).items():
        if not stage.trains(component):
            continue
        lr = getattr(stage.lr, component)
        decay = [p for _, p in params if p.ndim >= 2 and p.requires_grad]
        no_decay = [p for _, p in params if p.ndim < 2 and p.requires_grad]
        for suffix, members, weight_decay in (("", decay, stage.weight_decay), (".no_decay", no_decay, 0.0)):
            if members:
                groups.append({"name": component + suffix, "params": members, "lr": lr, "weight_decay": weight_decay})
    return groups


def warmup_cosine(stage: Stage):
    """Multiplier on each group's lr: linear warmup from 0, then cosine decay to min_lr_ratio."""
    warmup = math.ceil(stage.warmup_ratio * stage.steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, stage.steps - warmup)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def wsd_phases(stage: Stage) -> tuple[int, int]:
    """(warmup steps, first step of the decay) of a wsd stage: the warmup takes ceil(warmup_ratio * steps) steps, the
    decay the last ceil(decay_ratio * steps) (at least one), and the lr is flat between them."""
    warmup = math.ceil(stage.warmup_ratio * stage.steps)
    decay = max(1, min(math.ceil(stage.decay_ratio * stage.steps), stage.steps - warmup))
    return warmup, stage.steps - decay


def warmup_stable_decay(stage: Stage):
    """Multiplier: linear warmup from 0, flat at 1, then a linear or cosine decay over the last steps, the last one
    at min_lr_ratio (as the warmup's first step is 1/warmup, not 0). The flat phase can be lengthened (more steps,
    the same decay) without redoing what came before the decay."""
    warmup, decay_start = wsd_phases(stage)
    floor = stage.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / (stage.steps - decay_start))
        if stage.decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return multiplier


def warmup_constant(stage: Stage):
    """Multiplier: linear warmup from 0, then 1 to the end."""
    warmup = math.ceil(stage.warmup_ratio * stage.steps)
    return lambda step: (step + 1) / warmup if step < warmup else 1.0


SCHEDULE_FUNCTIONS = {"cosine": warmup_cosine, "wsd": warmup_stable_decay, "constant": warmup_constant}


def lr_multiplier(stage: Stage):
    """The stage's schedule (recipe.SCHEDULES) as a multiplier of the optimizer step index from 0."""
    return SCHEDULE_FUNCTIONS[stage.schedule](stage)


assert set(SCHEDULE_FUNCTIONS) == set(SCHEDULES), "every schedule the recipe accepts has its function"


def describe_schedule(stage: Stage) -> dict:
    """The stage's schedule in optimizer steps (1-based, as metrics.jsonl counts them), for `recipe check`:
    {"kind", "warmup_steps", and for wsd "decay_steps" (the last ones) and "decay"}."""
    warmup = math.ceil(stage.warmup_ratio * stage.steps)
    described = {"kind": stage.schedule, "warmup_steps": warmup, "min_lr_ratio": stage.min_lr_ratio}
    if stage.schedule == "wsd":
        warmup, decay_start = wsd_phases(stage)
        described.update(decay_steps=stage.steps - decay_start, decay=stage.decay)
    return described


@dataclass(frozen=True)
class ResolvedStage:
    """What a stage of the recipe runs as on `world_size` ranks: every setting derived from the raw stage is derived
    here, once (resolve_stage), and read by the build, the engine, the memory plan, submit, periodic eval, the bench
    and the Trainer baseline."""

    stage: Stage
    world_size: int
    zero_stage: int               # the ZeRO stage that runs (fp32 ZeRO-1/2 on one rank: 0)
    dtype: torch.dtype            # parameters and compute: bf16 or fp32
    accumulation: int             # micro-batches per optimizer step on each rank
    optimizer_clips: bool         # our optimizer clips and guards the step (fp32 ZeRO-0); else DeepSpeed does
    checkpointed: tuple[str, ...]  # components run with activation checkpointing

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: parameters live in partitions, gathered per module as the forward reaches it."""
        return self.zero_stage == 3

    @property
    def lockstep(self) -> bool:
        """Generation must run in lockstep on every rank (each forward gathers partitions from all of them)."""
        return self.partitioned and self.world_size > 1

    @property
    def bytes_per_value(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def deepspeed_config(self) -> dict:
        """The engine's config (also zero.Init's, so that the build's dtype is the engine's)."""
        stage = self.stage
        zero = {"stage": self.zero_stage}
        if self.partitioned:
            zero.update(stage3_gather_16bit_weights_on_model_save=True, sub_group_size=ZERO3_SUB_GROUP)
        return {
            "train_batch_size": stage.global_batch_size,
            "train_micro_batch_size_per_gpu": stage.micro_batch_size,
            "gradient_accumulation_steps": self.accumulation,
            "gradient_clipping": 0.0 if self.optimizer_clips else stage.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam would JIT-compile
            "steps_per_print": 2**31,
            "wall_clock_breakdown": False,
        }


# ZeRO-3 steps the optimizer one sub-group of parameters at a time, and each step holds the sub-group's fp32 gradients
# (4 bytes a parameter; the fused AdamW allocates nothing more) on top of the model states. DeepSpeed's default of 1e9
# parameters, with the per-tensor AdamW's temporaries, made the step and not the forward and backward the peak of the
# Asagi-2B stage-2 bench on one rank; at 1e8 the step stays below them (README, "Throughput").
ZERO3_SUB_GROUP = 100_000_000


def resolve_stage(stage: Stage, world_size: int) -> ResolvedStage:
    """The settings `stage` runs with on `world_size` ranks; a global batch that does not divide over the ranks is
    refused (UsageError, exit 2), by `recipe check --gpus N` and `submit` as by the run itself.

    ZeRO: the recipe's, except that an fp32 stage on one rank runs ZeRO-1/2 as ZeRO-0. Partitioning over one rank
    saves nothing and costs a copy of every gradient into DeepSpeed's flat buffers and of every updated weight back
    (about a fifth of the tiny recipe's step; `kakehashi bench train --baseline trainer`); in fp32 ZeRO-0 the engine
    steps our optimizer on the parameters themselves, and that optimizer clips (GuardedAdamW). bf16 keeps ZeRO:
    DeepSpeed's ZeRO-0 bf16 wrappers keep flat fp32 copies too. A checkpoint carries over between the two layouts
    (train/checkpoint.py)."""
    per_step = stage.micro_batch_size * world_size
    if stage.global_batch_size % per_step:
        raise UsageError(f"stage {stage.name}: global_batch_size {stage.global_batch_size} is not a multiple of "
                         f"micro_batch_size x ranks = {stage.micro_batch_size} x {world_size}")
    fp32 = stage.precision == "fp32"
    zero = 0 if world_size == 1 and fp32 and stage.zero_stage in (1, 2) else stage.zero_stage
    checkpointed = (("vision_encoder", "llm") if stage.gradient_checkpointing is True
                    else tuple(stage.gradient_checkpointing or ()))
    return ResolvedStage(stage=stage, world_size=world_size, zero_stage=zero,
                         dtype=torch.float32 if fp32 else torch.bfloat16,
                         accumulation=stage.global_batch_size // per_step, optimizer_clips=zero == 0 and fp32,
                         checkpointed=checkpointed)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step when any rank has a non-finite gradient, and says so through `overflow`.

    DeepSpeed's ZeRO optimizers check gradients for overflow themselves and skip the step (and the scheduler); with
    ZeRO-0 the engine steps this optimizer directly, so it does the same check, and DeepSpeed reads `overflow`.
    As ZeRO's optimizers do, it decides from the norm of all gradients (non-finite if any element is), clips to
    `max_grad_norm` (0: no clipping) with that norm, and gives it to DeepSpeed as the step's `_global_grad_norm`:
    one pass over the gradients and one host sync per optimizer step.
    """

    overflow = False

    def __init__(self, params, *, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = (torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True) if params
                else torch.zeros(()))
        bad = (~torch.isfinite(norm)).to(torch.float32)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad)  # every rank decides alike, whatever gradients it holds
        self.overflow = bool(bad.item())
        if self.overflow:
            self._global_grad_norm = float("inf")
            return None
        self._global_grad_norm = float(norm)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm, foreach=True)
        return super().step(closure)


# fused: one kernel updates each tensor in place (CPU and CUDA), where the for-each and per-tensor paths also allocate
# temporaries of the tensor's size (sqrt(v) and its quotient; at a real vocabulary, the embedding's 204M entries
# make those the optimizer step's peak); Trainer's default (adamw_torch_fused) too
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "fused": True}


def build_optimizer(family: ModelFamily, model: nn.Module, stage: Stage, resolved: ResolvedStage | None = None):
    """The stage's AdamW and schedule. `resolved`: the run's stage, for the engine (its ZeRO stage decides the
    optimizer); None: for a trainer that steps and clips a plain AdamW itself (train/trainer_baseline.py)."""
    groups = parameter_groups(family, model, stage)
    if resolved is not None and resolved.zero_stage == 0:
        clip = stage.max_grad_norm if resolved.optimizer_clips else 0.0
        optimizer = GuardedAdamW(groups, max_grad_norm=clip, **ADAMW)
    else:
        optimizer = torch.optim.AdamW(groups, **ADAMW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(stage))
    return optimizer, scheduler
