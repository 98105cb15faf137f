"""Memory before spending GPU-hours: per stage, the per-GPU memory of a run by component, and whether it fits.

What a stage holds on each GPU (N GPUs, ZeRO stage z, b bytes per value of the compute dtype: 2 for bf16, 4 for
fp32; P parameters of which T train):
- weights     P*b, split over N under ZeRO-3;
- gradients   T*b with ZeRO-0/1 (every rank holds all); from ZeRO-2 on only this rank's reduced partition, which
              DeepSpeed keeps in fp32 for the update: 4T/N;
- optimizer   AdamW's two fp32 moments (8T) and the fp32 master copy DeepSpeed keeps of what trains (4T; ZeRO-0 in
              fp32 updates the weights themselves), split over N from ZeRO-1 on;
- buffers     DeepSpeed's gradient-reduction bucket, allocated whole whatever the model's size (reduce_bucket_size,
              5e8 values, in the compute dtype; ZeRO-1/2/3); ZeRO-3 also gathers the parameters in use: its prefetch
              bucket and one LLM layer. The reduction bucket comes with the backward pass's first trained gradient:
              alongside all activations when the LLM trains (or under ZeRO-3), after the LLM's backward otherwise
              (the peak is then the larger of the two);
- activations what autograd saves for the backward pass, per micro-batch of micro_batch_size x max_length tokens (the
              worst case: packed rows are full): for each LLM layer about (ACT_HIDDEN * hidden + ACT_MLP *
              intermediate) values per token (sdpa / flash attention: no sequence-squared term), FROZEN_SHARE of
              that when the LLM is frozen (gradients still pass through it to the projector); with activation
              checkpointing only each layer's input plus one layer's worth recomputed; the vision encoder's only when it
              trains (its last k blocks with partial unfreezing), over the patches of the micro-batch's images;
- logits      the LM head's output, its fp32 log-softmax and that one's gradient (logit_bytes per token and
              vocabulary entry), for all the micro-batch's tokens, or one loss chunk's with a chunked loss;
- reference   a preference stage (dpo, mpo) with `reference: copy`: a second copy of the weights (P*b, split over N
              under ZeRO-3); none with `reference: adapters`. A micro-batch of a preference stage is 2 x
              micro_batch_size rows (chosen and rejected) of max_length tokens, with each pair's images once.
Checked against `bench train --tensor-memory`'s measured peak of live tensors (`compare`; tests/train/test_memory.py):
the tiny recipe's packed stage 2 and a real-width, reduced-depth LLM (tests/fixtures), within 20%.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from train.stages import resolve_stage

ACT_HIDDEN = 12      # values saved per token per layer per hidden unit: norms, q/k/v/o in and out, residuals
ACT_MLP = 4          # ... per MLP unit: gate and up outputs, the activation, their product
FROZEN_SHARE = 0.65  # of that a frozen LLM saves to pass gradients back to a trained projector: a frozen linear
                     # layer keeps no input (it makes no weight gradient); norms, activations and attention still do


def logit_bytes(b: int) -> int:
    """Per token and vocabulary entry: the logits (b bytes), their fp32 log-softmax for the loss and its gradient."""
    return b + 4 + 4


RESERVED = 0.10      # of a GPU's memory left for the CUDA context, the allocator's fragmentation and buffers
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'80GB', '80 GiB', '81920MB' -> bytes; ValueError naming the text otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B)\s*", text.upper())
    size = int(float(match.group(1)) * UNITS[match.group(2)]) if match else 0
    if size < 1:  # a GPU of no memory fits nothing: a typo, not a question
        raise ValueError(f"{text!r} is not a size such as 80GB or 80GiB")
    return size


@dataclass
class Shapes:
    """What the estimate needs of a model (ModelFamily.memory_shapes): sizes of the LLM and the vision encoder."""

    llm_layers: int
    llm_hidden: int
    llm_intermediate: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_tokens_per_image: int  # patches the encoder sees per image (its largest for dynamic resolution)
    image_tokens_per_image: int   # tokens an image takes in the LLM's sequence


@dataclass
class StageMemory:
    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    logits: int
    activations_checkpointed: int  # what activations would be with checkpointing on every component
    buffers_alongside: bool        # the buffers add to the activations (else the peak is the larger of the two)
    total: int
    fits: bool | None              # None without a GPU size
    zero_stage: int                # the ZeRO stage a run on that many GPUs uses (train/stages.py resolve_stage)
    reference: int = 0             # a preference stage's frozen reference copy (0: none, or adapters switched off)

    def as_dict(self) -> dict:
        return asdict(self)


REDUCE_BUCKET = 500_000_000   # DeepSpeed's default reduce_bucket_size (ResolvedStage.deepspeed_config keeps it)
PREFETCH_BUCKET = 50_000_000  # ... and stage3_prefetch_bucket_size


def estimate(shapes: Shapes, params: dict[str, int], trainable: dict[str, int], stage, *, gpus: int,
             gpu_memory: int | None = None, loss_chunk: int | None = None) -> StageMemory:
    """Per-GPU bytes of one stage (see the module docstring). `params`/`trainable`: per component, from the stage
    plan (train/stages.py), so adapters and partial unfreezing count as training does. `loss_chunk`: tokens whose
    logits a chunked loss holds at once (None: the whole micro-batch's)."""
    split = max(gpus, 1)
    resolved = resolve_stage(stage, split)  # what a run on that many GPUs uses; refuses a batch that does not divide
    b, zero = resolved.bytes_per_value, resolved.zero_stage
    total_params, trained = sum(params.values()), sum(trainable.values())
    weights = total_params * b // (split if zero == 3 else 1)
    gradients = trained * 4 // split if zero >= 2 else trained * b
    master = 0 if (zero == 0 and b == 4) else 4 * trained
    optimizer = (8 * trained + master) // (split if zero >= 1 else 1)
    buffers = 0 if zero == 0 else REDUCE_BUCKET * b
    if zero == 3:
        layer = 4 * shapes.llm_hidden ** 2 + 3 * shapes.llm_hidden * shapes.llm_intermediate
        buffers += (PREFETCH_BUCKET + layer) * b
    rows = 1 if stage.objective == "sft" else 2  # a preference pair is two rows (chosen, rejected), one image set
    tokens = rows * stage.micro_batch_size * stage.max_length
    activations, checkpointed = _activations(shapes, trainable, stage, tokens, b, images_from=tokens // rows)
    reference = weights if stage.objective != "sft" and stage.preference.reference == "copy" else 0
    logits = min(tokens, loss_chunk or tokens) * shapes.vocab * logit_bytes(b)
    # the reduction bucket is allocated when the backward pass makes its first trained gradient: at its start when
    # the LLM trains (every activation still held), after the LLM's backward when only what feeds it trains
    alongside = bool(trainable.get("llm")) or zero == 3
    states = weights + gradients + optimizer + reference
    total = states + (buffers + activations + logits if alongside else max(buffers, activations + logits))
    fits = None if gpu_memory is None else total <= gpu_memory * (1 - RESERVED)
    return StageMemory(weights, gradients, optimizer, buffers, activations, logits, checkpointed, alongside, total,
                       fits, zero, reference)


def _activations(shapes: Shapes, trainable: dict[str, int], stage, tokens: int, b: int,
                 images_from: int) -> tuple[int, int]:
    """(saved activations of one micro-batch, the same with checkpointing on every component); `images_from`: the
    tokens whose images the vision encoder sees (a preference pair's two rows share one image set)."""
    checkpointed = stage.gradient_checkpointing
    per_layer = tokens * (ACT_HIDDEN * shapes.llm_hidden + ACT_MLP * shapes.llm_intermediate) * b
    if not trainable.get("llm"):
        per_layer = int(per_layer * FROZEN_SHARE)
    llm_full = shapes.llm_layers * per_layer
    llm_ckpt = shapes.llm_layers * tokens * shapes.llm_hidden * b + per_layer
    vision_full = vision_ckpt = 0
    if trainable.get("vision_encoder"):
        images = max(1, images_from // max(shapes.image_tokens_per_image, 1))
        vision_tokens = images * shapes.vision_tokens_per_image
        blocks = stage.vision_encoder_last_blocks or shapes.vision_layers
        vision_layer = vision_tokens * (ACT_HIDDEN * shapes.vision_hidden + ACT_MLP * shapes.vision_intermediate) * b
        vision_full = blocks * vision_layer
        vision_ckpt = blocks * vision_tokens * shapes.vision_hidden * b + vision_layer
    llm = llm_ckpt if checkpointed is True or "llm" in (checkpointed or []) else llm_full
    vision = vision_ckpt if checkpointed is True or "vision_encoder" in (checkpointed or []) else vision_full
    return llm + vision, llm_ckpt + vision_ckpt


def compare(run: dict, memory: dict, tolerance: float = 0.2) -> dict:
    """A stage's estimate (StageMemory.as_dict(), for the run's world size) against a `bench train --json` run's
    measured peak: the allocator's peak on a GPU, the peak of live tensors on CPU (`--tensor-memory`; the process's
    RSS there also holds the runtime, and leaves the untouched reduction bucket out). Compared whole and without the
    buffers when they add to the rest (exact allocations, which on a small model would hide the rest)."""
    if "peak_tensor_bytes" in run:
        measured = run["peak_tensor_bytes"]
    elif run.get("peak_mem_kind") == "cuda_allocated":
        measured = run["peak_mem_bytes"]
    else:
        raise ValueError("a CPU run measures tensor memory only with bench train --tensor-memory")
    rows = {"total": (measured, memory["total"])}
    if memory["buffers_alongside"]:
        rows["without_buffers"] = (measured - memory["buffers"], memory["total"] - memory["buffers"])
    return {name: {"measured": m, "estimated": e, "ratio": round(e / m, 3), "within": abs(e / m - 1) <= tolerance}
            for name, (m, e) in rows.items()}


def format_plan(memory: dict, gpu_memory: int | None, stage_zero: int) -> str:
    """The estimate of one stage (StageMemory.as_dict()) as the lines `recipe check` prints; `stage_zero`: the
    recipe's ZeRO stage (one GPU runs fp32 ZeRO-1/2 as ZeRO-0, and the estimate says so)."""
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    states = memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["buffers"] + memory["reference"]
    verdict = "" if memory["fits"] is None else (" -> fits" if memory["fits"] else " -> DOES NOT FIT")
    room = f" of {gib(gpu_memory)} ({RESERVED:.0%} kept free)" if gpu_memory else ""
    return "\n".join([
        f"  memory per GPU: {gib(memory['total'])}{room}{verdict}"
        + (f" (run as ZeRO-{memory['zero_stage']} on one GPU)" if memory["zero_stage"] != stage_zero else ""),
        f"    states {gib(states)}: weights {gib(memory['weights'])}, gradients {gib(memory['gradients'])}, "
        f"optimizer {gib(memory['optimizer'])}, buffers {gib(memory['buffers'])}"
        + (f", reference copy {gib(memory['reference'])}" if memory["reference"] else "")
        + ("" if memory["buffers_alongside"] else " (freed activations make room for them)"),
        f"    activations {gib(memory['activations'])} (all checkpointed: {gib(memory['activations_checkpointed'])}),"
        f" logits {gib(memory['logits'])}"])


class TensorPeak(TorchDispatchMode):
    """The peak of live tensor bytes while active (`bench train --tensor-memory`): what an accelerator's allocator
    would hold, measured on CPU, where the process's RSS also holds the Python and torch runtime and lazily backed
    buffers. Counts each storage once (views share it), from the op that made it until it is freed; `track`
    adds what existed before (the model's parameters and buffers)."""

    def __init__(self, model=None):
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.bytes = self.peak = 0
        if model is not None:
            self.track([*model.parameters(), *model.buffers()])

    def track(self, tensors) -> None:
        for tensor in tensors:
            self._add(tensor)
        self.peak = max(self.peak, self.bytes)

    def _add(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self.live:  # seen: a view, an in-place op, or a resize
            self.bytes += size - self.live[key][1]
            self.live[key] = (self.live[key][0], size)
            return
        self.live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
        self.bytes += size

    def _free(self, key: int) -> None:
        _, size = self.live.pop(key, (None, 0))
        self.bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._add(tensor)
        self.peak = max(self.peak, self.bytes)
        return out
