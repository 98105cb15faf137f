"""Memory before spending GPU-hours: per stage, the per-GPU memory of a run by component, and whether it fits.

What a stage holds on each GPU (N GPUs, ZeRO stage z, b bytes per value: 2 for bf16, 4 for fp32; P parameters of
which T train):
- weights     P*b, split over N under ZeRO-3 (plus the gathered working set of one block);
- gradients   T*b, split over N from ZeRO-2 on;
- optimizer   AdamW's two fp32 moments (8T) and the fp32 master copy DeepSpeed keeps of what trains (4T; ZeRO-0 in
              fp32 updates the weights themselves), split over N from ZeRO-1 on;
- activations what autograd saves for the backward pass, per micro-batch: for each LLM layer about
              (ACT_HIDDEN * hidden + ACT_MLP * intermediate) values per token (sdpa / flash attention: no
              sequence-squared term), only the layer inputs with activation checkpointing (plus one layer's worth
              recomputed); the vision encoder's only when it trains (its last k blocks with partial unfreezing);
- logits      the LM head's output and its fp32 loss (full logits: tokens x vocabulary; the chunked loss holds one
              chunk of tokens at a time).
The coefficients are checked against `bench train`'s measured peak tensor memory (tests/train/test_memory.py: the
tiny recipe and a real-width, reduced-depth Asagi-2B stage, within 20%).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

ACT_HIDDEN = 12      # values saved per token per layer per hidden unit: norms, q/k/v/o in and out, residuals
ACT_MLP = 4          # ... per MLP unit: gate and up outputs, the activation, their product
def LOGIT_BYTES(b: int) -> int:  # noqa: N802 - a constant of the estimate, per compute-dtype size
    return b + 4 + 4  # per token and vocabulary entry: the logits, their fp32 copy for the loss, its gradient


RESERVED = 0.10      # of a GPU's memory left for the CUDA context, the allocator's fragmentation and buffers
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'80GB', '80 GiB', '81920MB' -> bytes; ValueError naming the text otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B)\s*", text.upper())
    if not match:
        raise ValueError(f"{text!r} is not a size such as 80GB or 80GiB")
    return int(float(match.group(1)) * UNITS[match.group(2)])


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
    activations: int
    logits: int
    activations_checkpointed: int  # what activations would be with checkpointing on every component
    total: int
    fits: bool | None              # None without a GPU size

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(shapes: Shapes, params: dict[str, int], trainable: dict[str, int], stage, *, gpus: int,
             gpu_memory: int | None = None, chunked_loss: bool = True, loss_chunk: int = 1024) -> StageMemory:
    """Per-GPU bytes of one stage (see the module docstring). `params`/`trainable`: per component, from the stage
    plan (train/stages.py), so adapters and partial unfreezing count as training does."""
    b = 2 if stage.precision == "bf16" else 4
    total_params, trained = sum(params.values()), sum(trainable.values())
    zero, split = stage.zero_stage, max(gpus, 1)
    weights = total_params * b // (split if zero == 3 else 1)
    gradients = trained * b // (split if zero >= 2 else 1)
    master = 0 if (zero == 0 and b == 4) else 4 * trained
    optimizer = (8 * trained + master) // (split if zero >= 1 else 1)
    tokens = stage.micro_batch_size * stage.max_length
    activations, checkpointed = _activations(shapes, trainable, stage, tokens, b)
    logits_tokens = min(tokens, loss_chunk) if chunked_loss else tokens
    logits = logits_tokens * shapes.vocab * LOGIT_BYTES(b)
    total = weights + gradients + optimizer + activations + logits
    fits = None if gpu_memory is None else total <= gpu_memory * (1 - RESERVED)
    return StageMemory(weights, gradients, optimizer, activations, logits, checkpointed, total, fits)


def _activations(shapes: Shapes, trainable: dict[str, int], stage, tokens: int, b: int) -> tuple[int, int]:
    """(saved activations of one micro-batch, the same with checkpointing on every component)."""
    checkpointed = stage.gradient_checkpointing
    per_layer = tokens * (ACT_HIDDEN * shapes.llm_hidden + ACT_MLP * shapes.llm_intermediate) * b
    llm_full = shapes.llm_layers * per_layer
    llm_ckpt = shapes.llm_layers * tokens * shapes.llm_hidden * b + per_layer
    vision_full = vision_ckpt = 0
    if trainable.get("vision_encoder"):
        images = max(1, tokens // max(shapes.image_tokens_per_image, 1))
        vision_tokens = images * shapes.vision_tokens_per_image
        blocks = stage.vision_encoder_last_blocks or shapes.vision_layers
        vision_layer = vision_tokens * (ACT_HIDDEN * shapes.vision_hidden + ACT_MLP * shapes.vision_intermediate) * b
        vision_full = blocks * vision_layer
        vision_ckpt = blocks * vision_tokens * shapes.vision_hidden * b + vision_layer
    in_use = {"llm": llm_ckpt if checkpointed is True or "llm" in (checkpointed or []) else llm_full,
              "vision": vision_ckpt if checkpointed is True or "vision_encoder" in (checkpointed or [])
              else vision_full}
    return in_use["llm"] + in_use["vision"], llm_ckpt + vision_ckpt


def format_plan(memory: dict, gpu_memory: int | None) -> str:
    """The estimate of one stage (StageMemory.as_dict()) as the lines `recipe check` prints."""
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    states = memory["weights"] + memory["gradients"] + memory["optimizer"]
    verdict = "" if memory["fits"] is None else (": fits" if memory["fits"] else ": DOES NOT FIT")
    return (f"  memory per GPU: states {gib(states)} (weights {gib(memory['weights'])}, gradients "
            f"{gib(memory['gradients'])}, optimizer {gib(memory['optimizer'])}), activations "
            f"{gib(memory['activations'])} (all checkpointed: {gib(memory['activations_checkpointed'])}), logits "
            f"{gib(memory['logits'])}; total {gib(memory['total'])}"
            + (f" of {gib(gpu_memory)} ({RESERVED:.0%} kept free){verdict}" if gpu_memory else ""))
