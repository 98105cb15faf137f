"""The training loss of every family: summed next-token cross-entropy and its target count, computed
from the full logits, in chunks that never hold [tokens, vocab] at once, or by Liger's fused kernel;
per source where the loader says which source each label came from."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from train.errors import RecipeError

log = logging.getLogger(__name__)


LOSSES = ("chunked", "full", "liger")
# the loss of a model built without a recipe (a stage directory, an export), and the recipe's defaults
# (train/recipe.py ModelSpec.loss, .loss_chunk_size read them from here)
DEFAULT_LOSS = ("chunked", 1024)


def set_loss(model: nn.Module, spec) -> None:
    """Record the recipe's loss (model.loss, model.loss_chunk_size) on a built model; its training forward reads it.
    A plain attribute, not a parameter or buffer: it is no part of the weights, the config or the export."""
    model.kakehashi_loss = (spec.loss, spec.loss_chunk_size)


def loss_of(model: nn.Module) -> tuple[str, int]:
    """The loss `set_loss` recorded, or the default (a model loaded from a stage or an export)."""
    return getattr(model, "kakehashi_loss", DEFAULT_LOSS)


class SourceTokens(NamedTuple):
    """Which data source each label came from, for the loss per source (train/engine.py: train_step)."""

    label_sources: torch.Tensor          # [B, T] long: the source index of each label (-1 on padding)
    count: int                           # sources in the stage
    weights: torch.Tensor | None = None  # [count] fp32 loss weights, None when every source weighs 1


def lm_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                loss: tuple[str, int] = DEFAULT_LOSS, sources: SourceTokens | None = None):
    """(summed next-token loss in fp32, target count) of the LLM's last hidden states [B, T, D] through `lm_head`
    against labels [B, T]: token_loss_sum's contract, without (`chunked`, `liger`) or with (`full`) the whole
    [B, T, V] logits in memory. `loss`: (kind, tokens per chunk).

    With `sources`, a third value: the unweighted loss summed per source [count] (fp64, no gradient), read from the
    same log-probabilities as the loss (no second pass over the head; None under liger, whose fused kernel keeps no
    per-token loss). With `sources.weights`, the loss is sum(weight of the token's source * token loss)."""
    kind, chunk_size = loss
    targets = labels[:, 1:].flatten()
    if sources is None and kind == "full":
        return token_loss_sum(lm_head(hidden), labels)
    if sources is None and kind == "liger":
        return _liger_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets), (targets != -100).sum()
    if sources is None:
        return chunked_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets, chunk_size), (targets != -100).sum()
    token_sources = sources.label_sources[:, 1:].flatten().clamp(min=0)  # [N]; -1 only where the label is ignored
    weights = None if sources.weights is None else sources.weights[token_sources]  # [N] fp32
    if kind == "liger":
        if weights is not None:
            raise RecipeError("recipe", ["model.loss: liger cannot weight sources (loss_weight); use chunked"])
        return _liger_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets), (targets != -100).sum(), None
    if kind == "full":
        total, per_token = _token_losses(lm_head(hidden)[:, :-1].flatten(0, 1), targets, weights)
    else:
        total, per_token = chunked_loss_sum(hidden[:, :-1].flatten(0, 1), lm_head, targets, chunk_size, weights)
    per_source = per_token.new_zeros(sources.count, dtype=torch.float64).index_add_(0, token_sources,
                                                                                     per_token.double())
    return total, (targets != -100).sum(), per_source


def _liger_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    if not hidden.is_cuda:
        raise RecipeError("recipe", [f"model.loss: liger runs on CUDA only, not on {hidden.device.type}"])
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # reads the head's weight directly: the recipe refuses liger with ZeRO-3, where it is partitioned
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
    return fused(lm_head.weight, hidden, targets, getattr(lm_head, "bias", None)).float()


def chunked_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk_size: int,
                     weights: torch.Tensor | None | bool = False):
    """Summed fp32 cross-entropy of hidden [N, D] -> targets [N], `chunk_size` tokens at a time: each chunk's logits
    live only inside its checkpoint (recomputed in backward), so at most one chunk's [chunk, V] is held.

    `weights` False: the sum only (as always). None or [N] fp32 per-token weights: (the weighted sum, the unweighted
    per-token losses [N] without gradient), both from each chunk's one log-softmax.

    The head is called as a module, so ZeRO-3 gathers its (partitioned) weight for each call; every rank then must
    call it equally often, so under a partitioned head the chunk count is the largest of all ranks' (a rank with
    fewer tokens pads with chunks of one ignored token)."""
    from torch.utils.checkpoint import checkpoint

    count = -(-hidden.shape[0] // chunk_size)
    per_token = weights is not False
    token_weights = weights if per_token and weights is not None else None
    chunks = [(hidden[i:i + chunk_size], targets[i:i + chunk_size],
               None if token_weights is None else token_weights[i:i + chunk_size])
              for i in range(0, hidden.shape[0], chunk_size)]
    padding = (hidden[:1], torch.full_like(targets[:1], -100), None)  # one ignored token: loss 0, gradient 0
    padded = _chunks_on_every_rank(count, lm_head) - count
    chunks += [padding] * padded
    total, losses = hidden.new_zeros((), dtype=torch.float32), []
    for chunk, chunk_targets, chunk_weights in chunks:
        if not per_token:
            total = total + checkpoint(_chunk_loss, lm_head, chunk, chunk_targets, use_reentrant=False)
            continue
        chunk_total, chunk_losses = checkpoint(_chunk_token_losses, lm_head, chunk, chunk_targets, chunk_weights,
                                               use_reentrant=False)
        total = total + chunk_total
        losses.append(chunk_losses)
    if not per_token:
        return total
    return total, torch.cat(losses[:len(losses) - padded])  # [N]


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(lm_head(hidden).float(), targets, ignore_index=-100, reduction="sum")


def _chunk_token_losses(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                        weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _token_losses(lm_head(hidden), targets, weights)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor,
                  weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, per-token losses [N] without gradient) of logits [N, V] against targets [N].

    Unweighted, the sum is cross_entropy(reduction="sum") bit for bit: cross_entropy is log_softmax then nll_loss
    (ATen's cross_entropy_loss), and the per-token losses are read from the same log-probabilities (ignored: 0)."""
    log_probs = nn.functional.log_softmax(logits.float(), 1)  # [N, V]
    per_token = nn.functional.nll_loss(log_probs.detach(), targets, ignore_index=-100, reduction="none")  # [N]
    if weights is None:
        total = nn.functional.nll_loss(log_probs, targets, ignore_index=-100, reduction="sum")
    else:
        total = (nn.functional.nll_loss(log_probs, targets, ignore_index=-100, reduction="none") * weights).sum()
    return total, per_token


def _chunks_on_every_rank(count: int, lm_head: nn.Module) -> int:
    """The most chunks any rank has, when the head is ZeRO-3 partitioned over several ranks; else `count`."""
    partitioned = any(hasattr(p, "ds_id") for p in lm_head.parameters())
    if not (partitioned and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return count
    most = torch.tensor([count], device=lm_head.weight.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def sequence_logps(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                   chunk_size: int = DEFAULT_LOSS[1]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's targets [B] fp32, with gradient; target count per row [B]) of the LLM's
    last hidden states [B, T, D] through `lm_head` against labels [B, T]: what preference losses compare (TRL's
    `logps`). Chunked as chunked_loss_sum is: the [tokens, vocab] logits are never held whole."""
    from torch.utils.checkpoint import checkpoint

    rows, length = labels.shape[0], labels.shape[1] - 1
    flat, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # [N, D], [N]
    count = -(-flat.shape[0] // chunk_size)
    pieces = [checkpoint(_chunk_target_logps, lm_head, flat[i:i + chunk_size], targets[i:i + chunk_size],
                         use_reentrant=False) for i in range(0, flat.shape[0], chunk_size)]
    for _ in range(_chunks_on_every_rank(count, lm_head) - count):  # ZeRO-3: as many head calls as every rank
        pieces.append(0.0 * checkpoint(_chunk_target_logps, lm_head, flat[:1], torch.full_like(targets[:1], -100),
                                       use_reentrant=False).sum())
    logps = torch.cat(pieces[:count]).view(rows, length)  # [B, T-1]; 0 where the label is ignored
    extra = sum(pieces[count:], logps.new_zeros(()))
    return logps.sum(1) + extra, (labels[:, 1:] != -100).sum(1)


def _chunk_target_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per token [N] fp32 (0 where the target is ignored)."""
    log_probs = nn.functional.log_softmax(lm_head(hidden).float(), -1)  # [N, V]
    kept = targets != -100
    return log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * kept


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss in fp32, target count) of logits [B, T, V] against labels [B, T] (-100: not a target).

    Summed, not averaged: the engine normalises over every target token of an optimizer step (all micro-batches,
    all ranks), not per micro-batch."""
    targets = labels[:, 1:]
    loss_sum = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()
