"""What one optimizer step reports (StepResult), whatever the stage's objective: train/engine.py's next-token step
and train/objectives.py's preference step both return it, and the hooks (train/hooks.py) read it."""

from __future__ import annotations

from dataclasses import dataclass, field

from train import flops


@dataclass
class StepResult:
    """One optimizer step, summed over all ranks."""

    step: int
    loss: float              # sft: summed token loss / target tokens; dpo, mpo: the mean loss over the pairs
    applied: bool            # False: a non-finite loss or gradient somewhere; every rank skipped the update
    targets: int             # target tokens
    tokens: int              # real (non-pad) tokens
    samples: int             # samples (a preference stage: pairs)
    positions: int           # padded positions (tokens / positions: the non-pad share)
    flops: float             # model FLOPs (train/flops.py)
    seconds: float
    source_losses: dict[str, float] = field(default_factory=dict)  # source -> its targets' mean loss (unweighted)
    source_targets: dict[str, int] = field(default_factory=dict)   # source -> its target tokens
    lrs: dict[str, float] = field(default_factory=dict)  # param group -> the lr this step used (before the scheduler
                                                          # moves it on for the next step)
    extra: dict[str, float] = field(default_factory=dict)  # the objective's own metrics (preference: rewards/...)


def counts(ctx, micro_batches: list[dict]) -> list[float]:
    """This rank's real (non-pad) tokens, samples, padded positions and model FLOPs of a step (host-side data)."""
    return [sum(int(b["attention_mask"].sum()) for b in micro_batches),
            sum(b.get("num_samples", b["input_ids"].shape[0]) for b in micro_batches),
            sum(b["attention_mask"].numel() for b in micro_batches),
            sum(ctx.plan.flops.step_flops(flops.batch_counts(b, ctx.image_token_id, ctx.vision_length))
                for b in micro_batches)]
