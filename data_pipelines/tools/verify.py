"""`kakehashi data verify` (decode every sample, list the bad ones) and `kakehashi data inspect` (what is in it)."""

from __future__ import annotations

import argparse
from collections import Counter

from data_pipelines.image.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, open_image
from data_pipelines.output import result, result_json
from data_pipelines.read.shards import iter_raw_samples
from data_pipelines.render.samples import BadSample, prepare_sample, sample_task
from data_pipelines.tools.cli_common import load_tokenizer, shard_paths


def verify_shards(shards: list[str], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """{"samples_ok", "samples_bad", "bad": [{"shard", "key", "reason"}]}: every sample read and its images decoded.

    A truncated shard adds one bad entry (reason truncated_shard, key of the sample cut); the samples before the
    cut count as good.
    """
    ok, bad = 0, []
    for shard in shards:
        for raw in iter_raw_samples(shard):
            try:
                prepare_sample(raw, task=None, template="plain", eos_token="", max_image_pixels=max_image_pixels)
            except BadSample as err:
                bad.append({"shard": shard, "key": raw.key, "reason": err.reason, "detail": err.describe()})
                continue
            ok += 1
    return {"samples_ok": ok, "samples_bad": len(bad), "bad": bad}


def histogram(values: list[int]) -> dict[str, int]:
    """Counts per power-of-two bucket "lo-hi" (hi exclusive), in increasing order."""
    buckets: Counter[int] = Counter(max(value, 1).bit_length() - 1 for value in values)
    return {f"{1 << b}-{1 << (b + 1)}": buckets[b] for b in sorted(buckets)}


def inspect_shards(shards: list[str], tokenizer) -> dict:
    """Counts per task kind and source, image side histograms (headers only), text token length and images per
    sample histograms (a document's text tokens: all its texts)."""
    kinds: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    widths, heights, tokens, per_sample = [], [], [], []
    images = 0
    for shard in shards:
        for raw in iter_raw_samples(shard):
            if raw.error is not None:
                kinds[f"bad ({raw.error})"] += 1
                continue
            kind = sample_task(raw.meta) or "unknown"
            kinds[f"{kind} (text only)" if not raw.images else kind] += 1
            sources[str(raw.meta.get("source", "-"))] += 1
            images += len(raw.images)
            per_sample.append(len(raw.images))
            for data in raw.images:
                try:
                    width, height = open_image(data).size
                except ImageError:
                    continue
                widths.append(width)
                heights.append(height)
            text = raw.meta.get("caption") or " ".join(
                str(item.get("content", item.get("text", ""))) for item in
                raw.meta.get("conversations") or raw.meta.get("document") or [] if isinstance(item, dict))
            tokens.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return {"samples": sum(kinds.values()), "kinds": dict(kinds), "sources": dict(sources), "images": images,
            "image_width": histogram(widths), "image_height": histogram(heights), "text_tokens": histogram(tokens),
            "images_per_sample": dict(sorted(Counter(str(n) for n in per_sample).items(), key=lambda i: int(i[0])))}


def cmd_verify(args: argparse.Namespace) -> int:
    shards = shard_paths(args.shards)
    report = verify_shards(shards, args.max_image_pixels)
    if args.json:
        result_json(report)
    else:
        for entry in report["bad"]:
            result(f"bad: {entry['shard']} :: {entry['key']}: {entry['detail']}")
        result(f"{report['samples_ok']} sample(s) ok, {report['samples_bad']} bad in {len(shards)} shard(s)")
    return 1 if report["samples_bad"] else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    shards = shard_paths(args.shards)
    report = inspect_shards(shards, load_tokenizer(args.tokenizer))
    if args.json:
        result_json(report)
        return 0
    result(f"{report['samples']} samples, {report['images']} images in {len(shards)} shard(s)")
    for title in ("kinds", "sources", "image_width", "image_height", "text_tokens", "images_per_sample"):
        result(f"{title}: " + ", ".join(f"{name}: {count}" for name, count in report[title].items()))
    return 0


def register(commands) -> None:
    """Add `verify` and `inspect` to the `data` group's subparsers."""
    verify = commands.add_parser("verify", help="decode every sample; list the bad ones (exit 1 if any)")
    verify.add_argument("shards", nargs="+", metavar="SHARD")
    verify.add_argument("--json", action="store_true", help='print {"samples_ok", "samples_bad", "bad": [...]}')
    verify.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    verify.set_defaults(func=cmd_verify)
    inspect = commands.add_parser("inspect", help="counts per task kind and source, image size and token histograms")
    inspect.add_argument("shards", nargs="+", metavar="SHARD")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--tokenizer", help="tokenizer folder (default: the built-in tiny Japanese tokenizer)")
    inspect.set_defaults(func=cmd_inspect)
