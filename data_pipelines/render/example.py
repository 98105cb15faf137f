"""One training example, tokenized and with its images turned into pixel tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    key: str
    source: str  # SourceSpec.name it came from
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # [n_images, 3, H, W] (or [n_patches, patch_dim] flattened), None: no image
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3] (t, h, w in patches) with flattened patches
    source_id: int = -1  # the source's index in the stage's `data` (-1: unknown), for the loss per source
    token_sources: list[int] | None = None  # per token, when a packed row joins examples of several sources
    rejected: tuple[list[int], list[int]] | None = None  # a preference pair: the rejected answer's (input_ids,
                                                          # labels); input_ids/labels above hold the chosen one
