"""Dynamic resolution (Qwen2-VL): decoded images -> flattened patches, grid per image, and image token counts.

Each image is resized (aspect kept) to between min_pixels and max_pixels in multiples of patch * merge, then cut
into patches; image i gives t*h*w patches and t*h*w / merge**2 tokens in the LLM's sequence, so the token count
depends on the image. The image processor is transformers' own (the one exported with the model).
"""

from __future__ import annotations

import torch
from PIL import Image


class DynamicResolutionPatches:
    layout_key = "image_grid_thw"  # the batch key (and Example field) the layout travels under

    def __init__(self, image_processor):
        self.image_processor = image_processor  # Qwen2VLImageProcessor(Pil)
        self.merge_size = image_processor.merge_size

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values [N_patches, 3 * temporal_patch * patch**2] float (normalised), image_grid_thw [N, 3]."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def rows(self, image_grid_thw: torch.Tensor) -> list[int]:
        """pixel_values rows (flattened patches) per image."""
        return image_grid_thw.prod(-1).tolist()

    def tokens(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Image tokens per image after the merger's merge x merge pooling."""
        return (image_grid_thw.prod(-1) // self.merge_size ** 2).tolist()
