"""`kakehashi bench data`: samples/s of the full loader path (tar read, decode, resize, tokenize, collate) against
the plain path (tar read, PIL decode, transformers' SiglipImageProcessor), both measured in this run. With
`--tiles N` both paths tile (a thumbnail + up to N tiles per image): the loader's workers (data_pipelines/image/
tiles.py) against transformers' LlavaOnevisionImageProcessor, the processor the tiled export ships.

`--synth DIR` first writes photo-like 640x480 JPEGs (gradients, blurred shapes, sensor-like noise; quality 90) as
caption shards, so the bench runs offline. With `--workers 0` the process is pinned to one CPU core and torch to
one thread, so both figures are single-core.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_pipelines.errors import UsageError
from data_pipelines.output import result, result_json
from data_pipelines.read.shards import ShardWriter, iter_raw_samples, write_manifest
from data_pipelines.tools.cli_common import shard_paths


def photo_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480, quality: int = 90) -> bytes:
    """A JPEG that compresses like a photo: colour gradients, a dozen blurred shapes, per-pixel noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [rng.uniform(40, 200) + rng.uniform(-80, 80) * x / width + rng.uniform(-60, 60) * y / height
                for _ in range(3)]
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        left, top, size = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(20, 200))
        box = (left, top, left + size, top + int(size * rng.uniform(0.5, 1.5)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5))).astype(np.int16)
    pixels += rng.normal(0, 8, pixels.shape).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_photo_shards(out: str | Path, samples: int = 400, seed: int = 0, samples_per_shard: int = 100) -> list[str]:
    """Caption shards `OUT/photos-NNNNNN.tar` of photo-like JPEGs, plus index.json."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out, "photos", samples_per_shard) as writer:
        for i in range(samples):
            writer.write(f"photo{i:06d}", {"caption": f"合成写真{i}番。色の帯と図形が写っている。", "source": "bench"},
                         [("jpg", photo_jpeg(rng))])
    write_manifest(out, writer.manifest, name="photos")
    return writer.paths


PATCH = 14  # SigLIP so400m-patch14's patch: the image tokens each path's text gets


def loader_samples_per_s(shards: list[str], image_size: int, workers: int, samples: int, tokenizer,
                         micro_batch_size: int = 8, tiles: int = 0) -> float:
    from data_pipelines.batch.loader import MixtureLoader, SourceSpec
    from data_pipelines.image.tiles import AnyResTiles, grid_pinpoints

    first = next(iter_raw_samples(shards[0]))
    task = "vqa" if first.meta and "conversations" in first.meta else "caption"
    images = {"image_size": image_size, "tokens_per_image": (image_size // PATCH) ** 2}
    if tiles:
        images = {"tokens_per_image": None, "patchify": AnyResTiles(
            image_size, PATCH, grid_pinpoints(image_size, 1, tiles), tiles, pad_colour=(127, 127, 127))}
    loader = MixtureLoader([SourceSpec(shards, 1.0, task, "bench")], tokenizer=tokenizer, template="asagi",
                           max_length=16384, micro_batch_size=micro_batch_size, seed=0, num_workers=workers,
                           bad_sample_limit=1.0, **images)
    next(loader)  # start-up (worker processes, first shard open) is not throughput
    batches = max(samples // micro_batch_size, 1)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    loader.close()
    return batches * micro_batch_size / seconds


def baseline_samples_per_s(shards: list[str], image_size: int, samples: int, tiles: int = 0) -> float:
    """Tar read + PIL decode + SiglipImageProcessor at image_size (what a plain HF pipeline does); with `tiles`,
    LlavaOnevisionImageProcessor on the same grids."""
    import transformers

    from data_pipelines.image.tiles import grid_pinpoints

    name = "LlavaOnevisionImageProcessor" if tiles else "SiglipImageProcessor"
    # without torchvision transformers builds the PIL twin anyway (and says so on every construction)
    processor_class = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    size = {"height": image_size, "width": image_size}
    processor = processor_class(size=size, image_grid_pinpoints=grid_pinpoints(image_size, 1, tiles),
                                image_mean=[0.5] * 3, image_std=[0.5] * 3) if tiles else processor_class(size=size)
    done, start = 0, time.perf_counter()
    while done < samples:
        for shard in shards:
            for raw in iter_raw_samples(shard):
                for data in raw.images:
                    processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
                done += 1
                if done == samples:
                    break
            if done == samples:
                break
    return samples / (time.perf_counter() - start)


def register(bench_subparsers) -> None:
    """Add `bench data` to the `bench` command group's subparsers."""
    parser = bench_subparsers.add_parser("data", help="samples/s of the data loader against PIL + SiglipImageProcessor")
    parser.add_argument("shards", nargs="*", metavar="SHARD", help="shards to read (or use --synth)")
    parser.add_argument("--synth", metavar="DIR", help="write photo-like 640x480 JPEG shards to DIR and bench them")
    parser.add_argument("--synth-samples", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (0: one core, in-process)")
    parser.add_argument("--samples", type=int, default=400, help="samples to time for each path")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both paths (medians reported)")
    parser.add_argument("--tiles", type=int, default=0,
                        help="tile each image into a thumbnail + up to N tiles (against LlavaOnevisionImageProcessor)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_bench_data)


def cmd_bench_data(args: argparse.Namespace) -> int:
    import torch

    from data_pipelines.synthetic.tiny_tokenizer import build_tiny_tokenizer

    if args.synth:
        existing = sorted(Path(args.synth).glob("photos-*.tar"))
        shards = [str(p) for p in existing] or write_photo_shards(args.synth, samples=args.synth_samples)
    elif args.shards:
        shards = shard_paths(args.shards)
    else:
        raise UsageError("give shards or --synth DIR")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.workers == 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for both paths
        cores = 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    # alternate the two paths and take medians, so a neighbour's load on the machine hits both alike
    fast_runs, baseline_runs = [], []
    for _ in range(args.rounds):
        fast_runs.append(loader_samples_per_s(shards, args.image_size, args.workers, args.samples, tokenizer,
                                              tiles=args.tiles))
        baseline_runs.append(baseline_samples_per_s(shards, args.image_size, args.samples, tiles=args.tiles))
    fast, baseline = statistics.median(fast_runs), statistics.median(baseline_runs)
    report = {"samples_per_s": round(fast, 1), "baseline_samples_per_s": round(baseline, 1),
              "ratio": round(fast / baseline, 2),
              "round_ratios": [round(f / b, 2) for f, b in zip(fast_runs, baseline_runs)],
              "image_size": args.image_size, "tiles": args.tiles, "workers": args.workers, "cores": cores,
              "samples": args.samples,
              "shards": len(shards)}
    if args.json:
        result_json(report)
    else:
        result(f"loader: {report['samples_per_s']} samples/s ({args.workers} workers, {cores} core(s)); "
              f"PIL + {'LlavaOnevision' if args.tiles else 'Siglip'}ImageProcessor: "
              f"{report['baseline_samples_per_s']} samples/s; "
              f"ratio {report['ratio']}x", file=sys.stdout)
    return 0
