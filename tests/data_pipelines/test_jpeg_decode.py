"""load_pixels decodes plain JPEGs with simplejpeg: pixel for pixel what Pillow's path gave (decode at the DCT scale
Image.draft picks, EXIF orientation, RGB, then the same resize), and bad bytes give the same ImageError reasons."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data_pipelines.image import pixels
from data_pipelines.image.images import ImageError, decode_jpeg_upright, load_upright_rgb, open_image
from data_pipelines.image.pixels import load_pixels
from tests.pictures import noise_picture


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return noise_picture(height, width, seed).filter(ImageFilter.GaussianBlur(1.5))


def pillow_upright(data: bytes, size: int) -> np.ndarray:
    """The path load_pixels took before simplejpeg: Pillow's decode with draft, exif_transpose, RGB."""
    image = open_image(data)
    if image.format == "JPEG":
        image.draft("RGB" if image.mode == "RGB" else None, (size, size))
    return np.array(load_upright_rgb(image))


def pillow_pixels(data: bytes, size: int, mode: str = "squash") -> torch.Tensor:
    return pixels.resize_uint8(torch.from_numpy(pillow_upright(data, size)).permute(2, 0, 1), size, mode)


def outcome(load, data: bytes, size: int):
    """What a load gives: its pixels, or the ImageError reason."""
    try:
        return load(data, size)
    except ImageError as error:
        return error.reason


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


# (width, height, target): scale 1 (the bench's 640x480 to 384 shape, small), 2, 4 and 8, and odd sizes that round
CASES = [(80, 60, 48), (100, 75, 48), (99, 61, 24), (130, 97, 16), (201, 133, 12), (37, 150, 9)]
ENCODINGS = {
    "420": dict(quality=90),
    "444": dict(quality=95, subsampling=0),
    "422": dict(quality=75, subsampling=1),
    "progressive": dict(quality=85, progressive=True),
    "optimized": dict(quality=50, optimize=True),
}


@pytest.mark.parametrize("width,height,size", CASES)
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_plain_jpegs_decode_bit_identical_to_pillow(width, height, size, encoding, mode):
    data = jpeg(photo(width, height).convert(mode), **ENCODINGS[encoding])
    fast = decode_jpeg_upright(data, open_image(data), size)
    assert fast is not None, "a plain JPEG takes the simplejpeg path"
    reference = pillow_upright(data, size)
    assert fast.dtype == np.uint8 and fast.shape == reference.shape and np.array_equal(fast, reference)
    for resize_mode in ("squash", "shortest_edge_crop"):
        assert torch.equal(load_pixels(data, size, resize_mode), pillow_pixels(data, size, resize_mode))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("width,height,size", [(40, 24, 16), (130, 70, 16)])  # full size, and drafted to 1/4
def test_every_exif_orientation_is_applied_as_exif_transpose_applies_it(orientation, width, height, size):
    data = jpeg(photo(width, height, seed=orientation), quality=92, exif=exif(orientation))
    fast = decode_jpeg_upright(data, open_image(data), size)
    assert fast is not None and fast.flags.c_contiguous
    reference = pillow_upright(data, size)
    assert fast.shape == reference.shape and np.array_equal(fast, reference)
    assert torch.equal(load_pixels(data, size), pillow_pixels(data, size))


def test_odd_orientation_values_leave_the_image_as_stored_as_pillow_does():
    for value in (0, 9, 255):
        data = jpeg(photo(30, 20), exif=exif(value))
        assert torch.equal(load_pixels(data, 8), pillow_pixels(data, 8))


def test_cmyk_png_and_other_formats_stay_on_pillow():
    cmyk = jpeg(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), quality=95)
    assert decode_jpeg_upright(cmyk, open_image(cmyk), 8) is None
    assert torch.equal(load_pixels(cmyk, 8), pillow_pixels(cmyk, 8))
    red = load_pixels(cmyk, 8)
    assert (red[0] > 230).all() and (red[1:] < 30).all()
    for fmt in ("PNG", "WEBP", "BMP"):
        buffer = io.BytesIO()
        photo(30, 20).save(buffer, format=fmt)
        data = buffer.getvalue()
        assert decode_jpeg_upright(data, open_image(data), 8) is None
        assert torch.equal(load_pixels(data, 8), pillow_pixels(data, 8))


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpegs_give_what_pillow_gave(progressive):
    data = jpeg(photo(64, 48), quality=90, progressive=progressive)
    reasons = set()
    for cut in list(range(0, len(data), max(len(data) // 60, 1))) + [len(data) - 2, len(data) - 1]:
        ours, theirs = outcome(load_pixels, data[:cut], 16), outcome(pillow_pixels, data[:cut], 16)
        if isinstance(theirs, str):
            assert ours == theirs, f"cut at {cut} of {len(data)}"
            reasons.add(theirs)
        else:
            assert isinstance(ours, torch.Tensor) and torch.equal(ours, theirs), f"cut at {cut} of {len(data)}"
    assert "truncated_image" in reasons and "not_an_image" in reasons


def test_corrupt_jpegs_give_what_pillow_gave():
    data = jpeg(photo(64, 48), quality=90)
    scan = data.index(b"\xff\xda") + 20  # inside the entropy-coded data
    rng = np.random.default_rng(0)
    damaged = [data[:scan] + bytes(rng.integers(0, 256, 40, dtype=np.uint8)) + data[scan + 40:] for _ in range(8)]
    damaged += [data[:scan] + b"\xff\xd9" + data[scan:],  # an early end marker
                data[:scan] + b"\xff" * 16 + data[scan + 16:],
                data[:2] + b"\xff\xe1\x00\x10Exif\x00\x00garbage!" + data[2:]]  # an EXIF block that does not parse
    seen = set()
    for bad in damaged:
        ours, theirs = outcome(load_pixels, bad, 16), outcome(pillow_pixels, bad, 16)
        if isinstance(theirs, str):
            assert ours == theirs
        else:
            assert isinstance(ours, torch.Tensor) and torch.equal(ours, theirs)
        seen.add(theirs if isinstance(theirs, str) else "decoded")
    assert seen  # whatever Pillow made of them, load_pixels made the same


def test_the_pixel_limit_is_checked_before_any_decode():
    data = jpeg(photo(100, 100))
    with pytest.raises(ImageError) as error:
        load_pixels(data, 8, max_pixels=9999)
    assert error.value.reason == "image_too_large"


# ------------------------------------------------------------------ channels-last pixels, NCHW model input


@pytest.mark.parametrize("mode", ["squash", "shortest_edge_crop"])
@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_resize_gives_f_interpolate_values_stored_channels_last(mode, layout):
    stored = torch.from_numpy(np.array(photo(90, 61))).permute(2, 0, 1)  # [3, H, W] over HWC memory, as decoded
    given = stored if layout == "hwc" else stored.contiguous()
    ours = pixels.resize_uint8(given, 32, mode)
    size = (32, 32) if mode == "squash" else (32, int(32 * 90 / 61))
    theirs = torch.nn.functional.interpolate(stored[None], size=size, mode="bicubic", antialias=True)[0]
    if mode == "shortest_edge_crop":
        left = (size[1] - 32) // 2
        theirs = theirs[:, :, left:left + 32]
    assert ours.shape == (3, 32, 32) and torch.equal(ours, theirs)
    assert ours.permute(1, 2, 0).is_contiguous()


def test_the_loader_hands_over_channels_last_and_the_model_gets_nchw(tmp_path):
    from data_pipelines.batch.collate import collate, model_inputs
    from data_pipelines.render.example import Example

    single = [load_pixels(jpeg(photo(80, 60, seed=i)), 16) for i in range(3)]
    examples = [Example(key=f"k{i}", source="s", source_id=0, input_ids=[1, 2], labels=[1, 2],
                        pixel_values=pixels.stack_pixels(group))
                for i, group in enumerate([single[:1], single[1:]])]  # one image, then two
    batch = collate(examples, pad_token_id=0)
    batched = batch["pixel_values"]
    assert batched.shape == (3, 3, 16, 16) and batched.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(batched[i], single[i]) for i in range(3))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    inputs = model_inputs(batch, "cpu", mean, std)["pixel_values"]
    expected = (torch.stack(single).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert inputs.is_contiguous() and torch.equal(inputs, expected)
