"""The training path's pixels: image bytes -> uint8 at the model's input size, and their normalisation.

Workers decode (data_pipelines/image/images.py) and resize to uint8 (4x less to move between processes than
float32), stored channels last (HWC memory order, as decoded and resized: no repacking on the worker); `normalize`
turns a batch of them into the vision encoder's float NCHW input on the training device. The resize reproduces
transformers' SigLIP (`squash`: bicubic to size x size) and CLIP (`shortest_edge_crop`: bicubic shortest edge to
size, centre crop) image processors: torch's antialiased uint8 bicubic matches Pillow's BICUBIC, which those
processors use, to within one grey level on almost every pixel, and is ~4x faster.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import numpy as np
import torch

from data_pipelines.image.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_jpeg_upright,
    load_upright_rgb,
    open_image,
)

ResizeMode = Literal["squash", "shortest_edge_crop"]
RESIZE_MODES = get_args(ResizeMode)  # the same names, for checks at run time


def load_pixels(data: bytes, image_size: int, resize_mode: ResizeMode = "squash",
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Image bytes -> [3, image_size, image_size] uint8, ready for `normalize`. Raises ImageError.

    A JPEG at least twice the target size is decoded at reduced size in the DCT domain (`Image.draft`: 1/2, 1/4
    or 1/8 scale, never below the target), which is both faster and itself an antialiasing downscale.
    """
    image = open_image(data, max_pixels)
    rgb = decode_jpeg_upright(data, image, image_size)
    if rgb is None:  # not a plain JPEG, or one libjpeg-turbo warned about: Pillow decodes it (or says why not)
        if image.format == "JPEG":
            image.draft("RGB" if image.mode == "RGB" else None, (image_size, image_size))
        rgb = np.array(load_upright_rgb(image))  # [H, W, 3] uint8, writable (torch refuses read-only arrays)
    return resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), image_size, resize_mode)


def resize_uint8(pixels: torch.Tensor, image_size: int, resize_mode: ResizeMode = "squash") -> torch.Tensor:
    """[3, H, W] uint8 -> [3, image_size, image_size] uint8 with antialiased bicubic resampling, stored channels last
    (HWC memory order). Given HWC input, as a decoded image is, torch's uint8 kernel writes that order directly;
    F.interpolate would repack its result to CHW, a scalar loop that cost a third of the resize. `normalize` gives
    NCHW-contiguous floats on the device, so the model's input is the same either way."""
    height, width = pixels.shape[-2:]
    if resize_mode == "squash":
        size = (image_size, image_size)
    elif resize_mode == "shortest_edge_crop":  # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = min(height, width), max(height, width)
        long = int(image_size * long / short)
        size = (long, image_size) if height > width else (image_size, long)
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if (height, width) != size:
        resized = torch.empty((1, pixels.shape[0], *size), dtype=torch.uint8, memory_format=torch.channels_last)
        # F.interpolate(pixels[None], size, mode="bicubic", antialias=True), into an HWC-ordered output; the input
        # HWC-ordered too (torch 2.13's AVX kernel asserts on CHW input with a channels-last output)
        torch.ops.aten._upsample_bicubic2d_aa.out(channels_last(pixels)[None], list(size), False, None, None,
                                                  out=resized)
        pixels = resized[0]
    if resize_mode == "shortest_edge_crop":  # centre crop exactly as transformers' center_crop rounds
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        pixels = pixels[:, top:top + image_size, left:left + image_size]
    return channels_last(pixels)


def stack_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """[3, H, W] images (as resize_uint8 gives them) -> [N, 3, H, W] stored channels last, which torch.cat keeps
    when collate joins samples (one image: a view, no copy)."""
    hwc = [pixels.permute(1, 2, 0) for pixels in images]
    return (hwc[0][None] if len(hwc) == 1 else torch.stack(hwc)).permute(0, 3, 1, 2)


def channels_last(pixels: torch.Tensor) -> torch.Tensor:
    """[C, H, W] -> the same values stored in HWC order (copied only when they are not already)."""
    hwc = pixels.permute(1, 2, 0)
    return pixels if hwc.is_contiguous() else hwc.contiguous().permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> float32 (pixels / 255 - mean) / std per channel, on the tensor's device.

    Matches an image processor's rescale (1/255) + normalize; run it on the training device after the copy. The
    result is NCHW-contiguous whatever the input's memory order (the loader's is channels last).
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    pixels = pixels.contiguous()  # the loader's pixels come channels last (HWC memory): NCHW from here on
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() / 255 - mean_t) / std_t
