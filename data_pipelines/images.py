"""Image bytes -> upright RGB PIL image, whatever mode or orientation the file was stored in."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

WHITE = (255, 255, 255)


def decode_image(data: bytes) -> Image.Image:
    """Decode `data` into an RGB image with EXIF orientation applied and transparency composited over white.

    Raises ValueError with a short reason when the bytes are not a decodable image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd-but-readable files (e.g. truncated EXIF)
            image = Image.open(io.BytesIO(data))
            image.load()
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large: {err}") from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad bytes
        raise ValueError(f"undecodable image: {type(err).__name__}: {err}") from None
    return to_rgb(image)


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
