"""What every benchmark task shares: a sample as eval-mm sees it, and the interface a task implements.

A task reads its benchmark's rows in the published schema (train/benchmarks/data.py), turns them into samples with
eval-mm's question text (`doc_to_text`), images (`doc_to_visual`), id and reference answer, and scores predictions
with eval-mm's metrics. The model is asked as eval-mm's runner asks (eval_mm/runner.py): the question with every
"<image>" removed, the images first (train/benchmarks/generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.benchmarks import metrics
from train.benchmarks.data import BenchmarkDataError, ImageRef, Rows, read_rows, require_columns


@dataclass
class Sample:
    question_id: str | int
    question: str               # eval-mm's input_text (doc_to_text)
    images: list[ImageRef]      # doc_to_visual, opened when generation needs them
    reference: str              # doc_to_answer
    doc: dict[str, Any] = field(default_factory=dict)  # what the task's scorers read (category, answer_type, ...)

    @property
    def prompt(self) -> str:
        """What the model is asked (eval_mm/runner.py: doc_to_text(doc).replace("<image>", ""))."""
        return self.question.replace("<image>", "")


@dataclass
class Scores:
    """Per-sample scores (metric -> one value per sample, as written to --predictions) and the summary on eval-mm's
    scale (metric -> value), with a task's breakdown (per category, domain, answer type) in `details`."""

    per_sample: dict[str, list] = field(default_factory=dict)
    summary: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    judged_by: dict[str, str] = field(default_factory=dict)   # judge metric -> the judge model that scored it
    not_scored: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed


class Task:
    """A benchmark. `metrics` are the metrics reported (eval-mm's default metrics for the task first; judge metrics
    need a judge endpoint), `split` the split eval-mm reads."""

    name: str
    split: str = "test"
    columns: tuple[str, ...] = ()            # the published schema's columns every file must have
    metrics: tuple[str, ...] = ()
    judge_metrics: tuple[str, ...] = ()      # of `metrics`, those an LLM judge scores
    scales: dict[str, str] = {}

    def load(self, path, limit: int | None = None) -> list[Sample]:
        rows = read_rows(path, self.split)
        require_columns(rows, list(self.columns))
        samples = self.samples(rows, limit)
        if not samples:
            raise BenchmarkDataError(f"{rows.file}: holds no samples")
        return samples

    def samples(self, rows: Rows, limit: int | None) -> list[Sample]:
        raise NotImplementedError

    def score(self, samples: list[Sample], predictions: list[str], judge=None) -> Scores:
        raise NotImplementedError


def rouge_scores(samples: list[Sample], predictions: list[str], scores: Scores) -> None:
    """rouge_l_mecab_pct (eval-mm's, 0-100) and rouge_l_chars_f1 (kakehashi's character LCS F1, 0-1), per sample
    and mean."""
    pairs = list(zip(samples, predictions))
    scores.per_sample["rouge_l_mecab_pct"] = [metrics.rouge_l_mecab_pct(s.reference, p) for s, p in pairs]
    scores.per_sample["rouge_l_chars_f1"] = [metrics.rouge_l_chars_f1(p, s.reference) for s, p in pairs]
    for name in ("rouge_l_mecab_pct", "rouge_l_chars_f1"):
        scores.summary[name] = metrics.mean(scores.per_sample[name])


def llm_as_a_judge_scores(samples: list[Sample], predictions: list[str], judge, scores: Scores) -> None:
    """eval-mm's llm-as-a-judge (1-5; 0 when the completion has no digit), per sample and mean."""
    from train.benchmarks.judge import llm_as_a_judge_messages, parse_llm_as_a_judge

    if judge is None:
        scores.not_scored["llm_as_a_judge"] = "no judge endpoint (set KAKEHASHI_JUDGE_URL)"
        return
    completions = judge.complete_all([llm_as_a_judge_messages(s.question, s.reference, p)
                                      for s, p in zip(samples, predictions)])
    scores.per_sample["llm_as_a_judge"] = [parse_llm_as_a_judge(c) for c in completions]
    scores.summary["llm_as_a_judge"] = metrics.mean(scores.per_sample["llm_as_a_judge"])
    scores.judged_by["llm_as_a_judge"] = judge.model
