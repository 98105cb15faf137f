"""A stage's freeze plan, optimizer parameter groups and learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from train.model import check_vision_last_blocks, component_parameters, vision_blocks
from train.recipe import COMPONENTS, Stage

log = logging.getLogger(__name__)


def apply_freeze_plan(model: nn.Module, stage: Stage) -> dict[str, dict[str, int]]:
    """Train exactly the stage's components; freeze the rest. Logs and returns {component: {trainable, frozen}}."""
    table = {}
    adapters_only = stage.lora_components()
    last_blocks = stage.vision_encoder_last_blocks
    if last_blocks is not None:  # partial unfreezing: of the vision encoder, only its last k blocks train
        total_blocks = check_vision_last_blocks(model, stage)
        unfrozen = {id(p) for block in vision_blocks(model)[-last_blocks:] for p in block.parameters()}
    for component, params in component_parameters(model).items():
        for name, param in params:  # a LoRA component trains its adapters only
            partial = component == "vision_encoder" and last_blocks is not None and id(param) not in unfrozen
            param.requires_grad_(stage.trains(component) and not partial
                                 and (component not in adapters_only or "lora_" in name))
        size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 keeps the real size in ds_numel
        trainable = sum(size(p) for _, p in params if p.requires_grad)
        table[component] = {"trainable": trainable, "frozen": sum(size(p) for _, p in params) - trainable}
    note = f"\n  vision_encoder: last {last_blocks} of {total_blocks} blocks trained" if last_blocks is not None else ""
    log.info("stage %s freeze plan:\n%s%s", stage.name, format_freeze_table(table), note)
    return table


def format_freeze_table(table: dict[str, dict[str, int]]) -> str:
    rows = [f"  {'component':<16}{'trainable':>16}{'frozen':>16}"]
    rows += [f"  {c:<16}{table[c]['trainable']:>16,}{table[c]['frozen']:>16,}" for c in COMPONENTS]
    return "\n".join(rows)


def parameter_groups(model: nn.Module, stage: Stage) -> list[dict]:
    """One AdamW group per trained component (its own lr), split so biases and norms get no weight decay."""
    groups = []
    for component, params in component_parameters(model).items():
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


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step when any rank has a non-finite gradient, and says so through `overflow`.

    DeepSpeed's ZeRO optimizers check gradients for overflow themselves and skip the step (and the scheduler); with
    ZeRO-0 the engine steps this optimizer directly, so it does the same check, and DeepSpeed reads `overflow`.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.tensor(0.0 if all(torch.isfinite(g).all() for g in grads) else 1.0, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        self.overflow = bool(bad.item())
        return None if self.overflow else super().step(closure)


def build_optimizer(model: nn.Module, stage: Stage):
    optimizer_cls = GuardedAdamW if stage.zero_stage == 0 else torch.optim.AdamW
    optimizer = optimizer_cls(parameter_groups(model, stage), betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage))
    return optimizer, scheduler
