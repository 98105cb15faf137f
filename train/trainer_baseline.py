"""The baseline of `bench train --baseline trainer`: the same stage trained by transformers' `Trainer`, which LLaVA,
LLaMA-Factory and ms-swift build on; a preference stage by TRL's `DPOTrainer` (`measure_dpo_trainer`).

Same model (the family's training module, its stage plan applied), same micro-batches (the stage's own loader,
normalised as the engine normalises them), same optimizer (the stage's AdamW parameter groups and warmup-cosine
schedule), same gradient accumulation, clipping and precision; Trainer's own loop does the rest (its loss is the
micro-batch's mean token loss, as in those frameworks). Timed as bench times our runs: from the end of the last
untimed step to the end of the last step (Trainer's step callbacks), data loading included; real tokens are the
attention masks' sums of the micro-batches those steps consumed.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from data_pipelines.batch.collate import model_inputs


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
    holds: (real tokens, samples, padded positions)."""

    def __init__(self, loader, device):
        self.loader, self.device, self.consumed = loader, device, []
        self.mean, self.std = getattr(loader, "image_mean", None), getattr(loader, "image_std", None)

    def __iter__(self):
        for batch in self.loader:
            mask = batch["attention_mask"]
            self.consumed.append((int(mask.sum()), batch.get("num_samples", mask.shape[0]), mask.numel()))
            yield model_inputs(batch, self.device, self.mean, self.std)


class StepClock(TrainerCallback):
    """When each optimizer step ends (the first entry: when training began), and, once trained, what each step
    held: the same fields as bench's clock of our steps."""

    def __init__(self):
        self.ends, self.records = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def measure_trainer(family, model, stage, loader, *, steps: int, work) -> StepClock:
    """Train `steps` optimizer steps with Trainer on this process's device; the clock of its steps."""
    from train.engine import enable_fast_paths
    from train.stages import build_optimizer, plan_stage, resolve_stage

    plan_stage(family, model, stage)
    resolved = resolve_stage(stage, 1)
    enable_fast_paths(family, model, resolved)  # the stage's activation checkpointing and compile, as ours
    accumulation = resolved.accumulation
    optimizer, scheduler = build_optimizer(family, model, stage)  # plain AdamW: Trainer clips it
    cuda = torch.cuda.is_available()
    arguments = TrainingArguments(  # bf16: Trainer's autocast over fp32 weights, as the frameworks on it train
        output_dir=str(work / "trainer"), per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
        max_steps=steps, max_grad_norm=stage.max_grad_norm, bf16=resolved.dtype == torch.bfloat16, use_cpu=not cuda,
        logging_strategy="no", save_strategy="no", report_to=[], dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, disable_tqdm=True, seed=0,
        # an iterable dataset would be dispatched (and sliced to the batch size, cutting a packed row's images):
        # each process iterates its own, as the frameworks' map-style datasets do
        accelerator_config={"dispatch_batches": False})
    batches, clock = _Batches(loader, torch.device("cuda" if cuda else "cpu")), StepClock()
    trainer = Trainer(model=_MeanLoss(family.training_module(model)), args=arguments, train_dataset=batches,
                      optimizers=(optimizer, scheduler), data_collator=lambda items: items[0], callbacks=[clock])
    trainer.train()
    for index in range(steps):
        held = batches.consumed[index * accumulation:(index + 1) * accumulation]
        clock.records.append({"tokens": sum(t for t, _, _ in held), "samples": sum(s for _, s, _ in held),
                              "positions": sum(p for _, _, p in held), "flops": None})
    return clock


class _PairBatches(_Batches):
    """A preference stage's micro-batches in TRL's layout: rows [chosen..., rejected...] as ours, completion_mask
    where our labels are targets, and each pair's images once per row (TRL's collator repeats them, so its forward
    encodes every image twice). The "images" key only tells DPOTrainer the data is a VLM's (it then leaves it
    unprocessed).

    DPOTrainer takes only a `datasets` dataset: it gets one of row numbers (one per micro-batch), and its collator
    hands over this iterator's next micro-batch instead, as Trainer's own loop would load it."""

    def __iter__(self):
        for inputs in super().__iter__():
            pixels = inputs.pop("pixel_values", None)
            yield {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                   "completion_mask": (inputs["labels"] != -100).long(),
                   **({"pixel_values": torch.cat([pixels, pixels])} if pixels is not None else {})}

    def stand_in(self, micro_batches: int):
        import datasets

        return datasets.Dataset.from_dict({"row": list(range(micro_batches)), "images": [None] * micro_batches})


def measure_dpo_trainer(family, model, stage, loader, processor, *, steps: int, work) -> StepClock:
    """Train `steps` steps of a preference stage with TRL's DPOTrainer on the same model (the family's transformers
    class), the same pairs and batches, the same beta and loss (MPO: TRL's [sigmoid, bco_pair, sft] with the stage's
    weights), the same optimizer and schedule; its reference a frozen copy of the starting model."""
    import copy

    import trl

    from train.engine import enable_fast_paths
    from train.errors import UsageError
    from train.stages import build_optimizer, plan_stage, resolve_stage

    model = family.transformers_model(model)
    if model is None:
        raise UsageError(f"bench train --baseline trainer on a {stage.objective} stage runs TRL's DPOTrainer, which "
                         f"trains transformers model classes; the {family.name} family's is kakehashi's own")
    spec, reference = stage.preference, copy.deepcopy(model).eval()
    plan_stage(family, model, stage)
    resolved = resolve_stage(stage, 1)
    enable_fast_paths(family, model, resolved)
    optimizer, scheduler = build_optimizer(family, model, stage)
    losses, weights = (["sigmoid"], [1.0]) if stage.objective == "dpo" else \
        (["sigmoid", "bco_pair", "sft"], [spec.mpo.preference, spec.mpo.quality, spec.mpo.generation])
    cuda = torch.cuda.is_available()
    arguments = trl.DPOConfig(
        output_dir=str(work / "dpo-trainer"), per_device_train_batch_size=1,
        gradient_accumulation_steps=resolved.accumulation, max_steps=steps, max_grad_norm=stage.max_grad_norm,
        bf16=resolved.dtype == torch.bfloat16, use_cpu=not cuda, logging_strategy="no", save_strategy="no",
        report_to=[], dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False,
        disable_tqdm=True, seed=0, beta=spec.beta, loss_type=[spec.loss] if stage.objective == "dpo" else losses,
        loss_weights=weights, label_smoothing=spec.label_smoothing, max_length=None,
        gradient_checkpointing=bool(resolved.checkpointed), accelerator_config={"dispatch_batches": False})
    batches, clock = _PairBatches(loader, torch.device("cuda" if cuda else "cpu")), StepClock()
    pairs = iter(batches)
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=arguments, processing_class=processor,
                             train_dataset=batches.stand_in(steps * resolved.accumulation),
                             optimizers=(optimizer, scheduler), callbacks=[clock],
                             data_collator=lambda items: next(pairs))
    trainer.train()
    for index in range(steps):
        held = batches.consumed[index * resolved.accumulation:(index + 1) * resolved.accumulation]
        clock.records.append({"tokens": sum(t for t, _, _ in held), "samples": sum(s for _, s, _ in held),
                              "positions": sum(p for _, _, p in held), "flops": None})
    return clock
