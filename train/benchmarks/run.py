"""`kakehashi eval EXPORT --task NAME --data PATH [--limit N] [--predictions FILE] [--json]`: answer a benchmark
with an export (any family) and score it as eval-mm does.

The benchmark file is read and checked completely before the model loads, so a bad file costs nothing. The result
gives each metric's mean on eval-mm's scale (and what that scale is), the task's breakdown, the generation settings
and the judge; `--predictions` writes one JSON line per sample (question_id, question, prediction, reference and
each metric's score), which eval-mm's own scorers or a second look can re-read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from data_pipelines.output import result, result_json
from train.benchmarks import task_named
from train.benchmarks.base import Sample, Scores
from train.benchmarks.generate import GenerationSettings, generate_answers
from train.benchmarks.judge import Judge
from train.errors import UsageError

log = logging.getLogger(__name__)


def run_benchmark(model_dir: Path | str, task_name: str, data: Path | str, *, limit: int | None = None,
                  predictions_file: Path | str | None = None, batch_size: int | None = None,
                  max_new_tokens: int | None = None) -> dict:
    """The summary document of one benchmark run (see the module doc); writes `predictions_file` when given."""
    from train.models import family_of_export

    task = task_named(task_name)
    samples = task.load(data, limit)
    judge = Judge.from_env() if task.judge_metrics else None
    family = family_of_export(model_dir)
    overrides = {k: v for k, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)) if v is not None}
    settings = GenerationSettings.for_export(model_dir, **overrides)
    log.info("%s: %d samples from %s; answering with %s (%s)", task.name, len(samples), data, model_dir, family.name)
    model, processor = family.load_export(Path(model_dir))
    if torch.cuda.is_available():
        model = model.to("cuda")
    predictions = generate_answers(model, processor, [(s.images, s.prompt) for s in samples], settings)
    scores = task.score(samples, predictions, judge)
    if predictions_file is not None:
        write_predictions(Path(predictions_file), samples, predictions, scores)
    return {
        "task": task.name, "data": str(data), "model": str(model_dir), "family": family.name,
        "samples": len(samples), "metrics": scores.summary,
        "scales": {m: task.scales[m] for m in scores.summary}, "details": scores.details,
        "judge": judge.describe() if judge is not None else None, "judged_by": scores.judged_by,
        "not_scored": scores.not_scored, "generation": settings.record(),
        "predictions": str(predictions_file) if predictions_file is not None else None,
    }


def prediction_rows(samples: list[Sample], predictions: list[str], scores: Scores) -> list[dict]:
    rows = []
    for index, (sample, prediction) in enumerate(zip(samples, predictions)):
        row = {"question_id": sample.question_id, "question": sample.question, "prediction": prediction,
               "reference": sample.reference}
        row.update({metric: values[index] for metric, values in scores.per_sample.items()})
        if scores.judged_by:
            row["judged_by"] = scores.judged_by
        rows.append(row)
    return rows


def write_predictions(path: Path, samples: list[Sample], predictions: list[str], scores: Scores) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False) for row in prediction_rows(samples, predictions, scores)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def command(args) -> int:
    """The CLI's benchmark mode of `kakehashi eval` (train/cli.py hands over when --task is given)."""
    if len(args.data) != 1:
        raise UsageError(f"--task reads one benchmark path from --data, got {len(args.data)}")
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    report = run_benchmark(args.model, args.task, args.data[0], limit=args.limit, predictions_file=args.predictions,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if args.json:
        result_json(report)
        return 0
    result(f"{report['task']}: {report['samples']} samples, {report['model']}")
    for metric, value in report["metrics"].items():
        judged = f", judged by {report['judged_by'][metric]}" if metric in report["judged_by"] else ""
        result(f"  {metric}: {'-' if value is None else f'{value:.4f}'} ({report['scales'][metric]}{judged})")
    for metric, why in report["not_scored"].items():
        result(f"  {metric}: not scored, {why}")
    if report["predictions"]:
        result(f"  predictions: {report['predictions']}")
    return 0
