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
    pixel_values: torch.Tensor | None  # [n_images, 3, H, W] ([n_tiles, 3, H, W] tiled, [n_patches, patch_dim]
                                       # flattened), None: no image
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3] (t, h, w in patches) with flattened patches
    image_tiles: torch.Tensor | None = None  # [n_images, 3] (height, width, tiles) with tiled images (tiles.py)
    source_id: int = -1  # the source's index in the stage's `data` (-1: unknown), for the loss per source
    token_sources: list[int] | None = None  # per token, when a packed row joins examples of several sources
    rejected: tuple[list[int], list[int]] | None = None  # a preference pair: the rejected answer's (input_ids,
                                                          # labels); input_ids/labels above hold the chosen one


# Per-image layouts of the images' rows in pixel_values when an image is not one row: each travels in the Example
# field and the batch key of its name, concatenated in image order like pixel_values.
IMAGE_LAYOUTS = ("image_grid_thw", "image_tiles")


def layouts(examples: list[Example]) -> dict[str, torch.Tensor | None]:
    """{layout key: the examples' layouts concatenated, or None when none has one}."""
    out = {}
    for key in IMAGE_LAYOUTS:
        parts = [getattr(example, key) for example in examples if getattr(example, key) is not None]
        out[key] = torch.cat(parts) if parts else None
    return out
