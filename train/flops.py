"""Model FLOPs and MFU: what a step *had* to compute for its real tokens, over what the devices could do.

Convention (documented in the README, "Throughput and MFU"):
- A matmul weight of N parameters costs 2N FLOPs per token it processes in the forward pass. Per parameter the step
  counts a factor times that: 1 (forward only) for a frozen parameter upstream of everything trainable, 2 (forward +
  input gradients) for a frozen parameter that gradients pass through on their way to a trainable one upstream of it,
  3 (forward + input and weight gradients) for a trained parameter. "Upstream" follows the data flow: vision encoder,
  then projector, then LLM, and inside each component the order its parameters are registered in (embeddings,
  blocks in order, head), so the frozen first blocks of a partly unfrozen vision encoder count 1 and a frozen LLM
  behind a trained projector counts 2.
- Embedding lookups (token and position embeddings) are not matmuls and count 0. Norms and biases count as
  parameters (a rounding error).
- Attention scores and the weighted sum cost 4 * d * S^2 per layer per sequence in the forward pass (d = query
  width, S = the sequence's length; not halved for causal masking, as in PaLM's appendix B), with the factor of the
  layer's query projection. S is per *sample* (per image for the vision encoder), never per packed row.
- Tokens are real tokens: LLM tokens of each sample (padding excluded), vision patches per image, and image tokens
  in the LLM sequence for the projector.
MFU = model FLOPs per second per device / the device's peak dense bf16 FLOPs (PEAK_TFLOPS, or a given number).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from train.models.base import ModelFamily
from train.models.weights import parameter_size

PEAK_TFLOPS = {  # dense bf16 tensor-core peak per device, from the vendors' datasheets (SXM parts)
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "B200": 2250.0,
}
PEAK_TFLOPS_ENV = "KAKEHASHI_PEAK_TFLOPS"  # overrides the table, e.g. for a CPU or an unlisted part


def peak_flops(device: torch.device | None = None) -> float | None:
    """Peak FLOP/s of one device: the env override, else the table by CUDA device name, else None (unknown)."""
    if os.environ.get(PEAK_TFLOPS_ENV):
        return float(os.environ[PEAK_TFLOPS_ENV]) * 1e12
    if device is not None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, tflops in PEAK_TFLOPS.items():
            if part in name:
                return tflops * 1e12
    return None


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


@dataclass
class FlopPlan:
    """Per component: FLOPs per token it processes (sum of factor * 2N) and per unit of sum(S^2) (factor * 4d)."""

    per_token: dict[str, float] = field(default_factory=dict)
    per_square: dict[str, float] = field(default_factory=dict)

    def step_flops(self, counts: dict[str, tuple[int, int]]) -> float:
        """counts: component -> (tokens processed, sum over its sequences of length^2)."""
        return sum(self.per_token.get(c, 0.0) * tokens + self.per_square.get(c, 0.0) * squares
                   for c, (tokens, squares) in counts.items())


def plan_flops(family: ModelFamily, model: nn.Module) -> FlopPlan:
    """The FlopPlan of `model` under its current requires_grad flags (stages.plan_stage calls it)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    plan = FlopPlan()
    trainable_upstream = False
    for component, params in family.component_parameters(model).items():
        per_token = per_square = 0.0
        for name, param in params:
            trainable_upstream |= param.requires_grad
            factor = 3 if param.requires_grad else 2 if trainable_upstream else 1
            if id(param) not in embeddings:
                per_token += factor * 2 * parameter_size(param)
            width = _query_width(name, _shape(param))
            if width:
                per_square += factor * 4 * width
        plan.per_token[component], plan.per_square[component] = per_token, per_square
    return plan


def _query_width(name: str, shape: tuple[int, ...]) -> int:
    """Query width d of an attention layer, read off its query projection weight (none for other parameters)."""
    if name.endswith(("q_proj.weight", "q_proj.base_layer.weight")):
        return shape[0]
    if name.endswith(("attn.qkv.weight", "attn.qkv.base_layer.weight")):  # fused q, k, v (Qwen2-VL's ViT)
        return shape[0] // 3
    return 0


def batch_counts(batch: dict, image_token_id: int, vision_length: int | None) -> dict[str, tuple[int, int]]:
    """(tokens, sum of squared sequence lengths) per component for one collated micro-batch.

    `vision_length`: the vision tower's sequence length per image; None to read it from `image_grid_thw` (dynamic
    resolution: t * h * w patches per image)."""
    lengths = batch.get("sample_lengths") or batch["attention_mask"].sum(dim=1).tolist()
    image_tokens = int((batch["input_ids"] == image_token_id).sum())
    if batch.get("image_grid_thw") is not None:
        per_image = [int(t * h * w) for t, h, w in batch["image_grid_thw"].tolist()]
    else:
        images = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
        per_image = [vision_length or 0] * images
    return {
        "vision_encoder": (sum(per_image), sum(s * s for s in per_image)),
        "projector": (image_tokens, 0),
        "llm": (sum(lengths), sum(s * s for s in lengths)),
    }
