"""Where one core's time goes in `kakehashi bench data`'s loader path, per sample, on its synthetic photos (640x480
JPEGs to 384 px): tar read, header + EXIF, the JPEG decode (simplejpeg, and Pillow's for comparison), the resize, and
the rest of the loader (render, tokenize, collate: the whole loader with the image load replaced by a constant).
Each figure is the fastest of several passes, so a neighbour's load on the machine moves it less:

    PYTHONPATH=. .venv/bin/python -m tests.data_pipelines.loader_profile [DIR]   # DIR: bench data's --synth folder
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def fastest_ms(fn, items, passes: int = 7) -> float:
    best = float("inf")
    for _ in range(passes):
        began = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - began) / len(items))
    return best * 1e3


def main(folder: str) -> None:
    import numpy as np
    import simplejpeg
    import torch

    from data_pipelines.batch import batches
    from data_pipelines.image.images import load_upright_rgb, open_image
    from data_pipelines.image.pixels import load_pixels, resize_uint8
    from data_pipelines.read.shards import iter_raw_samples
    from data_pipelines.synthetic.tiny_tokenizer import build_tiny_tokenizer
    from data_pipelines.tools.bench import loader_samples_per_s, write_photo_shards

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    shards = [str(p) for p in sorted(Path(folder).glob("photos-*.tar"))] or write_photo_shards(folder)
    images = [data for shard in shards for raw in iter_raw_samples(shard) for data in raw.images][:200]
    size = 384

    def pillow_decode(data):
        image = open_image(data)
        image.draft("RGB", (size, size))
        return np.array(load_upright_rgb(image))

    decoded = torch.from_numpy(simplejpeg.decode_jpeg(images[0], colorspace="RGB")).permute(2, 0, 1)
    samples = sum(1 for shard in shards for _ in iter_raw_samples(shard))
    rows = {
        "tar read": fastest_ms(lambda shard: sum(1 for _ in iter_raw_samples(shard)), shards) * len(shards) / samples,
        "header + EXIF orientation (Pillow)": fastest_ms(lambda d: open_image(d).getexif().get(0x0112), images),
        "decode: simplejpeg": fastest_ms(lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"), images),
        "decode: Pillow (decode, EXIF, RGB, to numpy)": fastest_ms(pillow_decode, images),
        "resize to 384 (torch bicubic, antialiased)": fastest_ms(lambda _: resize_uint8(decoded, size), images),
        "load_pixels (all of the image)": fastest_ms(lambda d: load_pixels(d, size), images),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    constant = torch.zeros(3, size, size, dtype=torch.uint8)
    real = batches.load_pixels
    whole, rest = float("inf"), float("inf")
    for _ in range(3):
        whole = min(whole, 1e3 / loader_samples_per_s(shards, size, 0, 400, tokenizer))
        batches.load_pixels = lambda *args, **kwargs: constant
        rest = min(rest, 1e3 / loader_samples_per_s(shards, size, 0, 400, tokenizer))
        batches.load_pixels = real
    rows["loader without the image (render, tokenize, collate, tar)"] = rest
    rows["loader, whole"] = whole
    for name, ms in rows.items():
        print(f"{name:58s} {ms:6.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="photos-"))
