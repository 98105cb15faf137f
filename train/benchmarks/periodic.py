"""Benchmarks inside training (train/periodic_eval.py): an eval_data entry `{benchmark: NAME, path: PATH}` answers the
benchmark's first `eval_samples` samples at every periodic eval and logs its judge-free metrics on eval-mm's scale
as `eval/<name>/<metric>` (name: the entry's `name`, else the benchmark's). Answers are greedy, batched, cut at
MAX_NEW_TOKENS as the rest of periodic eval (`kakehashi eval --task` uses eval-mm's 256)."""

from __future__ import annotations

from dataclasses import dataclass

from train.benchmarks import task_named
from train.benchmarks.base import Sample, Task
from train.benchmarks.generate import GenerationSettings, generate_answers

MAX_NEW_TOKENS = 32  # as periodic eval's VQA answers


@dataclass
class BenchmarkEval:
    name: str
    task: Task
    samples: list[Sample]
    images: list[list]  # each sample's images, decoded once
    settings: GenerationSettings

    def run(self, model, processor, **generate) -> dict:
        """eval/<name>/<metric> -> the mean on eval-mm's scale; every rank answers every sample (`generate`:
        synced_gpus under ZeRO-3)."""
        requests = [(images, sample.prompt) for images, sample in zip(self.images, self.samples)]
        predictions = generate_answers(model, processor, requests, self.settings, **generate)
        scores = self.task.score(self.samples, predictions, judge=None)
        record = {f"eval/{self.name}/{metric}": value for metric, value in scores.summary.items() if value is not None}
        record[f"eval/{self.name}/samples"] = len(self.samples)
        return record


def load_benchmark_evals(sources, samples: int, template: str, batch_size: int = 8) -> list[BenchmarkEval]:
    """A BenchmarkEval per benchmark entry of `sources` (a stage's eval_data), its first `samples` samples."""
    evals = []
    for source in sources:
        task = task_named(source.benchmark)
        loaded = task.load(source.path, limit=samples)
        settings = GenerationSettings.for_template(template, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
        evals.append(BenchmarkEval(source.name or task.name, task, loaded,
                                   [[image.load() for image in s.images] for s in loaded], settings))
    return evals
