"""`kakehashi` command line: train, recipe check, data, bench, submit, export, chat, eval, report, shapes-eval.

Each command's result goes to stdout (one JSON document with --json), everything else to stderr
(data_pipelines/output.py).
Bad input exits 2 with a one-line error (a recipe lists every problem, one per line); the errors a command reports
and their exit codes are in train/errors.py; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from data_pipelines import output
from data_pipelines.output import result, result_json
from train import collector, errors
from train.errors import UsageError

# Nothing heavy at the top (torch, transformers, train.recipe): the loader's workers import the main module of the
# process that started them (multiprocessing's spawn preparation: `python -m train.cli`, the `kakehashi` script),
# each one at every stage start, before its first batch. Commands import what they need.

log = logging.getLogger("kakehashi")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors: one line, exit 2
        self.exit(2, f"kakehashi: error: {message}\n")


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a recipe field, e.g. --set stages.1.save_every=10 (repeatable)")


def cmd_train(args) -> int:
    from data_pipelines.batch.workers import start_worker_server

    start_worker_server()  # before the model code's imports: the forkserver imports the data path meanwhile
    from train.recipe import load_recipe
    from train.run import format_summary, run

    recipe = load_recipe(args.recipe, args.overrides)
    outcome = run(recipe, Path(args.output), force=args.force, export=not args.no_export, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # one result per run: rank 0's
        return 0
    if args.json:
        result_json(outcome)
        return 0
    for index, summary in enumerate(outcome["stages"]):
        result(format_summary(index, len(outcome["stages"]), summary))
    if outcome["export"]:
        result(f"export: {outcome['export']}")
    return 0


def recipe_report(recipe, gpus: int | None = None, gpu_memory: int | None = None) -> dict:
    """Parameter counts per component and, per stage, the stage plan (what trains, adapters included), from the
    model built on the meta device: the same plan training makes; with `gpus`, each stage's memory per GPU
    (train/memory.py)."""
    import torch

    from train.build import check_init_weights
    from train.models import family_for
    from train.recipe import COMPONENTS
    from train.run import model_config_offline
    from train.stages import describe_schedule, plan_stage

    family, config = family_for(recipe.model), model_config_offline(recipe)
    check_init_weights(recipe, config)  # model.init's tensors fit what the recipe builds, or exit 2 naming them
    with torch.device("meta"):
        params = family.parameter_counts(family.build(recipe.model, config, load_weights=False))
    stages = []
    for stage in recipe.stages:
        with torch.device("meta"):  # a fresh model per stage: a stage's plan injects its adapters
            plan = plan_stage(family, family.build(recipe.model, config, load_weights=False), stage)
        stages.append({
            "name": stage.name, "trainable": {c: plan.table[c]["trainable"] for c in COMPONENTS},
            "frozen": {c: plan.table[c]["frozen"] for c in COMPONENTS}, "adapters": plan.adapters,
            "vision_blocks": plan.vision_blocks, "zero_stage": stage.zero_stage, "precision": stage.precision,
            "steps": stage.steps, "global_batch_size": stage.global_batch_size,
            "micro_batch_size": stage.micro_batch_size, "schedule": describe_schedule(stage),
            "sources": [{"name": name, "task": source.task, "weight": source.weight,
                         "loss_weight": source.loss_weight} for name, source in zip(stage.source_names(), stage.data)],
            "objective": stage.objective,
            **({"preference": stage.preference.model_dump()} if stage.preference is not None else {}),
        })
        if gpus:
            stages[-1]["memory"] = stage_memory(family, config, recipe, stage, plan, gpus, gpu_memory)
    return {"recipe": recipe.name, "params": params, "stages": stages,
            **({"gpus": gpus, "gpu_memory": gpu_memory} if gpus else {})}


def stage_memory(family, config, recipe, stage, plan, gpus: int, gpu_memory: int | None) -> dict:
    """One stage's memory per GPU (train/memory.py), its parameters counted as the stage plan counts them."""
    from train import memory

    params = {c: row["trainable"] + row["frozen"] for c, row in plan.table.items()}
    trainable = {c: row["trainable"] for c, row in plan.table.items()}
    shapes = memory.Shapes(**family.memory_shapes(config, recipe.model))
    # the chunked loss (and Liger's fused one, which chunks inside) never holds the whole micro-batch's logits
    loss_chunk = None if recipe.model.loss == "full" else recipe.model.loss_chunk_size
    return memory.estimate(shapes, params, trainable, stage, gpus=gpus, gpu_memory=gpu_memory,
                           loss_chunk=loss_chunk).as_dict()


def format_schedule(schedule: dict, steps: int) -> str:
    warmup = f"warmup {schedule['warmup_steps']} step(s)"
    floor = f"{schedule['min_lr_ratio']:g} x lr"
    if schedule["kind"] == "cosine":
        return f"cosine: {warmup}, then cosine to {floor} at step {steps}"
    if schedule["kind"] == "constant":
        return f"constant: {warmup}, then flat"
    first = steps - schedule["decay_steps"] + 1
    return (f"wsd: {warmup}, flat to step {first - 1}, {schedule['decay']} decay over steps {first}-{steps} "
            f"to {floor}")


def format_preference(objective: str, spec: dict) -> str:
    text = f"{objective} ({spec['loss']}, beta {spec['beta']:g}"
    text += f", label_smoothing {spec['label_smoothing']:g}" if spec["label_smoothing"] else ""
    if objective == "mpo":
        weights = spec["mpo"]
        text += (f"; weights preference {weights['preference']:g}, quality {weights['quality']:g}, "
                 f"generation {weights['generation']:g}")
    held = {"copy": "a frozen copy of the stage's starting weights",
            "adapters": "the policy with its LoRA adapters off (no copy)",
            "precomputed": "log-probabilities of the starting weights from a first pass over the stage's data "
                           "(no copy)"}[spec["reference"]]
    return text + f"); reference: {held}"


def cmd_recipe_check(args) -> int:
    from train.memory import format_plan, parse_size
    from train.recipe import COMPONENTS, load_recipe
    from train.stages import format_freeze_table

    recipe = load_recipe(args.recipe, args.overrides, check_data=not args.skip_data)
    if args.gpus is not None and args.gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {args.gpus}")
    try:
        gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    except ValueError as err:
        raise UsageError(f"--gpu-memory: {err}") from None
    if gpu_memory and not args.gpus:
        raise UsageError("--gpu-memory needs --gpus (the memory per GPU depends on how many share the run)")
    if args.gpus:
        from train.submit import check_batch_sizes

        check_batch_sizes(recipe, args.gpus)  # what submit and the run refuse on that many ranks
    report = recipe_report(recipe, args.gpus, gpu_memory)
    if args.json:
        result_json(report)
        return 0
    params = report["params"]
    result(f"recipe {recipe.name}: OK ({len(recipe.stages)} stages, template {recipe.template})")
    result("parameters: " + ", ".join(f"{c} {params[c]:,}" for c in COMPONENTS) + f", total {sum(params.values()):,}")
    for i, stage in enumerate(report["stages"]):
        result(f"stage {i + 1} {stage['name']}: ZeRO-{stage['zero_stage']}, {stage['precision']}, {stage['steps']} "
               f"steps, global batch {stage['global_batch_size']} (micro {stage['micro_batch_size']})")
        result(format_freeze_table({c: {"trainable": stage["trainable"][c], "frozen": stage["frozen"][c]}
                                    for c in COMPONENTS}))
        result(f"  lr: {format_schedule(stage['schedule'], stage['steps'])}")
        if "preference" in stage:
            result("  objective: " + format_preference(stage["objective"], stage["preference"]))
        result("  data: " + ", ".join(f"{s['name']} ({s['task']}, weight {s['weight']:g}"
                                      + (f", loss_weight {s['loss_weight']:g}" if s["loss_weight"] != 1 else "") + ")"
                                      for s in stage["sources"]))
        for component, count in stage["adapters"].items():
            result(f"  {component}: trained through LoRA adapters ({count:,} parameters)")
        if stage["vision_blocks"]:
            result("  vision_encoder: last {} of {} blocks trained".format(*stage["vision_blocks"]))
        if "memory" in stage:
            result(format_plan(stage["memory"], gpu_memory, stage["zero_stage"]))
    return 0


def cmd_export(args) -> int:
    from train.export import export_stage
    from train.rundir import RunDir

    run_dir = Path(args.run_dir)
    out = export_stage(run_dir, RunDir(run_dir).find_stage(args.stage), Path(args.out), force=args.force)
    result(f"exported {out}")
    return 0


def cmd_chat(args) -> int:
    from PIL import Image

    from train.benchmarks.generate import answer
    from train.chat import load_export

    model, processor = load_export(args.model)
    image = Image.open(args.image).convert("RGB")
    result(answer(model, processor, [image], args.prompt, args.max_new_tokens))
    return 0


def cmd_shapes_eval(args) -> int:
    from train.shapes_eval import shapes_accuracy

    reports = [{"model": model, **shapes_accuracy(model, samples=args.samples, seed=args.seed, detail=args.detail)}
               for model in args.model]
    if args.json:
        result_json(reports[0] if len(reports) == 1 else reports)
        return 0
    for report in reports:
        result(f"{report['model']}: colour {report['colour_accuracy']:.0%}, shape {report['shape_accuracy']:.0%} "
               f"on {report['samples']} fresh shapes (colour chance {report['chance_colour']:.0%}); "
               f"chosen style (the preference pairs' whole-sentence colour answer) {report['chosen_style_rate']:.0%}")
        for example in report["examples"]:
            result(f"  {example['truth']}: {example['colour_answer']} / {example['shape_answer']}")
    return 0


def cmd_eval(args) -> int:
    from train.evaluate import evaluate

    if args.task:  # benchmark mode: train/benchmarks/run.py
        from train.benchmarks.run import command

        return command(args)
    if args.limit is not None or args.predictions is not None:
        raise UsageError("--limit and --predictions go with --task (benchmark mode)")
    model_dir = Path(args.model)
    template = args.template
    if template is None:
        info = model_dir / "kakehashi.json"
        if not info.is_file():
            raise UsageError(f"{model_dir} does not say its template (no kakehashi.json); pass --template")
        template = json.loads(info.read_text())["template"]
    report = evaluate(model_dir, args.data, template, max_samples=args.max_samples)
    if args.json:
        result_json(report)
        return 0
    judge = "" if report["judge"] is None else f", judge {report['judge']:.2f}"
    result(f"loss {report['loss']:.4f} over {report['samples']} samples ({report['bad_samples']} bad); "
           f"VQA ({report['vqa_samples']}): exact match {report['exact_match']:.1%}, "
           f"ROUGE-L (chars, F1) {report['rouge_l_chars_f1']:.3f}{judge}")
    for source, loss in report["loss_by_source"].items():
        result(f"  {source}: loss {loss:.4f}")
    return 0


def cmd_report(args) -> int:
    from train.report import write_report
    from train.rundir import RunDir

    run_dir = RunDir(args.run_dir)
    if not run_dir.metrics.is_file():
        raise UsageError(f"{args.run_dir} is not a kakehashi run (no metrics.jsonl)")
    out = write_report(run_dir.root)
    result(f"report: {out / 'summary.md'} and {len(list(out.glob('*.png')))} plot(s) in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from data_pipelines.tools.bench import register as register_data_bench
    from data_pipelines.tools.commands import register as register_data
    from train.bench import register as register_train_bench
    from train.submit import register as register_submit

    parser = ArgumentParser(prog="kakehashi",
                            description="Train Japanese vision-language models in recipe-driven stages.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _register_train(commands)
    register_data(commands)
    bench = commands.add_parser("bench", help="benchmarks, each against a baseline measured in the same run")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, parser_class=ArgumentParser)
    register_data_bench(bench_commands)
    register_train_bench(bench_commands)
    register_submit(commands)
    _register_exports(commands)
    return parser


def _register_train(commands) -> None:
    train = commands.add_parser("train", help="run every stage of a recipe, then export")
    _add_recipe_args(train)
    train.add_argument("--output", required=True, help="run directory (stages already complete there are skipped)")
    train.add_argument("--force", action="store_true", help="use an output directory that holds other files")
    train.add_argument("--no-export", action="store_true", help="skip the export after the last stage")
    train.add_argument("--json", action="store_true", help="the result as one JSON document: stage summaries, export")
    train.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                       help="auto: continue from the newest complete checkpoint (default); never: start over "
                            "(with --force on a used output); PATH: that checkpoint")
    train.set_defaults(func=cmd_train)

    recipe = commands.add_parser("recipe", help="recipe tools").add_subparsers(dest="recipe_command", required=True,
                                                                               parser_class=ArgumentParser)
    check = recipe.add_parser("check", help="validate a recipe offline and show each stage's plan")
    _add_recipe_args(check)
    check.add_argument("--json", action="store_true")
    check.add_argument("--skip-data", action="store_true",
                       help="do not require the shards to exist here (data that lives on the training cluster)")
    check.add_argument("--gpus", type=int, help="estimate each stage's memory per GPU on this many GPUs")
    check.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU, e.g. 80GB: say which stages fit")
    check.set_defaults(func=cmd_recipe_check)

    report = commands.add_parser("report", help="plots and a markdown summary of a run")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)


def _register_exports(commands) -> None:
    """Commands on a run's stages and on exports: export, chat, eval, shapes-eval."""
    from data_pipelines.render.templates import TEMPLATES  # the names are its keys (train.recipe's TEMPLATES)

    export = commands.add_parser("export", help="export a finished stage in its model family's published layout")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--stage", help="stage name or number (default: the last finished stage)")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.set_defaults(func=cmd_export)

    chat = commands.add_parser("chat", help="answer a prompt about an image from an export")
    chat.add_argument("model")
    chat.add_argument("--image", required=True)
    chat.add_argument("--prompt", required=True)
    chat.add_argument("--max-new-tokens", type=int, default=32)
    chat.set_defaults(func=cmd_chat)

    evaluation = commands.add_parser("eval", help="validation loss per source, exact match and ROUGE-L on VQA; "
                                                  "with --task, a Japanese benchmark scored as eval-mm scores it")
    evaluation.add_argument("model", help="an export directory")
    evaluation.add_argument("--data", nargs="+", required=True, metavar="PATH",
                            help="shards; with --task, the benchmark's save_to_disk folder, parquet or jsonl")
    evaluation.add_argument("--template", choices=list(TEMPLATES), help="default: the export's own (kakehashi.json)")
    evaluation.add_argument("--max-samples", type=int, default=200)
    evaluation.add_argument("--task", help="benchmark: ja-vg-vqa-500, ja-vlm-bench-in-the-wild, "
                                           "japanese-heron-bench, jmmmu, jdocqa (train/benchmarks/)")
    evaluation.add_argument("--limit", type=int, help="with --task: the first N samples")
    evaluation.add_argument("--predictions", metavar="FILE", help="with --task: per-sample jsonl")
    evaluation.add_argument("--batch-size", type=int, help="with --task: requests per generate call (8)")
    evaluation.add_argument("--max-new-tokens", type=int, help="with --task: per answer (256, as eval-mm)")
    evaluation.add_argument("--json", action="store_true")
    evaluation.set_defaults(func=cmd_eval)

    shapes = commands.add_parser("shapes-eval", help="score exports on freshly drawn synthetic shapes")
    shapes.add_argument("model", nargs="+", help="one export or several (each scored on the same shapes)")
    shapes.add_argument("--samples", type=int, default=100)
    shapes.add_argument("--seed", type=int, default=12345, help="drawing seed (training data uses others)")
    shapes.add_argument("--detail", action="store_true",
                        help="small shapes on wide, tall or large canvases (what tiling is for)")
    shapes.add_argument("--json", action="store_true")
    shapes.set_defaults(func=cmd_shapes_eval)


def main(argv: list[str] | None = None) -> int:
    """The `kakehashi` command: stdout holds its result only; a reported error is one message and its exit code."""
    with collector.for_a_process():
        args = build_parser().parse_args(argv)
        output.configure_logging()
        with output.results_on_stdout():
            try:
                return args.func(args)
            except Exception as err:  # noqa: BLE001 - only the errors train/errors.py maps; the rest keep tracebacks
                code = errors.exit_code(err)
                if code is None:
                    raise
                print(f"kakehashi: {errors.message(err)}", file=sys.stderr, flush=True)
                return code


if __name__ == "__main__":
    sys.exit(main())
