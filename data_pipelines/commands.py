"""`kakehashi data ...`: synthesize the embedded dataset, preview how shards render under a template; convert,
verify and inspect are registered from their own modules.

Bad input prints one `kakehashi: error: ...` line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from data_pipelines.samples import BadSample, prepare_sample
from data_pipelines.shards import expand_shard_patterns, iter_raw_samples
from data_pipelines.templates import TEMPLATES


def fail(message: str) -> None:
    print(f"kakehashi: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def register(subparsers) -> None:
    """Add the `data` command group to the CLI's subparsers."""
    from data_pipelines import convert, verify

    data = subparsers.add_parser("data", help="dataset tools: synthesize, preview, convert, verify, inspect")
    commands = data.add_subparsers(dest="data_command", metavar="{synth,preview,convert,verify,inspect}",
                                   required=True, parser_class=type(data))

    synth = commands.add_parser("synth", help="write the embedded synthetic shapes dataset as shards")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--samples", type=int, default=2000, help="samples of each task (caption, vqa)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--samples-per-shard", type=int, default=500)
    synth.add_argument("--force", action="store_true", help="overwrite shards already in --out")
    synth.set_defaults(func=cmd_synth)

    preview = commands.add_parser("preview", help="print shard samples as the model will see them")
    preview.add_argument("shards", nargs="+", metavar="SHARD", help="shard paths, globs or {000000..000003} ranges")
    preview.add_argument("--template", required=True, help=f"one of: {', '.join(TEMPLATES)}")
    preview.add_argument("--limit", type=int, default=10, help="samples to print (default 10; 0 for all)")
    preview.add_argument("--json", action="store_true", help="one JSON object per line")
    preview.add_argument("--tokenizer", help="tokenizer folder (default: the built-in tiny Japanese tokenizer)")
    preview.set_defaults(func=cmd_preview)
    convert.register(commands)
    verify.register(commands)


def cmd_synth(args: argparse.Namespace) -> int:
    from data_pipelines.synth import synthesize

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a folder")
    if out.is_dir() and not args.force and (any(out.glob("*.tar")) or (out / "index.json").exists()):
        fail(f"{out} already holds shards; use --force to overwrite them")
    if args.samples < 1 or args.image_size < 8 or args.samples_per_shard < 1:
        fail("--samples and --samples-per-shard must be >= 1 and --image-size >= 8")
    written = synthesize(out, samples=args.samples, seed=args.seed, samples_per_shard=args.samples_per_shard,
                         image_size=args.image_size)
    parts = [f"{args.samples} {task} samples in {shard_range(paths)}" for task, paths in written.items()]
    print(f"synthesized {', '.join(parts)}")
    return 0


def shard_range(paths: list[str]) -> str:
    """`dir/captions-{000000..000003}.tar` for consecutively numbered shards, else the paths comma-separated."""
    matches = [re.fullmatch(r"(.*-)(\d{6})\.tar", path) for path in paths]
    if len(paths) > 1 and all(matches) and len({m.group(1) for m in matches}) == 1:
        first = int(matches[0].group(2))
        if [int(m.group(2)) for m in matches] == list(range(first, first + len(paths))):
            return f"{matches[0].group(1)}{{{matches[0].group(2)}..{matches[-1].group(2)}}}.tar"
    return ", ".join(paths)


def cmd_preview(args: argparse.Namespace) -> int:
    if args.template not in TEMPLATES:
        fail(f"unknown template {args.template!r}; choose from {', '.join(TEMPLATES)}")
    try:
        shards = expand_shard_patterns(args.shards)
    except FileNotFoundError as err:
        fail(str(err))
    tokenizer = _preview_tokenizer(args.tokenizer)
    if args.template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        fail("template 'chat' needs --tokenizer with a chat_template")
    shown = bad = 0
    for shard in shards:
        for raw in iter_raw_samples(shard):
            if args.limit and shown >= args.limit:
                break
            shown += 1
            try:
                sample = prepare_sample(raw, task=None, template=args.template, eos_token=tokenizer.eos_token,
                                        tokenizer=tokenizer)
            except BadSample as err:
                bad += 1
                _print_bad(raw.key, shard, err.describe(), args.json)
                continue
            text = "".join(segment.text for segment in sample.segments)
            targets = [segment.text for segment in sample.segments if segment.is_target]
            _print_sample(raw.key, shard, text, targets, args.json)
    print(f"previewed {shown} sample(s), {bad} bad", file=sys.stderr)
    return 0


def _print_sample(key: str, shard: str, text: str, targets: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"key": key, "text": text, "targets": targets}, ensure_ascii=False))
        return
    print(f"=== {shard} :: {key}")
    print(text)
    print("--- targets: " + " | ".join(json.dumps(target, ensure_ascii=False) for target in targets))


def _print_bad(key: str, shard: str, error: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"key": key, "error": error}, ensure_ascii=False))
    else:
        print(f"=== {shard} :: {key}\n!!! bad sample: {error}")


def _preview_tokenizer(path: str | None):
    """The given tokenizer, or the tiny one (cached under $KAKEHASHI_CACHE when set). It supplies eos and, for
    the chat template, apply_chat_template."""
    if path is not None:
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            fail(f"tokenizer folder {path} does not exist")
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            fail(f"cannot load tokenizer from {path}: {str(err).splitlines()[0]}")
    from data_pipelines.tiny_tokenizer import build_tiny_tokenizer, load_or_build_tiny_tokenizer

    cache = os.environ.get("KAKEHASHI_CACHE")
    if cache:
        return load_or_build_tiny_tokenizer(Path(cache) / "tiny-ja")
    with tempfile.TemporaryDirectory() as tmp:
        return build_tiny_tokenizer(tmp)
