"""The baseline of `bench train --baseline trainer`: the same stage trained by transformers' `Trainer`, which LLaVA,
LLaMA-Factory and ms-swift build on.

Same model (the family's training module, its stage plan applied), same micro-batches (the stage's own loader,
normalised as the engine normalises them), same optimizer (the stage's AdamW parameter groups and warmup-cosine
schedule), same gradient accumulation, clipping and precision; Trainer's own loop does the rest (its loss is the
micro-batch's mean token loss, as in those frameworks). Timed as our runs are: the steps after `warmup`, from
Trainer's step callbacks; real tokens are the attention masks' sums of the micro-batches those steps consumed.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from data_pipelines.collate import model_inputs


class _MeanLoss(nn.Module):
    """Trainer calls model(**inputs) and reads outputs["loss"]: the micro-batch's mean token loss."""

    def __init__(self, training_module: nn.Module):
        super().__init__()
        self.inner = training_module

    def forward(self, num_items_in_batch=None, **inputs):  # Trainer's token count: the mean here is per micro-batch
        loss_sum, targets = self.inner(**inputs)
        return {"loss": loss_sum / targets.clamp(min=1)}


class _Batches(IterableDataset):
    """The loader's micro-batches as Trainer's dataset (one item = one collated micro-batch), counting what each
    holds."""

    def __init__(self, loader, device):
        self.loader, self.device, self.consumed = loader, device, []  # (real tokens, samples) per micro-batch
        self.mean, self.std = getattr(loader, "image_mean", None), getattr(loader, "image_std", None)

    def __iter__(self):
        for batch in self.loader:
            self.consumed.append((int(batch["attention_mask"].sum()), batch.get("num_samples", len(batch["input_ids"]))))
            yield model_inputs(batch, self.device, self.mean, self.std)


class _StepClock(TrainerCallback):
    """When each optimizer step ends (and when training began)."""

    def __init__(self):
        self.ends = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def measure_trainer(family, model, stage, loader, *, warmup: int, steps: int, work) -> dict:
    """Train `warmup + steps` optimizer steps with Trainer; tokens/s and samples/s over the last `steps`."""
    from train.engine import deepspeed_config
    from train.stages import build_optimizer, plan_stage

    plan_stage(family, model, stage)
    accumulation = deepspeed_config(stage, 1)["gradient_accumulation_steps"]
    optimizer, scheduler = build_optimizer(family, model, stage)
    cuda = torch.cuda.is_available()
    arguments = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
        max_steps=warmup + steps, max_grad_norm=stage.max_grad_norm, bf16=stage.precision == "bf16", use_cpu=not cuda,
        logging_strategy="no", save_strategy="no", report_to=[], dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, disable_tqdm=True, seed=0)
    batches, clock = _Batches(loader, torch.device("cuda" if cuda else "cpu")), _StepClock()
    trainer = Trainer(model=_MeanLoss(family.training_module(model)), args=arguments, train_dataset=batches,
                      optimizers=(optimizer, scheduler), data_collator=lambda items: items[0], callbacks=[clock])
    trainer.train()
    timed = batches.consumed[warmup * accumulation:(warmup + steps) * accumulation]
    seconds = clock.ends[warmup + steps] - clock.ends[warmup]
    return {"tokens_per_s": sum(t for t, _ in timed) / seconds, "samples_per_s": sum(s for _, s in timed) / seconds,
            "steps": steps, "seconds": seconds, "trainer": "transformers.Trainer"}
