"""Image bytes -> upright RGB, and the training path: bytes -> uint8 pixels at the model's input size.

Workers decode and resize to uint8 (4x less to move between processes than float32); `normalize` turns a batch of
them into the vision encoder's float input on the training device. The resize reproduces transformers' SigLIP
(`squash`: bicubic to size x size) and CLIP (`shortest_edge_crop`: bicubic shortest edge to size, centre crop)
image processors: torch's antialiased uint8 bicubic matches Pillow's BICUBIC, which those processors use, to
within one grey level on almost every pixel, and is ~4x faster.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as decompression bombs (e.g. 8000 x 8000)
ResizeMode = Literal["squash", "shortest_edge_crop"]
RESIZE_MODES = ("squash", "shortest_edge_crop")


class ImageError(ValueError):
    """Bytes that give no usable image. `reason` is the bad-sample stats key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Parse only the header (cheap) and refuse images over `max_pixels` before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd-but-readable files and on large images
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageError("image_too_large", str(err)) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not_an_image", f"not an image format ({len(data)} bytes)") from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad headers
        raise _decode_error(err) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError("image_too_large", f"{width}x{height} is over the {max_pixels:,} pixel limit")
    return image


def load_upright_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image, apply its EXIF orientation and convert it to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            image = ImageOps.exif_transpose(image)
    except Exception as err:
        raise _decode_error(err) from None
    return to_rgb(image)


def _decode_error(err: Exception) -> ImageError:
    # PIL says "image file is truncated", "Truncated File Read" or gives an EOF error when the bytes stop early
    truncated = "truncated" in str(err).lower() or isinstance(err, EOFError)
    return ImageError("truncated_image" if truncated else "undecodable_image", f"{type(err).__name__}: {err}")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Full-size upright RGB image (transparency composited over white). Raises ImageError."""
    return load_upright_rgb(open_image(data, max_pixels))


def load_pixels(data: bytes, image_size: int, resize_mode: ResizeMode = "squash",
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Image bytes -> [3, image_size, image_size] uint8, ready for `normalize`. Raises ImageError.

    A JPEG at least twice the target size is decoded at reduced size in the DCT domain (`Image.draft`: 1/2, 1/4
    or 1/8 scale, never below the target), which is both faster and itself an antialiasing downscale.
    """
    image = open_image(data, max_pixels)
    if image.format == "JPEG":
        image.draft("RGB" if image.mode == "RGB" else None, (image_size, image_size))
    rgb = np.array(load_upright_rgb(image))  # [H, W, 3] uint8, writable (torch refuses read-only arrays)
    return resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), image_size, resize_mode)


def resize_uint8(pixels: torch.Tensor, image_size: int, resize_mode: ResizeMode = "squash") -> torch.Tensor:
    """[3, H, W] uint8 -> [3, image_size, image_size] uint8 with antialiased bicubic resampling."""
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
        pixels = torch.nn.functional.interpolate(pixels[None], size=size, mode="bicubic", antialias=True)[0]
    if resize_mode == "shortest_edge_crop":  # centre crop exactly as transformers' center_crop rounds
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        pixels = pixels[:, top:top + image_size, left:left + image_size]
    return pixels.contiguous()


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> float32 (pixels / 255 - mean) / std per channel, on the tensor's device.

    Matches an image processor's rescale (1/255) + normalize; run it on the training device after the copy.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() / 255 - mean_t) / std_t


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # palette images may carry transparency; going through RGBA keeps it for the white composite
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale would saturate in a plain convert: rescale to 8 bits first
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, F
