"""Preference objectives (a stage's `objective: dpo | mpo`): the losses as small pure functions of sequence
log-probabilities, named and computed as TRL's DPOTrainer computes them (tests/train/test_objectives.py holds them
against hand computations and against TRL itself), the reference policy, and the optimizer step on pairs.

`objective: sft` (the next-token loss) is train/engine.py's `train_step`; a preference stage runs
`preference_step` instead, with the same hooks, checkpoints and resume around it.

A micro-batch of B pairs is 2B rows, the B chosen sequences then the B rejected ones, each pair's images once
(data_pipelines/batch/collate.py collate_pairs); the family's training forward with `pair_images=True` runs the
vision tower once per pair and returns each row's summed target log-probability.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from data_pipelines.batch.collate import model_inputs
from train import distributed, watchdog
from train.step import StepResult, counts

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the losses


def preference_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
                      chosen_tokens: torch.Tensor | None = None,
                      rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO loss [B] from summed log-probabilities [B] of the policy and the reference.

    sigmoid: -log sigmoid(beta * margin), with label_smoothing e the conservative-DPO mix
    -(1-e) log sigmoid(beta * margin) - e log sigmoid(-beta * margin); hinge: relu(1 - beta * margin);
    ipo: (margin per token - 1 / (2 beta))^2, each log-ratio divided by its answer's token count (as TRL does)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss == "ipo":
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (margin - 1 / (2 * beta)) ** 2
    margin = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    if loss == "hinge":
        return torch.relu(1 - beta * margin)
    raise ValueError(f"unknown preference loss {loss!r}")


def quality_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                   ref_rejected: torch.Tensor, *, beta: float) -> torch.Tensor:
    """MPO's quality term [B], BCO pair as TRL computes it: each answer judged on its own against the reference,
    -log sigmoid(beta * chosen log-ratio) - log sigmoid(-beta * rejected log-ratio)."""
    return -F.logsigmoid(beta * (chosen - ref_chosen)) - F.logsigmoid(-beta * (rejected - ref_rejected))


# ------------------------------------------------------------------------------------------------ the reference


class Reference:
    """The policy at the start of the stage, frozen: a second model (`copy`), the policy itself with its LoRA
    adapters switched off (`adapters`), or a table of its log-probabilities from a first pass (`precomputed`).
    `logps(inputs, position)` gives each row's summed target log-probability of the rank's micro-batch `position`
    (counted from the stage's start)."""

    def __init__(self, engine, kind: str, copy: nn.Module | None = None, table: torch.Tensor | None = None):
        if (kind == "copy") != (copy is not None) or (kind == "precomputed") != (table is not None):
            raise RuntimeError(f"a {kind} reference needs {'its copy' if kind == 'copy' else 'its table'}")
        self.engine, self.copy, self.table = engine, copy, table

    @torch.no_grad()
    def logps(self, inputs: dict, position: int) -> torch.Tensor:
        if self.table is not None:
            return self.table[position].to(inputs["input_ids"].device)
        if self.copy is not None:
            return self.copy(**inputs)[0].detach()
        with adapters_off(self.engine.module):
            return self.engine(**inputs)[0].detach()


@contextlib.contextmanager
def adapters_off(module: nn.Module):
    """Every LoRA/DoRA layer of `module` forwards through its base layer only, for the time of the block. The flag
    is set directly: peft's enable_adapters(False) would also set requires_grad, which the stage plan owns."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def reference_copy(family, model: nn.Module, resolved) -> nn.Module:
    """The frozen copy as it runs beside the policy: in eval mode, no gradients; under ZeRO-3 inside an
    optimizer-less DeepSpeed engine, which gathers its partitions layer by layer as the policy's engine does."""
    module = family.training_module(model).eval()
    module.requires_grad_(False)
    if not resolved.partitioned:
        return module.to(distributed.device())
    import deepspeed

    config = resolved.deepspeed_config()
    config.pop("optimizer", None)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None, unlike nn.Module's
    return engine


def precomputed_logps(ctx, path: Path | None) -> torch.Tensor:
    """[micro-batches of the stage on this rank, rows] reference log-probabilities: read from `path` when a first
    pass wrote it, else computed by one: the policy (still the stage's starting weights: this runs before a resume
    loads a checkpoint) in eval mode over every micro-batch the stage will train on, without gradients; then the
    loader goes back to the stage's start. Every rank runs the same number of forwards (ZeRO-3 gathers collectively).
    `path` None: kept in memory only (bench)."""
    count = ctx.stage.steps * ctx.accumulation
    if path is not None and path.is_file():
        table = load_file(path)["logps"]
        if table.shape[0] == count:
            log.info("stage %s: reference log-probabilities read from %s", ctx.stage.name, path)
            return table
    start, module = ctx.batches.state_dict(), ctx.engine.module
    module.eval()  # as a frozen copy runs
    rows = []
    with torch.no_grad():
        for position in range(count):
            watchdog.phase(f"reference pass: micro-batch {position + 1} of {count}")
            inputs = model_inputs(next(ctx.batches), ctx.device, ctx.batches.image_mean, ctx.batches.image_std)
            rows.append(ctx.engine(**inputs)[0].float().cpu())
    module.train()
    ctx.batches.load_state_dict(start)
    table = torch.stack(rows)  # [micro-batches, 2 * pairs per micro-batch]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # a pass killed while writing leaves no table
        save_file({"logps": table}, tmp)
        os.replace(tmp, path)
        log.info("stage %s: reference log-probabilities of %d micro-batches written to %s", ctx.stage.name, count,
                 path)
    return table


# ------------------------------------------------------------------------------------------------ the step


# the step's figures summed over micro-batches and ranks, in this order (one all-reduce)
FIGURES = ("loss", "tokens", "samples", "positions", "flops", "chosen_targets", "rejected_targets",
           "rewards_chosen", "rewards_rejected", "accuracies", "logps_chosen", "logps_rejected",
           "preference", "quality", "generation")


@dataclass
class PairCounts:
    """Host-side counts of one step's pairs over all ranks: what the loss is normalised by."""

    pairs: float          # pairs in the step (the preference and quality terms are means over them)
    chosen_targets: float  # target tokens of the chosen answers (the generation term is a mean over them)


def step_counts(micro_batches: list[dict]) -> PairCounts:
    pairs = sum(b["num_pairs"] for b in micro_batches)
    chosen = sum(int((b["labels"][:b["num_pairs"], 1:] != -100).sum()) for b in micro_batches)
    total_pairs, total_chosen = distributed.all_reduce_sum([float(pairs), float(chosen)])  # one collective
    return PairCounts(max(total_pairs, 1.0), max(total_chosen, 1.0))


def pair_loss(ctx, logps: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor, counts: PairCounts):
    """(this micro-batch's share of the step loss, its figures [FIGURES[5:]]) from row log-probabilities [2B]."""
    spec, pairs = ctx.stage.preference, logps.shape[0] // 2
    chosen, rejected, ref_chosen, ref_rejected = logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:]
    preference = preference_losses(chosen, rejected, ref_chosen, ref_rejected, beta=spec.beta, loss=spec.loss,
                                   label_smoothing=spec.label_smoothing, chosen_tokens=tokens[:pairs],
                                   rejected_tokens=tokens[pairs:])
    weights = spec.mpo if ctx.stage.objective == "mpo" else None
    total = preference.sum() / counts.pairs * (weights.preference if weights else 1.0)
    quality = torch.zeros_like(preference)
    generation = -chosen.sum() / counts.chosen_targets  # the chosen answers' mean token NLL (TRL's "sft")
    if weights is not None:
        quality = quality_losses(chosen, rejected, ref_chosen, ref_rejected, beta=spec.beta)
        total = total + weights.quality * quality.sum() / counts.pairs + weights.generation * generation
    rewards_chosen = (spec.beta * (chosen - ref_chosen)).detach()  # TRL's implicit rewards
    rewards_rejected = (spec.beta * (rejected - ref_rejected)).detach()
    figures = [tokens[:pairs].sum(), tokens[pairs:].sum(), rewards_chosen.sum(), rewards_rejected.sum(),
               (rewards_chosen > rewards_rejected).sum(), chosen.detach().sum(), rejected.detach().sum(),
               preference.detach().sum(), quality.detach().sum(), generation.detach() * counts.chosen_targets]
    return total, torch.stack([f.double() for f in figures])


def preference_step(ctx, micro_batches: list[dict], step: int):
    """One optimizer step over this rank's micro-batches of pairs; figures summed over all ranks (StepResult).
    FLOPs count the policy's training work only (engine.counts), not the reference's forward, as MFU is counted."""
    engine, started = ctx.engine, time.perf_counter()
    lrs = {group["name"]: group["lr"] for group in ctx.optimizer.param_groups}
    watchdog.phase(f"step {step}: all-reduce of the pair counts")
    totals = step_counts(micro_batches)
    figures = torch.zeros(len(FIGURES), dtype=torch.float64, device=ctx.device)
    figures[1:5] = torch.tensor(counts(ctx, micro_batches), dtype=torch.float64)
    scale = ctx.world_size * ctx.accumulation  # DeepSpeed divides by both; the loss is already the step's mean
    for micro, batch in enumerate(micro_batches):
        inputs = model_inputs(batch, ctx.device, ctx.batches.image_mean, ctx.batches.image_std)
        watchdog.phase(f"step {step}: reference forward of micro-batch {micro + 1}")
        ref = ctx.reference.logps(inputs, (step - 1) * ctx.accumulation + micro)
        watchdog.phase(f"step {step}: forward of micro-batch {micro + 1}")
        logps, tokens = engine(**inputs)
        micro_loss, micro_figures = pair_loss(ctx, logps, tokens, ref, totals)
        if ctx.poison_loss:
            micro_loss = micro_loss * float("nan")
        watchdog.phase(f"step {step}: backward of micro-batch {micro + 1}")
        engine.backward(micro_loss * scale)
        watchdog.phase(f"step {step}: optimizer step (micro-batch {micro + 1})")
        engine.step()
        figures[0] += micro_loss.detach().double()
        figures[5:] += micro_figures
    if ctx.world_size > 1:
        watchdog.phase(f"step {step}: all-reduce of the step's figures")
        torch.distributed.all_reduce(figures)
    values = dict(zip(FIGURES, figures.tolist()))
    loss = values["loss"]  # each rank's micro-losses were its shares of the whole step's mean
    applied = engine.was_step_applied() and math.isfinite(loss)
    return StepResult(step=step, loss=loss, applied=applied, targets=int(values["chosen_targets"] +
                      values["rejected_targets"]), tokens=int(values["tokens"]), samples=int(values["samples"]),
                      positions=int(values["positions"]), flops=values["flops"],
                      seconds=time.perf_counter() - started, lrs=lrs, extra=pair_metrics(ctx, values, totals))


def pair_metrics(ctx, values: dict, totals: PairCounts) -> dict[str, float]:
    """The step's metrics under TRL's names, means over the step's pairs; MPO's terms apart."""
    pairs = totals.pairs
    metrics = {"rewards/chosen": values["rewards_chosen"] / pairs,
               "rewards/rejected": values["rewards_rejected"] / pairs,
               "rewards/accuracies": values["accuracies"] / pairs,
               "rewards/margins": (values["rewards_chosen"] - values["rewards_rejected"]) / pairs,
               "logps/chosen": values["logps_chosen"] / pairs, "logps/rejected": values["logps_rejected"] / pairs}
    if ctx.stage.objective == "mpo":
        metrics.update({"loss/preference": values["preference"] / pairs, "loss/quality": values["quality"] / pairs,
                        "loss/generation": values["generation"] / totals.chosen_targets})
    return metrics




STEPS = {"dpo": preference_step, "mpo": preference_step}  # objective -> its step (sft: train/engine.py train_step)
