"""Dynamic tiling (LLaVA-OneVision's "anyres"): decoded images -> uint8 tiles at the tower's size, and token counts.

A fixed-resolution tower reads a large image as a grid of tiles plus a thumbnail. Per image, the grid is the one of
`grid_pinpoints` (every rows x cols with min_tiles <= rows * cols <= max_tiles, in tiles of `image_size`) that keeps
the most of the image's resolution and wastes the least (transformers' select_best_resolution); the image is resized
into it with its aspect kept, padded with black to fill it, and cut row by row. The thumbnail (the whole image
squashed to image_size) comes first. An image that shares its sample with other images is not tiled: it is padded
to a square with the processor's mean colour and squashed, as LlavaOnevisionImageProcessor does for multi-image input.

The LLM's image tokens per image (`tokens`) are what LlavaOnevisionProcessor counts: the thumbnail's patches, then
the tiles' patches with the padding rows or columns removed and one newline token per row. Workers produce uint8
(normalised on the training device) with torch's antialiased bicubic, within a grey level of the processor's PIL
resize on almost every pixel, as the fixed-size path (images.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from data_pipelines.image.pixels import resize_uint8


def grid_pinpoints(image_size: int, min_tiles: int, max_tiles: int) -> list[list[int]]:
    """[[height, width], ...] in pixels of every grid of rows x cols tiles with min_tiles <= rows * cols <= max_tiles;
    the order is transformers' (rows outer), which breaks ties in select_best_resolution."""
    return [[rows * image_size, cols * image_size] for rows in range(1, max_tiles + 1)
            for cols in range(1, max_tiles + 1) if min_tiles <= rows * cols <= max_tiles]


class AnyResTiles:
    """The loader's `patchify` for tiling families: images -> (pixel_values [N_tiles, 3, S, S] uint8,
    image_tiles [N_images, 3] long: each image's original height, width and tile count, thumbnail included)."""

    layout_key = "image_tiles"  # the batch key (and Example field) the layout travels under

    def __init__(self, image_size: int, patch_size: int, pinpoints: list[list[int]], max_tiles: int,
                 pad_colour: tuple[int, int, int]):
        self.image_size, self.patches_per_side = image_size, image_size // patch_size
        self.pinpoints, self.max_tiles, self.pad_colour = pinpoints, max_tiles, pad_colour

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        alone = len(images) == 1  # LLaVA-OneVision tiles only an image that is alone in its sample
        tiles, layout = [], []
        for image in images:
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W] uint8
            cut = self.tiled(pixels) if alone else self.squared(pixels)  # [n, 3, S, S]
            tiles.append(cut)
            layout.append((pixels.shape[1], pixels.shape[2], cut.shape[0]))
        return torch.cat(tiles), torch.tensor(layout, dtype=torch.long)

    def tiled(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [1 + rows * cols, 3, S, S]: the thumbnail, then the tiles row by row."""
        size, (height, width) = self.image_size, pixels.shape[1:]
        best_height, best_width = select_best_resolution((height, width), self.pinpoints)
        new_height, new_width = fitted_size(height, width, best_height, best_width)
        resized = torch.nn.functional.interpolate(pixels[None], size=(new_height, new_width), mode="bicubic",
                                                  antialias=True)[0] if (new_height, new_width) != (height, width) \
            else pixels
        canvas = torch.zeros(3, best_height, best_width, dtype=torch.uint8)  # black padding, as np.pad(0)
        top, left = (best_height - new_height) // 2, (best_width - new_width) // 2
        canvas[:, top:top + new_height, left:left + new_width] = resized
        rows, cols = best_height // size, best_width // size
        grid = canvas.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
        return torch.cat([resize_uint8(pixels, size)[None], grid])

    def squared(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [1, 3, S, S]: padded to a square with the mean colour (centred), then squashed."""
        height, width = pixels.shape[1:]
        side = max(height, width)
        canvas = torch.tensor(self.pad_colour, dtype=torch.uint8).view(3, 1, 1).repeat(1, side, side)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[:, top:top + height, left:left + width] = pixels
        return resize_uint8(canvas, self.image_size)[None]

    def rows(self, layout: torch.Tensor) -> list[int]:
        """pixel_values rows (tiles) per image."""
        return layout[:, 2].tolist()

    def tokens(self, layout: torch.Tensor) -> list[int]:
        """LLM image tokens per image of a layout [N, 3] (height, width, tiles)."""
        return [self.image_tokens(height, width, tiles > 1) for height, width, tiles in layout.tolist()]

    def image_tokens(self, height: int, width: int, tiled: bool) -> int:
        """LLM image tokens of one image, as LlavaOnevisionProcessor counts them (select strategy "full")."""
        return image_tokens(height, width, tiled, self.patches_per_side, self.image_size, self.pinpoints,
                            self.max_tiles)

    def max_tokens(self) -> int:
        """The most image tokens one image can take (memory plans): every tile's patches and a newline per row."""
        side = self.patches_per_side
        return side * side * (1 + self.max_tiles) + side * max(h for h, _ in self.pinpoints) // self.image_size


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The size an image takes inside the target with its aspect kept (transformers' get_patch_output_size)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def image_tokens(height: int, width: int, tiled: bool, side: int, image_size: int, pinpoints: list[list[int]],
                 max_tiles: int) -> int:
    """LlavaOnevisionProcessor._get_number_of_features for one image (`side`: patches per side of a tile)."""
    if not tiled:
        return side * side + 1  # the squared image and one newline
    best_height, best_width = select_best_resolution([height, width], pinpoints)
    current_height, current_width = side * (best_height // image_size), side * (best_width // image_size)
    if width / height > current_width / current_height:  # padding rows above and below are dropped
        new_height = int(round(height * (current_width / width), 7))
        current_height -= (current_height - new_height) // 2 * 2
    else:
        new_width = int(round(width * (current_height / height), 7))
        current_width -= (current_width - new_width) // 2 * 2
    unpadded, newlines = current_height * current_width, current_height
    ratio = math.sqrt(current_height * current_width / (max_tiles * side ** 2))
    if ratio > 1.1:  # anyres_max_N: features over N tiles' worth are interpolated down
        unpadded = int(current_height // ratio) * int(current_width // ratio)
        newlines = int(current_height // ratio)
    return side * side + unpadded + newlines
