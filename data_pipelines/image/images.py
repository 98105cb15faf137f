"""Image bytes -> upright RGB, and the training path: bytes -> uint8 pixels at the model's input size.

Workers decode and resize to uint8 (4x less to move between processes than float32), stored channels last (HWC
memory order, as decoded and resized: no repacking on the worker); `normalize` turns a batch of them into the vision
encoder's float NCHW input on the training device. The resize reproduces transformers' SigLIP
(`squash`: bicubic to size x size) and CLIP (`shortest_edge_crop`: bicubic shortest edge to size, centre crop)
image processors: torch's antialiased uint8 bicubic matches Pillow's BICUBIC, which those processors use, to
within one grey level on almost every pixel, and is ~4x faster.

`load_pixels` decodes a YCbCr or greyscale JPEG with simplejpeg (libjpeg-turbo's TurboJPEG API, straight into a numpy
array) at the DCT scale `Image.draft` would pick: bit-identical to Pillow's decode (the same libjpeg-turbo code: the
accurate integer IDCT and fancy upsampling), without Pillow's copies into and out of its own image memory.
Anything else, and any JPEG that libjpeg-turbo decodes only with a warning, takes Pillow's path, so bad bytes raise
the ImageError they raised before.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal, Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as decompression bombs (e.g. 8000 x 8000)
ResizeMode = Literal["squash", "shortest_edge_crop"]
RESIZE_MODES = ("squash", "shortest_edge_crop")
EXIF_ORIENTATION = 0x0112


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
    rgb = decode_jpeg_upright(data, image, image_size)
    if rgb is None:  # not a plain JPEG, or one libjpeg-turbo warned about: Pillow decodes it (or says why not)
        if image.format == "JPEG":
            image.draft("RGB" if image.mode == "RGB" else None, (image_size, image_size))
        rgb = np.array(load_upright_rgb(image))  # [H, W, 3] uint8, writable (torch refuses read-only arrays)
    return resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), image_size, resize_mode)


def draft_scale(size: tuple[int, int], target: int) -> int:
    """The DCT-domain scale `Image.draft(mode, (target, target))` picks: the largest of 8, 4, 2 that keeps both
    sides at least `target`, else 1."""
    fits = min(size[0] // target, size[1] // target)
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def decode_jpeg_upright(data: bytes, image: Image.Image, image_size: int) -> np.ndarray | None:
    """A YCbCr or greyscale JPEG (`image`: `data` opened by `open_image`) -> upright [H, W, 3] uint8 at the scale
    `Image.draft` picks for `image_size`, decoded by simplejpeg; pixel for pixel what `load_pixels` gets from Pillow
    (decode, draft, EXIF orientation, RGB). None for anything else: other formats, CMYK, an MPO, EXIF that does not
    parse, or bytes libjpeg-turbo decodes only with a warning (truncated or corrupt data, which Pillow then reports
    or decodes as before)."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    width, height = image.size
    scale = draft_scale(image.size, image_size)
    shape = (-(-height // scale), -(-width // scale))  # libjpeg's scaled size rounds up, as draft's does
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # looked up as exif_transpose looks it up: values other than 2-8 leave the image as stored
            transpose = ORIENTATIONS.get(image.getexif().get(EXIF_ORIENTATION, 1))
        # min_factor and the minimum size together leave exactly the scale 1/scale
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=shape[0], min_width=shape[1],
                                     min_factor=scale, strict=True)
    except Exception:  # ValueError from libjpeg-turbo's errors and warnings; anything from a bad EXIF block
        return None
    if rgb.shape != (*shape, 3):
        return None
    return rgb if transpose is None else np.ascontiguousarray(transpose(rgb))


# EXIF orientation -> the transpose `ImageOps.exif_transpose` applies, on [H, W, C] arrays
ORIENTATIONS = {
    2: lambda pixels: pixels[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda pixels: pixels[::-1, ::-1],  # ROTATE_180
    4: lambda pixels: pixels[::-1],  # FLIP_TOP_BOTTOM
    5: lambda pixels: pixels.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda pixels: np.rot90(pixels, -1),  # ROTATE_270 (90 degrees clockwise)
    7: lambda pixels: pixels[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda pixels: np.rot90(pixels, 1),  # ROTATE_90 (counter-clockwise)
}


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
