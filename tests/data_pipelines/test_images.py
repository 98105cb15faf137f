import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_palette_image_becomes_rgb():
    image = Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert image.mode == "P"
    assert (pixels(decode_image(encode(image))) == [10, 200, 30]).all()


def test_palette_transparency_is_composited_over_white():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    decoded = pixels(decode_image(encode(image, transparency=1)))
    assert decoded[0, 0].tolist() == [255, 0, 0] and decoded[0, 1].tolist() == [255, 255, 255]


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    image.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue -> light blue
    decoded = pixels(decode_image(encode(image)))
    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[0, 1, 2] == 255 and 120 <= decoded[0, 1, 0] <= 135


def test_greyscale_with_and_without_alpha_and_16_bit():
    assert (pixels(decode_image(encode(Image.new("L", (3, 3), 77)))) == 77).all()
    assert (pixels(decode_image(encode(Image.new("LA", (3, 3), (0, 0))))) == 255).all()
    deep = Image.fromarray(np.full((3, 3), 40000, dtype=np.uint16))
    assert (pixels(decode_image(encode(deep))) == 40000 // 256).all()


def test_cmyk_jpeg_becomes_rgb():
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    red = pixels(decode_image(encode(image, "JPEG", quality=95)))
    assert (red[..., 0] > 230).all() and (red[..., 1:] < 30).all()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    decoded = decode_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert decoded.size == (20, 40)
    upright = pixels(decoded)
    assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 50  # red ends up on top
    assert upright[35, 10, 2] > 200 and upright[35, 10, 0] < 50  # blue at the bottom


@pytest.mark.parametrize("data", [b"", b"not an image", encode(Image.new("RGB", (64, 64)))[:60]])
def test_undecodable_bytes_raise_value_error(data):
    with pytest.raises(ValueError, match="image"):
        decode_image(data)
