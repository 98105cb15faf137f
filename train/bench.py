"""`kakehashi bench train`: real tokens/s, samples/s, MFU and peak memory of N steps of one recipe stage.

By default the stage is measured twice, packed and unpacked, each in a fresh process (so peak memory is its own),
and the report gives both and their ratio: the baseline is always measured in the same run. Weights are random
(`load_weights=False`), so real-shape recipes run without downloading anything and the figures are those of the
architecture. The first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from data_pipelines.output import result, result_json
from train.errors import UsageError
from train.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


def register(bench_subparsers) -> None:
    parser = bench_subparsers.add_parser("train", help="tokens/s and MFU of a recipe stage, packed against unpacked")
    parser.add_argument("recipe")
    parser.add_argument("--stage", default="1", help="stage number (from 1) or name (default: 1)")
    parser.add_argument("--packing", choices=("on", "off", "both"), default="both")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --packing both: alternating rounds of the two runs; the median of each is reported")
    parser.add_argument("--synthetic", type=int, metavar="N", default=0,
                        help="train on N synthetic shapes samples per task instead of the stage's shards")
    parser.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s per device (default: the table)")
    parser.add_argument("--llm-layers", type=int, metavar="N",
                        help="the LLM cut to its first N layers: real width, reduced depth (figures scale by layers)")
    parser.add_argument("--vision-layers", type=int, metavar="N", help="the vision encoder cut to N blocks")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or min(args.llm_layers or 1, args.vision_layers or 1) < 1:
        raise UsageError("--steps, --rounds, --llm-layers and --vision-layers must be >= 1, --warmup >= 0")
    # check the recipe and the stage here, before starting any run: one clear error, not one per child process
    _stage_index(load_recipe(args.recipe, args.overrides, check_data=False), args.stage)
    if args.peak_tflops:
        from train.flops import PEAK_TFLOPS_ENV

        os.environ[PEAK_TFLOPS_ENV] = str(args.peak_tflops)
    if args.packing != "both":
        report = measure(args)
    else:
        # alternate the two, so a neighbour's load on the machine hits both alike; report each one's median run
        rounds = [{mode: _child(args, mode) for mode in ("off", "on")} for _ in range(args.rounds)]
        runs = {mode: _median_run([r[mode] for r in rounds]) for mode in ("off", "on")}
        report = {"packed": runs["on"], "unpacked": runs["off"], "tokenizer": runs["on"]["tokenizer"],
                  "tokens_per_s_ratio": round(runs["on"]["tokens_per_s"] / runs["off"]["tokens_per_s"], 2),
                  "samples_per_s_ratio": round(runs["on"]["samples_per_s"] / runs["off"]["samples_per_s"], 2),
                  "round_ratios": [round(r["on"]["tokens_per_s"] / r["off"]["tokens_per_s"], 2) for r in rounds]}
    if report["tokenizer"] == "stand-in":  # the child processes said so on their (captured) stderr
        log.warning("measured with a stand-in tokenizer of the LLM's vocabulary size: the recipe's %s is not on "
                    "this machine", load_recipe(args.recipe, args.overrides, check_data=False).model.tokenizer)
    if args.json:
        result_json(report)
    else:
        for name, run in ([("packed", report["packed"]), ("unpacked", report["unpacked"])]
                          if "packed" in report else [(f"packing {args.packing}", report)]):
            mfu = "n/a (unknown peak; --peak-tflops)" if run["mfu"] is None else f"{run['mfu']:.1%}"
            result(f"{name}: {run['tokens_per_s']:,.0f} real tokens/s, {run['samples_per_s']:,.1f} samples/s, "
                   f"non-pad {run['nonpad_fraction']:.3f}, MFU {mfu}, "
                   f"peak memory {run['peak_mem_bytes'] / 2**30:.2f} GiB")
        if "tokens_per_s_ratio" in report:
            result(f"packed / unpacked: {report['tokens_per_s_ratio']}x real tokens/s")
    return 0


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["tokens_per_s"])[len(runs) // 2]


def _child(args: argparse.Namespace, mode: str) -> dict:
    """One packing mode in a fresh process: its own peak memory, no state left over from the other run."""
    argv = [sys.executable, "-m", "train.cli", "bench", "train", args.recipe, "--stage", args.stage,
            "--packing", mode, "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", "1",
            "--synthetic", str(args.synthetic), "--json", *[f"--set={o}" for o in args.overrides],
            *(["--llm-layers", str(args.llm_layers)] if args.llm_layers else []),
            *(["--vision-layers", str(args.vision_layers)] if args.vision_layers else [])]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"bench run with --packing {mode} failed: " + (done.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(done.stdout)  # stdout holds the result document only


def _stage_index(recipe: Recipe, stage: str) -> int:
    names = [s.name for s in recipe.stages]
    if stage in names:
        return names.index(stage)
    if stage.isdigit() and 1 <= int(stage) <= len(names):
        return int(stage) - 1
    raise UsageError(f"--stage {stage}: the recipe's stages are 1..{len(names)} ({', '.join(names)})")


def measure(args: argparse.Namespace) -> dict:
    """Train the stage for warmup + steps steps in this process; figures over the timed steps."""
    import torch

    from train import distributed
    from train.data import stage_loader
    from train.engine import train_stage
    from train.hooks import stage_hooks
    from train.models import family_for, model_config
    from train.models.base import is_stand_in
    from train.reporting import MetricsLog
    from train.run import build_processor, synthesize_missing_data

    recipe = load_recipe(args.recipe, args.overrides, check_data=False)
    index = _stage_index(recipe, args.stage)
    with tempfile.TemporaryDirectory(prefix="kakehashi-bench-") as tmp:
        work = Path(tmp)
        if args.synthetic:
            _use_synthetic_data(recipe, index, work / "shapes", args.synthetic)
        else:
            synthesize_missing_data(recipe)
            load_recipe(args.recipe, args.overrides)  # now the stage's shards must exist
        stage = recipe.stages[index].model_copy(update={
            "packing": args.packing == "on", "steps": args.warmup + args.steps, "save_every": 0, "log_every": 1})
        recipe.stages[index] = stage
        rank, world_size = distributed.init_distributed()
        try:
            family, processor = family_for(recipe.model), build_processor(recipe, work / "cache", stand_in=True)
            config = model_config(recipe.model, processor.tokenizer)
            family.reduce_depth(config, args.llm_layers, args.vision_layers)
            torch.manual_seed(recipe.seed)
            model = family.build(recipe.model, config, load_weights=False)  # random weights: nothing to download
            loader = stage_loader(recipe, index, processor, config, rank=rank, world_size=world_size)
            metrics = MetricsLog(work / "metrics.jsonl") if rank == 0 else None
            device = distributed.device()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            train_stage(family, model, stage, loader, rank=rank, world_size=world_size,
                        hooks=stage_hooks(stage, rank=rank, metrics=metrics))
            lines = (work / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
            records = [json.loads(line) for line in lines]
            peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
        finally:
            distributed.close()
    shape = {"tokenizer": "stand-in" if is_stand_in(processor.tokenizer) else "recipe",
             "vocab_size": config.text_config.vocab_size, "loss": recipe.model.loss, **family.depth(config)}
    figures = _figures(records, args.warmup, stage, peak, device, world_size)
    # what the `full` loss holds at once (fp32), which `chunked` never does: the figure its peak saving is held to
    shape["full_logits_bytes"] = figures["positions_per_micro_batch"] * shape["vocab_size"] * 4
    return {"recipe": recipe.name, **figures, **shape}


def _figures(records: list[dict], warmup: int, stage, peak: int, device, world_size: int) -> dict:
    """Speed and memory over the timed steps (the metrics records after the `warmup` first)."""
    import torch

    timed = [r for r in records if r["step"] > warmup]
    accumulation = stage.global_batch_size // (stage.micro_batch_size * world_size)  # micro-batches per step
    seconds = sum(r["seconds"] for r in timed)
    mfus = [r["mfu"] for r in timed]
    return {
        "stage": stage.name, "packing": stage.packing, "steps": len(timed),
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
        "samples_per_s": sum(r["samples_per_s"] * r["seconds"] for r in timed) / seconds,
        "nonpad_fraction": sum(r["tokens"] for r in timed) / sum(r["tokens"] / r["nonpad_fraction"] for r in timed),
        "tflops_per_device": sum(r["tflops_per_device"] * r["seconds"] for r in timed) / seconds,
        "mfu": None if None in mfus else sum(m * r["seconds"] for m, r in zip(mfus, timed)) / seconds,
        "peak_mem_bytes": int(peak), "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world_size, "precision": stage.precision, "max_length": stage.max_length,
        "micro_batch_size": stage.micro_batch_size, "global_batch_size": stage.global_batch_size,
        # token positions (pad included) per micro-batch, the mean over ranks and steps (records sum all ranks'):
        # the loss's full logits are this x vocab_size x 4 bytes
        "positions_per_micro_batch": round(sum(r["tokens"] / r["nonpad_fraction"] for r in timed)
                                           / (len(timed) * accumulation * world_size)),
    }


def _use_synthetic_data(recipe: Recipe, index: int, out: Path, samples: int) -> None:
    """Point the stage's sources at freshly synthesized shapes shards of their task (captions or VQA)."""
    from data_pipelines.synth import synthesize

    synthesize(out, samples=samples, seed=recipe.seed)
    for source in recipe.stages[index].data:
        source.shards = str(out / ("captions-*.tar" if source.task == "caption" else "vqa-*.tar"))
