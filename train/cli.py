"""`kakehashi` command line: train, recipe check, data, export, chat.

Bad input exits 2 with a one-line error (a recipe lists every problem, one per line); bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from train.recipe import COMPONENTS, IMAGE_TOKEN, TEMPLATES, RecipeError, UsageError, load_recipe


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors: one line, exit 2
        self.exit(2, f"kakehashi: error: {message}\n")


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a recipe field, e.g. --set stages.1.save_every=10 (repeatable)")


def cmd_train(args) -> int:
    from train.run import run

    from data_pipelines.loader import TooManyBadSamples
    from train.engine import EXIT_BAD_DATA, EXIT_NONFINITE, NonFiniteLimit
    from train.preemption import EXIT_PREEMPTED, Preempted

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        run(recipe, Path(args.output), force=args.force, export=not args.no_export, resume=args.resume)
    except NonFiniteLimit as err:
        print(f"kakehashi: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except TooManyBadSamples as err:
        print(f"kakehashi: error: {err}", file=sys.stderr)
        return EXIT_BAD_DATA
    except Preempted as err:
        print(f"kakehashi: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def recipe_report(recipe) -> dict:
    """Parameter counts per component, and per stage what trains, from a model built on the meta device."""
    import tempfile

    import torch

    from train.model import build_model, check_vision_last_blocks, load_tokenizer, model_config, parameter_counts, vision_blocks

    spec = recipe.model
    with tempfile.TemporaryDirectory() as cache:
        try:
            tokenizer = load_tokenizer(spec, os.environ.get("KAKEHASHI_CACHE", cache), offline=True)
            vocab, image_id = len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        except OSError:  # a hub tokenizer not on this machine: the LLM config's vocabulary (+ the image token)
            vocab, image_id = 0, -1
        config = model_config(spec, vocab, image_id)
        if image_id < 0:
            config.text_config.vocab_size += 1 + len(spec.image_start_end or ())  # + image start/end tokens
            config.image_token_index = config.text_config.vocab_size - 1
    with torch.device("meta"):
        model = build_model(spec, config, load_weights=False)
    params = parameter_counts(model)

    def trainable(stage, component: str) -> int:
        if not stage.trains(component):
            return 0
        if component == "vision_encoder" and stage.vision_encoder_last_blocks is not None:  # partial unfreezing
            check_vision_last_blocks(model, stage)
            blocks = vision_blocks(model)[-stage.vision_encoder_last_blocks:]
            return sum(p.numel() for p in blocks.parameters())
        return params[component]

    stages = [
        {
            "name": stage.name,
            "trainable": {c: trainable(stage, c) for c in COMPONENTS},
            "frozen": {c: params[c] - trainable(stage, c) for c in COMPONENTS},
            "zero_stage": stage.zero_stage,
            "precision": stage.precision,
            "steps": stage.steps,
            "global_batch_size": stage.global_batch_size,
            "micro_batch_size": stage.micro_batch_size,
        }
        for stage in recipe.stages
    ]
    return {"recipe": recipe.name, "params": params, "stages": stages}


def cmd_recipe_check(args) -> int:
    from train.stages import format_freeze_table

    recipe = load_recipe(args.recipe, args.overrides, check_data=not args.skip_data)
    report = recipe_report(recipe)
    if args.json:
        print(json.dumps(report))
        return 0
    params = report["params"]
    print(f"recipe {recipe.name}: OK ({len(recipe.stages)} stages, template {recipe.template})")
    print("parameters: " + ", ".join(f"{c} {params[c]:,}" for c in COMPONENTS) + f", total {sum(params.values()):,}")
    for i, stage in enumerate(report["stages"]):
        print(f"stage {i + 1} {stage['name']}: ZeRO-{stage['zero_stage']}, {stage['precision']}, {stage['steps']} steps, "
              f"global batch {stage['global_batch_size']} (micro {stage['micro_batch_size']})")
        print(format_freeze_table({c: {"trainable": stage["trainable"][c], "frozen": stage["frozen"][c]} for c in COMPONENTS}))
    return 0


def cmd_export(args) -> int:
    from train.export import export_stage, find_stage

    run_dir = Path(args.run_dir)
    out = export_stage(run_dir, find_stage(run_dir, args.stage), Path(args.out), force=args.force)
    print(f"exported {out}")
    return 0


def _export_dir(path: str) -> Path:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an exported model (no config.json)")
    return Path(path)


def cmd_chat(args) -> int:
    from PIL import Image

    from train.chat import answer, load_export

    model_dir = _export_dir(args.model)
    image = Image.open(args.image).convert("RGB")
    model, processor = load_export(model_dir)
    print(answer(model, processor, [image], args.prompt, args.max_new_tokens))
    return 0


def cmd_shapes_eval(args) -> int:
    from train.shapes_eval import shapes_accuracy

    report = shapes_accuracy(_export_dir(args.model), samples=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(f"{args.model}: colour {report['colour_accuracy']:.0%}, shape {report['shape_accuracy']:.0%} "
              f"on {report['samples']} fresh shapes (colour chance {report['chance_colour']:.0%})")
        for example in report["examples"]:
            print(f"  {example['truth']}: {example['colour_answer']} / {example['shape_answer']}")
    return 0


def cmd_eval(args) -> int:
    from train.evaluate import evaluate

    model_dir = _export_dir(args.model)
    template = args.template
    if template is None:
        info = model_dir / "kakehashi.json"
        if not info.is_file():
            raise UsageError(f"{model_dir} does not say its template (no kakehashi.json); pass --template")
        template = json.loads(info.read_text())["template"]
    report = evaluate(model_dir, args.data, template, max_samples=args.max_samples)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        judge = "" if report["judge"] is None else f", judge {report['judge']:.2f}"
        print(f"loss {report['loss']:.4f} over {report['samples']} samples ({report['bad_samples']} bad); "
              f"VQA ({report['vqa_samples']}): exact match {report['exact_match']:.1%}, ROUGE-L {report['rouge_l']:.3f}{judge}")
        for source, loss in report["loss_by_source"].items():
            print(f"  {source}: loss {loss:.4f}")
    return 0


def cmd_report(args) -> int:
    from train.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} is not a kakehashi run (no metrics.jsonl)")
    out = write_report(run_dir)
    print(f"report: {out / 'summary.md'} and {len(list(out.glob('*.png')))} plot(s) in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kakehashi", description="Train Japanese vision-language models in recipe-driven stages.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    train = commands.add_parser("train", help="run every stage of a recipe, then export")
    _add_recipe_args(train)
    train.add_argument("--output", required=True, help="run directory (stages already complete there are skipped)")
    train.add_argument("--force", action="store_true", help="use an output directory that holds other files")
    train.add_argument("--no-export", action="store_true", help="skip the export after the last stage")
    train.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                       help="auto: continue from the newest complete checkpoint (default); never: start over "
                            "(with --force on a used output); PATH: that checkpoint")
    train.set_defaults(func=cmd_train)

    recipe = commands.add_parser("recipe", help="recipe tools").add_subparsers(dest="recipe_command", required=True,
                                                                               parser_class=ArgumentParser)
    check = recipe.add_parser("check", help="validate a recipe offline and count parameters per stage")
    _add_recipe_args(check)
    check.add_argument("--json", action="store_true")
    check.add_argument("--skip-data", action="store_true",
                       help="do not require the shards to exist here (data that lives on the training cluster)")
    check.set_defaults(func=cmd_recipe_check)

    from data_pipelines.bench import register as register_data_bench
    from data_pipelines.commands import register as register_data

    register_data(commands)
    bench = commands.add_parser("bench", help="benchmarks, each against a baseline measured in the same run")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, parser_class=ArgumentParser)
    register_data_bench(bench_commands)
    from train.bench import register as register_train_bench

    register_train_bench(bench_commands)

    from train.submit import register as register_submit

    register_submit(commands)

    export = commands.add_parser("export", help="export a finished stage as an HF LlavaForConditionalGeneration")
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

    evaluation = commands.add_parser("eval", help="validation loss per source, exact match and ROUGE-L on VQA")
    evaluation.add_argument("model", help="an export directory")
    evaluation.add_argument("--data", nargs="+", required=True, metavar="SHARD")
    evaluation.add_argument("--template", choices=TEMPLATES, help="default: the export's own (kakehashi.json)")
    evaluation.add_argument("--max-samples", type=int, default=200)
    evaluation.add_argument("--json", action="store_true")
    evaluation.set_defaults(func=cmd_eval)

    report = commands.add_parser("report", help="plots and a markdown summary of a run")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    shapes = commands.add_parser("shapes-eval", help="score an export on freshly drawn synthetic shapes")
    shapes.add_argument("model")
    shapes.add_argument("--samples", type=int, default=100)
    shapes.add_argument("--seed", type=int, default=12345, help="drawing seed (training data uses others)")
    shapes.add_argument("--json", action="store_true")
    shapes.set_defaults(func=cmd_shapes_eval)
    return parser


def _configure_logging() -> None:
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return args.func(args)
    except RecipeError as err:
        print(f"kakehashi: error: {err.source}: {len(err.problems)} problem(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except (UsageError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        print(f"kakehashi: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
