"""Tiling in the loader's workers (data_pipelines/image/tiles.py) against transformers' LlavaOnevisionImageProcessor:
the same grid, the same tiles within a grey level, and tiled batches that carry each image's layout."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from data_pipelines.image.tiles import AnyResTiles, grid_pinpoints
from tests.pictures import noise_picture

SIZE, PATCH = 64, 8
PINPOINTS = grid_pinpoints(SIZE, 1, 4)


def processor_pixels(images: list[Image.Image]) -> np.ndarray:
    """transformers' tiles as uint8 (rescale and normalise off), trailing padding tiles dropped."""
    processor = LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_grid_pinpoints=PINPOINTS,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3, do_rescale=False,
                                                do_normalize=False)
    out = processor(images=[images], return_tensors="np")
    return np.rint(out["pixel_values"][0]).astype(int)


def test_pinpoints_are_every_grid_within_the_tile_bounds():
    assert grid_pinpoints(32, 2, 3) == [[32, 64], [32, 96], [64, 32], [96, 32]]
    assert all(h * w <= 4 * SIZE * SIZE for h, w in PINPOINTS) and [SIZE, SIZE] in PINPOINTS


@pytest.mark.parametrize("height,width", [(64, 64), (100, 300), (37, 150), (129, 64), (500, 380), (200, 200)])
def test_tiles_of_an_image_alone_are_the_image_processors(height, width):
    """Thumbnail first, then the grid row by row, black padding: transformers' output within one grey level on at
    least 99.5% of the values (antialiased bicubic in torch against PIL's)."""
    tiler = AnyResTiles(SIZE, PATCH, PINPOINTS, 4, pad_colour=(127, 127, 127))
    image = noise_picture(height, width)
    tiles, layout = tiler([image])
    theirs = processor_pixels([image])
    assert tiles.dtype == torch.uint8 and tiles.shape == theirs.shape
    assert layout.tolist() == [[height, width, theirs.shape[0]]]
    difference = np.abs(tiles.numpy().astype(int) - theirs)
    assert (difference <= 1).mean() >= 0.995, difference.max()


def test_an_image_beside_others_is_squared_with_the_mean_colour_not_tiled():
    tiler = AnyResTiles(SIZE, PATCH, PINPOINTS, 4, pad_colour=(127, 127, 127))
    images = [noise_picture(40, 150, 1), noise_picture(90, 60, 2)]
    tiles, layout = tiler(images)
    theirs = LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_grid_pinpoints=PINPOINTS,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3, do_rescale=False,
                                             do_normalize=False)(images=[images], return_tensors="np")
    assert layout[:, 2].tolist() == [1, 1] and tiler.tokens(layout) == [65, 65]  # 8 x 8 patches + a newline
    difference = np.abs(tiles.numpy().astype(int) - np.rint(theirs["pixel_values"][:, 0]).astype(int))
    assert (difference <= 1).mean() >= 0.995


def test_max_tokens_bounds_every_count():
    tiler = AnyResTiles(SIZE, PATCH, PINPOINTS, 4, pad_colour=(0, 0, 0))
    sizes = [(h, w) for h in (10, 64, 100, 257, 999) for w in (10, 64, 100, 257, 999)]
    counts = tiler.tokens(torch.tensor([[h, w, 2] for h, w in sizes]))
    assert max(counts) <= tiler.max_tokens()
