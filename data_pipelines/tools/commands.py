"""`kakehashi data ...`: synthesize the embedded dataset, preview how shards render under a template; convert,
verify and inspect are registered from their own modules.

Bad input raises UsageError (the CLI prints it as one `kakehashi: error: ...` line on stderr and exits 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from data_pipelines.errors import UsageError
from data_pipelines.output import result, result_json
from data_pipelines.read.shards import iter_raw_samples
from data_pipelines.render.samples import BadSample, prepare_sample
from data_pipelines.render.templates import TEMPLATES
from data_pipelines.tools import convert, convert_interleaved, convert_preference, verify
from data_pipelines.tools.cli_common import load_tokenizer, shard_paths


def register(subparsers) -> None:
    """Add the `data` command group to the CLI's subparsers."""
    data = subparsers.add_parser("data", help="dataset tools: synthesize, preview, convert, verify, inspect")
    commands = data.add_subparsers(dest="data_command", metavar="{synth,synth-bench,preview,convert,verify,inspect}",
                                   required=True, parser_class=type(data))

    synth = commands.add_parser("synth", help="write the embedded synthetic shapes dataset as shards")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--samples", type=int, default=2000, help="samples of each task (caption, vqa)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--documents", type=int, default=0, help="interleaved documents (docs-*.tar; default 0)")
    synth.add_argument("--samples-per-shard", type=int, default=500)
    synth.add_argument("--force", action="store_true", help="overwrite shards already in --out")
    synth.set_defaults(func=cmd_synth)
    _register_synth_bench(commands)

    preview = commands.add_parser("preview", help="print shard samples as the model will see them")
    preview.add_argument("shards", nargs="+", metavar="SHARD", help="shard paths, globs or {000000..000003} ranges")
    preview.add_argument("--template", required=True, help=f"one of: {', '.join(TEMPLATES)}")
    preview.add_argument("--limit", type=int, default=10, help="samples to print (default 10; 0 for all)")
    preview.add_argument("--json", action="store_true",
                         help='print one JSON document: {"samples": [{"key", "text", "targets"} or {"key", "error"}, '
                              '...], "shown", "bad"}')
    preview.add_argument("--tokenizer", help="tokenizer folder (default: the built-in tiny Japanese tokenizer)")
    preview.set_defaults(func=cmd_preview)
    kinds = convert.register(commands)
    convert_interleaved.register(kinds)
    convert_preference.register(kinds)
    verify.register(commands)


def cmd_synth(args: argparse.Namespace) -> int:
    from data_pipelines.synthetic.synth import synthesize

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and not args.force and (any(out.glob("*.tar")) or (out / "index.json").exists()):
        raise UsageError(f"{out} already holds shards; use --force to overwrite them")
    if args.samples < 1 or args.image_size < 8 or args.samples_per_shard < 1 or args.documents < 0:
        raise UsageError("--samples and --samples-per-shard must be >= 1, --documents >= 0 and --image-size >= 8")
    written = synthesize(out, samples=args.samples, seed=args.seed, samples_per_shard=args.samples_per_shard,
                         image_size=args.image_size, documents=args.documents)
    counts = {"interleaved": args.documents}
    parts = [f"{counts.get(task, args.samples)} {task} samples in {shard_range(paths)}"
             for task, paths in written.items()]
    result(f"synthesized {', '.join(parts)}")
    return 0


def _register_synth_bench(commands) -> None:
    from data_pipelines.synthetic.synth_bench import BENCH_TASKS, FORMATS

    bench = commands.add_parser("synth-bench", help="write a small benchmark-shaped set (colour and shape questions "
                                                    "in a benchmark's published schema) for `kakehashi eval --task`")
    bench.add_argument("--task", required=True, choices=BENCH_TASKS)
    bench.add_argument("--out", required=True, help="output folder (replaced if it holds a set already)")
    bench.add_argument("--samples", type=int, default=12, help="images (rows) to draw (default 12)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    bench.add_argument("--format", choices=FORMATS, default="disk",
                       help="disk: datasets save_to_disk (default); parquet; jsonl with PNG files")
    bench.add_argument("--json", action="store_true", help='print {"task", "out", "path", "format", "split", "rows", '
                                                           '"questions"}')
    bench.set_defaults(func=cmd_synth_bench)


def cmd_synth_bench(args: argparse.Namespace) -> int:
    from data_pipelines.synthetic.synth_bench import synth_bench

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _looks_like_synth_bench(out):
        raise UsageError(f"{out} is not empty and holds no synthetic benchmark set; choose an empty or new folder")
    if args.samples < 1 or args.image_size < 8:
        raise UsageError("--samples must be >= 1 and --image-size >= 8")
    written = synth_bench(args.task, out, samples=args.samples, seed=args.seed, image_size=args.image_size,
                          fmt=args.format)
    if args.json:
        result_json(written)
    else:
        result(f"{written['task']}: {written['questions']} questions on {written['rows']} images in {written['path']} "
               f"({written['format']}, split {written['split']})")
    return 0


def _looks_like_synth_bench(out: Path) -> bool:
    names = {p.name for p in out.iterdir()}
    return bool(names) and names <= {"dataset_dict.json", "test", "train", "images", "test.jsonl", "train.jsonl",
                                     "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"}


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
        raise UsageError(f"unknown template {args.template!r}; choose from {', '.join(TEMPLATES)}")
    shards = shard_paths(args.shards)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise UsageError("template 'chat' needs --tokenizer with a chat_template")
    shown = bad = 0
    samples = []  # with --json, printed at the end as one document
    for shard, entry in preview_samples(shards, args.template, tokenizer, args.limit):
        shown += 1
        bad += "error" in entry
        if args.json:
            samples.append(entry)
        elif "error" in entry:
            result(f"=== {shard} :: {entry['key']}\n!!! bad sample: {entry['error']}")
        else:
            result(f"=== {shard} :: {entry['key']}")
            result(entry["text"])
            result("--- targets: " + " | ".join(json.dumps(target, ensure_ascii=False) for target in entry["targets"]))
            if "rejected_text" in entry:
                result("--- rejected:\n" + entry["rejected_text"])
                result("--- rejected targets: " + " | ".join(json.dumps(target, ensure_ascii=False)
                                                             for target in entry["rejected_targets"]))
    if args.json:
        result_json({"samples": samples, "shown": shown, "bad": bad})
    print(f"previewed {shown} sample(s), {bad} bad", file=sys.stderr)
    return 0


def preview_samples(shards: list[str], template: str, tokenizer, limit: int = 0):
    """(shard, {"key", "text", "targets"}) per sample as the model sees it, rendered with `template`, or
    (shard, {"key", "error"}) for a bad one; the first `limit` samples (0: all)."""
    shown = 0
    for shard in shards:
        for raw in iter_raw_samples(shard):
            if limit and shown >= limit:
                return
            shown += 1
            try:
                sample = prepare_sample(raw, task=None, template=template, eos_token=tokenizer.eos_token,
                                        tokenizer=tokenizer)
            except BadSample as err:
                yield shard, {"key": raw.key, "error": err.describe()}
                continue
            entry = {"key": raw.key, "text": "".join(segment.text for segment in sample.segments),
                     "targets": [segment.text for segment in sample.segments if segment.is_target]}
            if sample.rejected is not None:  # a preference pair: `text` is the chosen answer's rendering
                entry.update(rejected_text="".join(segment.text for segment in sample.rejected),
                             rejected_targets=[segment.text for segment in sample.rejected if segment.is_target])
            yield shard, entry
