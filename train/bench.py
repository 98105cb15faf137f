"""`kakehashi bench train`: real tokens/s, samples/s, MFU and peak memory of N steps of one recipe stage.

By default the stage is measured twice, packed and unpacked, each in a fresh process (so peak memory is its own),
and the report gives both and their ratio: the baseline is always measured in the same run. Weights are random
(`load_weights=False`), so real-shape recipes run without downloading anything and the figures are those of the
architecture. The first `--warmup` steps are not timed; the others are timed end to end (data loading and hooks
included). `--baseline trainer` adds the same stage trained by transformers' Trainer (train/trainer_baseline.py) to
every round, and the ratios ours / Trainer; `--tensor-memory` adds the peak of live tensors on CPU (train/memory.py),
what the memory estimate is checked against.
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
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipelines.output import result, result_json
from train.errors import UsageError

if TYPE_CHECKING:
    from train.recipe import Recipe

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
    parser.add_argument("--baseline", choices=("trainer",),
                        help="also train the stage with transformers' Trainer (train/trainer_baseline.py), alternating "
                             "rounds with ours, and report ours / Trainer")
    parser.add_argument("--tensor-memory", action="store_true",
                        help="CPU: also measure the peak of live tensor bytes (train/memory.py TensorPeak; it slows "
                             "every op, so the run's speed figures are not comparable)")
    # internal: which trainer a child process runs (the parent alternates them)
    parser.add_argument("--runner", choices=("ours", "trainer"), default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from train.recipe import load_recipe

    depths = [layers for layers in (args.llm_layers, args.vision_layers) if layers is not None]
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or min(depths, default=1) < 1:
        raise UsageError("--steps, --rounds, --llm-layers and --vision-layers must be >= 1, --warmup >= 0")
    # check the recipe and the stage here, before starting any run: one clear error, not one per child process
    recipe = load_recipe(args.recipe, args.overrides, check_data=False)
    stage = recipe.stages[_stage_index(recipe, args.stage)]
    if stage.objective != "sft" and args.packing != "off":  # pairs are never packed (train/recipe.py)
        log.info("stage %s is a %s stage: one pair per row, measured unpacked", stage.name, stage.objective)
        args.packing = "off"
    if args.peak_tflops:
        from train.flops import PEAK_TFLOPS_ENV

        os.environ[PEAK_TFLOPS_ENV] = str(args.peak_tflops)
    report = measure(args) if len(_runs(args)) == 1 else alternate(args)
    if report["tokenizer"] == "stand-in":  # the child processes said so on their (captured) stderr
        log.warning("measured with a stand-in tokenizer of the LLM's vocabulary size: the recipe's %s is not on "
                    "this machine", recipe.model.tokenizer)
    if args.json:
        result_json(report)
    else:
        print_report(report, args.packing)
    return 0


def _runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(runner, packing) of each run of one round, in the order they alternate."""
    modes = ("off", "on") if args.packing == "both" else (args.packing,)
    runners = ("ours", "trainer") if args.baseline else (args.runner,)
    return [(runner, mode) for mode in modes for runner in runners]


def alternate(args: argparse.Namespace) -> dict:
    """Each run of a round in a fresh process, rounds one after another, so a neighbour's load on the machine hits
    every run alike; each run's median round is reported, and the ratios per round and of the medians."""
    rounds = [{key: _child(args, *key) for key in _runs(args)} for _ in range(args.rounds)]
    median = {key: _median_run([r[key] for r in rounds]) for key in rounds[0]}
    report = {}
    if args.packing == "both":  # the tokenizer is the same in every run: the recipe's, or the stand-in
        report["tokenizer"] = median["ours", "on"]["tokenizer"]
        report.update(packed=median["ours", "on"], unpacked=median["ours", "off"],
                      **_ratios(rounds, ("ours", "on"), ("ours", "off")))
    else:
        report.update(median["ours", args.packing])
    if args.baseline:
        trainer = {MODES[mode]: median[runner, mode] for runner, mode in median if runner == "trainer"}
        ratios = {MODES[mode]: _ratios(rounds, ("ours", mode), ("trainer", mode)) for mode in MODES
                  if ("trainer", mode) in median}
        if args.packing == "both":  # what packing buys over a Trainer that does not pack
            ratios["packed_vs_trainer_unpacked"] = _ratios(rounds, ("ours", "on"), ("trainer", "off"))
        name = "transformers.Trainer" if recipe_stage(args).objective == "sft" else "trl.DPOTrainer"
        report["baseline"] = {"name": name, "rounds": args.rounds, **trainer,
                              "ours_over_baseline": ratios}
    return report


MODES = {"off": "unpacked", "on": "packed"}


def _ratios(rounds: list[dict], top: tuple[str, str], bottom: tuple[str, str]) -> dict:
    """top / bottom: of the median runs (as the report gives them), and per round."""
    def ratio(runs: list[dict], key: str) -> float:
        return round(_median_run(runs[0])[key] / _median_run(runs[1])[key], 2)

    tops, bottoms = [r[top] for r in rounds], [r[bottom] for r in rounds]
    return {"tokens_per_s_ratio": ratio([tops, bottoms], "tokens_per_s"),
            "samples_per_s_ratio": round(_median_run(tops, "samples_per_s")["samples_per_s"]
                                         / _median_run(bottoms, "samples_per_s")["samples_per_s"], 2),
            "round_ratios": (per_round := [round(r[top]["tokens_per_s"] / r[bottom]["tokens_per_s"], 2)
                                           for r in rounds]),
            # the median of the rounds' ratios: each round's two runs shared the machine's load of their minutes
            "median_round_ratio": sorted(per_round)[len(per_round) // 2],
            "round_samples_ratios": [round(r[top]["samples_per_s"] / r[bottom]["samples_per_s"], 2) for r in rounds]}


def print_report(report: dict, packing: str) -> None:
    named = ([("packed", report["packed"]), ("unpacked", report["unpacked"])] if "packed" in report
             else [(f"packing {packing}", report)])
    named += [(f"Trainer {mode}", report["baseline"][mode]) for mode in MODES.values()
              if mode in report.get("baseline", {})]
    for name, run in named:
        mfu = "n/a (unknown peak; --peak-tflops)" if run["mfu"] is None else f"{run['mfu']:.1%}"
        result(f"{name}: {run['tokens_per_s']:,.0f} real tokens/s, {run['samples_per_s']:,.1f} samples/s, "
               f"non-pad {run['nonpad_fraction']:.3f}, MFU {mfu}, "
               f"peak memory {run['peak_mem_bytes'] / 2**30:.2f} GiB"
               + (f", tensors {run['peak_tensor_bytes'] / 2**30:.3f} GiB" if "peak_tensor_bytes" in run else ""))
    if "tokens_per_s_ratio" in report:
        result(f"packed / unpacked: {report['tokens_per_s_ratio']}x real tokens/s")
    for name, ratio in report.get("baseline", {}).get("ours_over_baseline", {}).items():
        result(f"ours / Trainer ({name.replace('_', ' ')}): {ratio['tokens_per_s_ratio']}x real tokens/s, "
               f"{ratio['samples_per_s_ratio']}x samples/s (medians); per round {ratio['round_ratios']}, their "
               f"median {ratio['median_round_ratio']}x")


def _median_run(runs: list[dict], key: str = "tokens_per_s") -> dict:
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def _child(args: argparse.Namespace, runner: str, mode: str) -> dict:
    """One run in a fresh process: its own peak memory, no state left over from the other runs."""
    argv = [sys.executable, "-m", "train.cli", "bench", "train", args.recipe, "--stage", args.stage,
            "--packing", mode, "--runner", runner, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--rounds", "1", "--synthetic", str(args.synthetic), "--json", *[f"--set={o}" for o in args.overrides],
            *(["--tensor-memory"] if args.tensor_memory else []),
            *(["--llm-layers", str(args.llm_layers)] if args.llm_layers else []),
            *(["--vision-layers", str(args.vision_layers)] if args.vision_layers else [])]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"bench run ({runner}, --packing {mode}) failed: "
                         + (done.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(done.stdout)  # stdout holds the result document only


def recipe_stage(args: argparse.Namespace):
    from train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_data=False)
    return recipe.stages[_stage_index(recipe, args.stage)]


def _stage_index(recipe: Recipe, stage: str) -> int:
    names = [s.name for s in recipe.stages]
    if stage in names:
        return names.index(stage)
    if stage.isdecimal() and 1 <= int(stage) <= len(names):
        return int(stage) - 1
    raise UsageError(f"--stage {stage}: the recipe's stages are 1..{len(names)} ({', '.join(names)})")


@contextmanager
def prepared(args: argparse.Namespace):
    """The stage to measure (steps = warmup + steps), its model with random weights and its loader, in a process
    group of this process's world."""
    import torch

    from train import distributed
    from train.build import build_stage
    from train.data import stage_loader
    from train.models import family_for, model_config
    from train.models.tokenizers import is_stand_in
    from train.recipe import load_recipe
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
        # Trainer runs as one trains on one device without a launcher: no process group (with one, it wraps the
        # model in DDP with find_unused_parameters, an extra graph traversal per step)
        rank, world_size = distributed.init_distributed() if args.runner == "ours" else (0, 1)
        try:
            family, processor = family_for(recipe.model), build_processor(recipe, work / "cache", stand_in=True)
            config = model_config(recipe.model, processor.tokenizer)
            family.reduce_depth(config, args.llm_layers, args.vision_layers)
            if args.runner == "ours":  # built as `kakehashi train` builds it (dtype, ZeRO-3 partitioning), random
                built = build_stage(recipe, index, processor, config, rank=rank, world_size=world_size, load=False)
                model, loader, zero_stage = built.model, built.loader, built.resolved.zero_stage
                reference = built.reference
            else:  # Trainer trains a plain model (its own mixed precision, no ZeRO)
                torch.manual_seed(recipe.seed)
                model = family.build(recipe.model, config, load_weights=False)
                loader = stage_loader(recipe, index, processor, config, rank=rank, world_size=world_size)
                zero_stage, reference = None, None
            yield Prepared(recipe, stage, family, model, loader, work, rank, world_size, zero_stage, config,
                           "stand-in" if is_stand_in(processor.tokenizer) else "recipe", processor, reference)
        finally:
            distributed.close()


@dataclass
class Prepared:
    recipe: Recipe
    stage: object
    family: object
    model: object
    loader: object
    work: Path
    rank: int
    world_size: int
    zero_stage: int | None   # the ZeRO stage our run trains with (train/stages.py resolve_stage); Trainer: none
    config: object
    tokenizer: str           # "recipe", or "stand-in" where the recipe's is not on this machine
    processor: object = None
    reference: object = None  # ours, a `reference: copy` preference stage: its frozen copy (train/build.py)


class StepClock:
    """When each optimizer step ends, data loading and hooks included (as Trainer's steps are timed), and what each
    step held (train.hooks.Hook)."""

    name = None

    def __init__(self):
        self.ends, self.records = [time.perf_counter()], []

    def start_stage(self, ctx) -> None:
        self.ends = [time.perf_counter()]

    def before_step(self, ctx, step: int) -> None:
        pass

    def after_step(self, ctx, result) -> None:
        self.ends.append(time.perf_counter())
        self.records.append({"tokens": result.tokens, "samples": result.samples, "positions": result.positions,
                             "flops": result.flops})

    def end_stage(self, ctx) -> None:
        pass


def measure(args: argparse.Namespace) -> dict:
    """Train the stage for warmup + steps steps in this process (ours or Trainer); figures over the timed steps,
    timed from the end of the last untimed step to the end of the last."""
    import torch

    from train import distributed, flops
    from train.hooks import stage_hooks
    from train.memory import TensorPeak

    with prepared(args) as run:
        device = distributed.device()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tracker = TensorPeak(run.model) if args.tensor_memory else None
        with tracker or nullcontext():
            if args.runner == "trainer" and run.stage.objective != "sft":
                from train.trainer_baseline import measure_dpo_trainer

                clock = measure_dpo_trainer(run.family, run.model, run.stage, run.loader, run.processor,
                                            steps=run.stage.steps, work=run.work)
            elif args.runner == "trainer":
                from train.trainer_baseline import measure_trainer

                clock = measure_trainer(run.family, run.model, run.stage, run.loader, steps=run.stage.steps,
                                        work=run.work)
            else:
                clock = StepClock()
                from train.engine import train_stage

                train_stage(run.family, run.model, run.stage, run.loader, rank=run.rank, world_size=run.world_size,
                            hooks=[*stage_hooks(run.stage, rank=run.rank), clock], reference_model=run.reference)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
        stage, world_size = run.stage, run.world_size
        shape = {"tokenizer": run.tokenizer, "vocab_size": run.config.text_config.vocab_size,
                 "loss": run.recipe.model.loss, **run.family.depth(run.config)}
    timed, seconds = clock.records[args.warmup:], clock.ends[-1] - clock.ends[args.warmup]
    tokens, positions = sum(r["tokens"] for r in timed), sum(r["positions"] for r in timed)
    per_device = None if args.runner == "trainer" else sum(r["flops"] for r in timed) / seconds / world_size
    peak_flops = flops.peak_flops(device)
    return {
        "recipe": run.recipe.name, "stage": stage.name, "packing": stage.packing, "runner": args.runner,
        "steps": len(timed), "seconds": seconds, "tokens_per_s": tokens / seconds,
        "samples_per_s": sum(r["samples"] for r in timed) / seconds, "nonpad_fraction": tokens / positions,
        "tflops_per_device": None if per_device is None else per_device / 1e12,
        "mfu": None if per_device is None or peak_flops is None else per_device / peak_flops,
        "peak_mem_bytes": int(peak), "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        **({"peak_tensor_bytes": tracker.peak} if tracker else {}),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world_size, "zero_stage": run.zero_stage, "precision": stage.precision,
        "max_length": stage.max_length, "micro_batch_size": stage.micro_batch_size,
        "global_batch_size": stage.global_batch_size,
        **shape, **_positions(positions, len(timed), stage, world_size, shape["vocab_size"]),
    }


def _positions(positions: int, steps: int, stage, world_size: int, vocab_size: int) -> dict:
    """Token positions (pad included) per micro-batch, the mean over ranks and steps (step records sum all ranks'),
    and what the `full` loss holds of them at once (fp32 logits), which `chunked` never does: the figure its peak
    saving is held to."""
    from train.stages import resolve_stage

    accumulation = resolve_stage(stage, world_size).accumulation  # micro-batches per step
    per_micro_batch = round(positions / (steps * accumulation * world_size))
    return {"positions_per_micro_batch": per_micro_batch, "full_logits_bytes": per_micro_batch * vocab_size * 4}


def _use_synthetic_data(recipe: Recipe, index: int, out: Path, samples: int) -> None:
    """Point the stage's sources at freshly synthesized shapes shards of their task (captions, VQA, documents or
    preference pairs)."""
    from data_pipelines.synthetic.synth import synthesize

    tasks = {source.task for source in recipe.stages[index].data}
    synthesize(out, samples=samples, seed=recipe.seed, documents=samples * ("interleaved" in tasks),
               preferences=samples * ("preference" in tasks))
    prefixes = {"caption": "captions", "vqa": "vqa", "interleaved": "docs", "preference": "prefs"}
    for source in recipe.stages[index].data:
        source.shards = str(out / f"{prefixes[source.task]}-*.tar")
