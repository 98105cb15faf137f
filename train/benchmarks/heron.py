"""Japanese-Heron-Bench: the judge scores the model's answer and the reference answer 1-10, and a category's score
is the model's mean relative to the reference's (eval_mm/tasks/japanese_heron_bench.py,
eval_mm/metrics/heron_bench_scorer.py)."""

from __future__ import annotations

from collections import defaultdict

from train.benchmarks.base import Sample, Scores, Task, rouge_scores
from train.benchmarks.data import BenchmarkDataError, Rows, field, image
from train.benchmarks.vqa import VQA_SCALES

REFERENCE_MODEL = "gpt-4-0125-preview"  # doc_to_answer: doc["answer"]["gpt-4-0125-preview"]
CATEGORIES = ("conv", "detail", "complex")


class JapaneseHeronBench(Task):
    """Rows `image, text, answer: {model: reference}, question_id, category, context` (split train, as eval-mm
    reads it). heron_bench is eval-mm's overall_rel; ROUGE-L against the reference is reported too (judge-free)."""

    name = "japanese-heron-bench"
    split = "train"
    columns = ("image", "text", "answer", "question_id", "category", "context")
    metrics = ("heron_bench", "rouge_l_mecab_pct", "rouge_l_chars_f1")
    judge_metrics = ("heron_bench",)
    scales = {**VQA_SCALES, "heron_bench": "0-100+, eval-mm heron-bench overall_rel (model / reference judge score "
                                           "x 100, mean of conv, detail, complex)"}

    def samples(self, rows: Rows, limit: int | None) -> list[Sample]:
        count = len(rows.rows) if limit is None else min(limit, len(rows.rows))
        samples = []
        for index in range(count):
            answers = field(rows, index, "answer", dict)
            if answers.get(REFERENCE_MODEL) is None:
                raise BenchmarkDataError(f"{rows.file}: row {index}: missing field 'answer.{REFERENCE_MODEL}' (the "
                                         f"reference eval-mm scores against)")
            samples.append(Sample(field(rows, index, "question_id"), field(rows, index, "text", str),
                                  [image(rows, index, "image")], str(answers[REFERENCE_MODEL]),
                                  {"category": field(rows, index, "category", str),
                                   "context": field(rows, index, "context", str)}))
        return samples

    def score(self, samples: list[Sample], predictions: list[str], judge=None) -> Scores:
        from train.benchmarks.judge import heron_messages, parse_heron

        scores = Scores()
        if judge is None:
            scores.not_scored["heron_bench"] = "no judge endpoint (set KAKEHASHI_JUDGE_URL)"
        else:
            completions = judge.complete_all([heron_messages(s.doc["context"], s.question, s.reference, p)
                                              for s, p in zip(samples, predictions)])
            judged = [parse_heron(c) for c in completions]
            scores.per_sample["heron_bench"] = judged
            scores.details["heron_bench"] = heron_aggregate([s.doc["category"] for s in samples], judged)
            scores.summary["heron_bench"] = scores.details["heron_bench"]["overall_rel"]
            scores.judged_by["heron_bench"] = judge.model
        rouge_scores(samples, predictions, scores)
        return scores


def heron_aggregate(categories: list[str], judged: list[dict[str, int]]) -> dict[str, float]:
    """eval-mm's HeronBenchScorer.aggregate: per category the mean model score and 100 x its ratio to the mean
    reference score (a category absent, or all parse errors, is left out and counts 0 in overall_rel)."""
    import numpy as np

    result: dict[str, float] = defaultdict(float)
    for category in CATEGORIES:
        own = [j["score"] for j, c in zip(judged, categories) if c == category]
        reference = [j["score_gpt"] for j, c in zip(judged, categories) if c == category]
        if not own or np.mean(own) == -1:
            continue
        result[category] = float(np.mean(own))
        result[category + "_rel"] = float(100 * np.mean(own) / max(0.01, np.mean(reference)))
    result["parse_error_count"] = sum(j["score"] == -1 for j in judged)
    result["overall"] = sum(j["score"] for j in judged) / len(judged)
    result["overall_rel"] = sum(result[c + "_rel"] for c in CATEGORIES) / len(CATEGORIES)
    return dict(result)
