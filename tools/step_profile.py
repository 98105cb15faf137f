"""Where a step's time goes, ours against transformers' Trainer, on the same stage, batches and optimizer.

    PYTHONPATH=. DS_ACCELERATOR=cpu python tools/step_profile.py RECIPE --stage 2 --packing off --steps 40 \
        --warmup 5 --rounds 3 [--set k=v] [--json]

Each run (ours, then Trainer, alternating for --rounds rounds) is a fresh process that trains as `bench train
--baseline trainer` does (train/bench.py `prepared`), with wall-clock timers wrapped around each phase: loader next,
host-side batch work (model_inputs, counts, per-source counts), DeepSpeed's / Trainer's wrappers, the model's own
forward, autograd's backward, the optimizer step (with its norm and clipping), zero_grad, the scheduler, hooks /
callbacks and watchdog.phase. Times are exclusive (a phase's nested phases are subtracted), summed over the timed
steps (after --warmup) and given in ms per step; "rest of the loop" is the step's wall time (end to end, as bench
times it) minus the phases. On CPU every op is synchronous, so wall time per phase is the phase's cost. Reports the
median round of each phase per runner.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from functools import wraps

TOTALS: dict[str, float] = defaultdict(float)
STACK: list[list[float]] = []  # per open phase: [start, time of nested phases]
ON = [False]


def timed(label: str, fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        if not ON[0]:
            return fn(*args, **kwargs)
        STACK.append([time.perf_counter(), 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            start, nested = STACK.pop()
            spent = time.perf_counter() - start
            TOTALS[label] += spent - nested
            if STACK:
                STACK[-1][1] += spent
    return wrapper


def patch(owner, name: str, label: str) -> None:
    setattr(owner, name, timed(label, getattr(owner, name)))


def instrument_common() -> None:
    import torch
    from torch import nn

    from train import engine, models, stages, trainer_baseline

    patch(torch.Tensor, "backward", "autograd backward")
    patch(torch.optim.Optimizer, "zero_grad", "zero_grad")
    patch(nn.Module, "zero_grad", "zero_grad")
    patch(torch.nn.utils, "clip_grad_norm_", "clip (Trainer)")
    patch(torch.optim.lr_scheduler.LRScheduler, "step", "scheduler")
    patch(engine, "model_inputs", "model_inputs (to device, normalise)")
    patch(trainer_baseline, "model_inputs", "model_inputs (to device, normalise)")
    original_build = stages.build_optimizer

    def build_optimizer(*args, **kwargs):
        optimizer, scheduler = original_build(*args, **kwargs)
        optimizer.step = timed("optimizer step (norm, clip, AdamW)", optimizer.step)
        return optimizer, scheduler
    stages.build_optimizer = engine.build_optimizer = build_optimizer
    for family_class in _families(models):
        original = family_class.training_module

        def training_module(self, model, original=original):
            module = original(self, model)
            if not getattr(module, "_profiled", False):
                module.forward, module._profiled = timed("model forward (incl. loss)", module.forward), True
            return module
        family_class.training_module = training_module


def _families(models):
    from train.models.base import ModelFamily

    seen, todo = [], [ModelFamily]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    import train.models  # noqa: F401 (registers the families)
    return [c for c in seen if "training_module" in c.__dict__ and c is not ModelFamily]


def instrument_ours(warmup: int):
    from deepspeed.runtime.engine import DeepSpeedEngine

    from train import engine, hooks, step, watchdog

    patch(DeepSpeedEngine, "forward", "DeepSpeed forward wrapper")
    patch(DeepSpeedEngine, "backward", "DeepSpeed backward wrapper")
    patch(DeepSpeedEngine, "step", "DeepSpeed step wrapper")
    patch(engine.BatchStream, "__next__", "data: loader next")
    patch(engine, "counts", "counts (tokens, FLOPs)")
    patch(step, "counts", "counts (tokens, FLOPs)")
    patch(engine.PerSource, "of", "per-source counts")
    patch(engine.PerSource, "tokens", "per-source counts")
    patch(watchdog, "phase", "watchdog.phase")
    patch(engine, "train_step", "train_step rest (figures, lrs, sync)")
    for hook in (hooks.Totals, hooks.Metrics, hooks.NonFiniteGuard, hooks.Progress, hooks.FaultInjection):
        patch(hook, "after_step", "hooks")
        patch(hook, "before_step", "hooks")

    class Switch(hooks.Hook):
        def after_step(self, ctx, result):
            ON[0] = result.step >= warmup
    return Switch()


def instrument_trainer(warmup: int):
    from transformers import Trainer, TrainerCallback

    patch(Trainer, "get_batch_samples", "data: loader next")
    patch(Trainer, "training_step", "Trainer training_step rest")
    patch(Trainer, "compute_loss", "Trainer compute_loss rest")

    class Switch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ON[0] = state.global_step >= warmup
    return Switch()


def child(args) -> dict:
    from train import bench, trainer_baseline

    instrument_common()
    bench_args = argparse.Namespace(recipe=args.recipe, stage=args.stage, packing=args.packing, runner=args.runner,
                                    warmup=args.warmup, steps=args.steps, synthetic=0, overrides=args.overrides,
                                    llm_layers=None, vision_layers=None, tensor_memory=False)
    if args.runner == "ours":
        switch = instrument_ours(args.warmup)
        from train.engine import train_stage
        from train.hooks import stage_hooks
    else:
        switch = instrument_trainer(args.warmup)
        original_trainer = trainer_baseline.Trainer

        def trainer(*a, callbacks=(), **kw):  # our switch first: it turns timing on before the step clock reads
            return original_trainer(*a, callbacks=[switch, *callbacks], **kw)
        trainer_baseline.Trainer = trainer
    with bench.prepared(bench_args) as run:
        if args.runner == "ours":
            clock = bench.StepClock()
            train_stage(run.family, run.model, run.stage, run.loader, rank=run.rank, world_size=run.world_size,
                        hooks=[*stage_hooks(run.stage, rank=run.rank), clock, switch])
        else:
            clock = trainer_baseline.measure_trainer(run.family, run.model, run.stage, run.loader,
                                                     steps=run.stage.steps, work=run.work)
    steps = len(clock.ends) - 1 - args.warmup
    wall = (clock.ends[-1] - clock.ends[args.warmup]) * 1e3 / steps
    phases = {label: seconds * 1e3 / steps for label, seconds in TOTALS.items()}
    phases["rest of the loop"] = wall - sum(phases.values())
    tokens = sum(r["tokens"] for r in clock.records[args.warmup:])
    return {"runner": args.runner, "steps": steps, "ms_per_step": wall, "tokens_per_s": tokens / wall * 1e3 / steps,
            "phases": phases}


def parent(args) -> dict:
    rounds = []
    for _ in range(args.rounds):
        one = {}
        for runner in ("ours", "trainer"):
            argv = [sys.executable, __file__, args.recipe, "--stage", args.stage, "--packing", args.packing,
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--runner", runner,
                    *[f"--set={o}" for o in args.overrides]]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            one[runner] = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.append(one)
        print(json.dumps({r: round(one[r]["ms_per_step"], 1) for r in one}), file=sys.stderr)
    report = {"rounds": rounds, "median": {}}
    for runner in ("ours", "trainer"):
        labels = sorted({label for r in rounds for label in r[runner]["phases"]})
        report["median"][runner] = {
            "ms_per_step": statistics.median(r[runner]["ms_per_step"] for r in rounds),
            "phases": {label: round(statistics.median(r[runner]["phases"].get(label, 0.0) for r in rounds), 2)
                       for label in labels}}
    report["round_ratios_trainer_over_ours_ms"] = [round(r["ours"]["ms_per_step"] / r["trainer"]["ms_per_step"], 3)
                                                   for r in rounds]
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--stage", default="2")
    parser.add_argument("--packing", choices=("on", "off"), default="off")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runner", choices=("ours", "trainer"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.runner:
        print(json.dumps(child(args)))
        return
    print(json.dumps(parent(args), indent=1))


if __name__ == "__main__":
    main()
