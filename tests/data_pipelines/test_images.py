import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data_pipelines.image.images import ImageError, decode_image
from data_pipelines.image.pixels import load_pixels, normalize


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


# ------------------------------------------------------------------ uint8 pixels at the model's input size


def photo(size=(160, 120)) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(2)), "JPEG", quality=90)


@pytest.mark.parametrize("mode,processor_name", [("squash", "SiglipImageProcessorPil"),
                                                  ("shortest_edge_crop", "CLIPImageProcessorPil")])
def test_load_pixels_then_normalize_matches_the_hf_processor(mode, processor_name):
    import transformers

    data = photo()
    size = 48  # below half the source: exercises the reduced-size JPEG decode too
    if mode == "squash":
        processor = getattr(transformers, processor_name)(size={"height": size, "width": size})
    else:
        processor = getattr(transformers, processor_name)(size={"shortest_edge": size},
                                                          crop_size={"height": size, "width": size})
    pixels = load_pixels(data, size, mode)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, size, size)
    ours = normalize(pixels[None], processor.image_mean, processor.image_std)
    theirs = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    assert (ours - theirs).abs().mean() < 0.03  # ~1 grey level: DCT-domain 1/2 decode + bicubic vs bicubic


def test_full_size_resize_is_within_a_grey_level_of_pillow_bicubic():
    image = decode_image(photo((100, 70)))
    ours = load_pixels(encode(image, "PNG"), 40).permute(1, 2, 0).numpy().astype(int)
    pillow = np.asarray(image.resize((40, 40), Image.BICUBIC)).astype(int)
    assert np.abs(ours - pillow).max() <= 2 and np.abs(ours - pillow).mean() < 0.1


def test_shortest_edge_crop_keeps_the_centre():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # blue centre third
    pixels = load_pixels(encode(image), 50, "shortest_edge_crop")
    assert (pixels[2] > 200).all() and (pixels[0] < 60).all()


def test_load_pixels_handles_modes_and_orientation_like_decode_image():
    exif = Image.Exif()
    exif[0x0112] = 6
    tall = Image.new("RGB", (40, 20), (255, 0, 0))
    tall.paste((0, 0, 255), (20, 0, 40, 20))
    pixels = load_pixels(encode(tall, "JPEG", quality=95, exif=exif.tobytes()), 8)
    assert pixels[0, 1, 4] > 200 and pixels[2, 6, 4] > 200  # red on top, blue at the bottom after rotation
    assert (load_pixels(encode(Image.new("LA", (3, 3), (0, 0))), 4) == 255).all()


def test_pixel_limit_and_bad_bytes_give_reasons():
    from data_pipelines.synthetic.testing import corrupt_png, huge_png_header, jpeg_bytes

    with pytest.raises(ImageError) as error:
        load_pixels(encode(Image.new("RGB", (100, 100))), 8, max_pixels=9999)
    assert error.value.reason == "image_too_large"
    for data, reason in ((huge_png_header(), "image_too_large"), (b"text", "not_an_image"),
                         (corrupt_png(), "undecodable_image"), (jpeg_bytes()[:1500], "truncated_image")):
        with pytest.raises(ImageError) as error:
            load_pixels(data, 8)
        assert error.value.reason == reason


def test_normalize_refuses_floats():
    with pytest.raises(TypeError):
        normalize(torch.zeros(1, 3, 2, 2), [0.5] * 3, [0.5] * 3)
