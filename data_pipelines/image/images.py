"""Image bytes -> upright RGB: Pillow's decode, or simplejpeg's for plain JPEGs; no torch (the data tools that only
decode, and the command line's parser, import this without it). data_pipelines/image/pixels.py turns the result into
the model's uint8 input.

`decode_jpeg_upright` decodes a YCbCr or greyscale JPEG with simplejpeg (libjpeg-turbo's TurboJPEG API, straight into
a numpy array) at the DCT scale `Image.draft` would pick: bit-identical to Pillow's decode (the same libjpeg-turbo
code: the accurate integer IDCT and fancy upsampling), without Pillow's copies into and out of its own image memory.
Anything else, and any JPEG that libjpeg-turbo decodes only with a warning, takes Pillow's path, so bad bytes raise
the ImageError they raised before.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as decompression bombs (e.g. 8000 x 8000)
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
