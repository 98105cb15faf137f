"""JDocQA: questions on Japanese document pages, scored by answer type as eval-mm scores them
(eval_mm/tasks/jdocqa.py reads speed/JDocQA; eval_mm/metrics/jdocqa_scorer.py): yes/no, factoid and numerical
answers by normalised containment (the reference, without です / 。 / 、 / spaces and NFKC, inside the
prediction), open-ended answers by BLEU (ja-mecab, 0-1); overall is the mean of every sample's score."""

from __future__ import annotations

import unicodedata

from train.benchmarks import metrics
from train.benchmarks.base import Sample, Scores, Task
from train.benchmarks.data import BenchmarkDataError, Rows, field, image

ANSWER_TYPES = {0: "yesno", 1: "factoid", 2: "numerical", 3: "open-ended"}  # eval-mm's ANSWER_TYPE_MAP
IMAGE_FIELDS = ("image_0", "image_1", "image_2", "image_3")


def jdocqa_normalize(text: str) -> str:
    text = text.replace("です", "").replace("。", "").replace("、", "").replace(" ", "").strip()
    return unicodedata.normalize("NFKC", text)


class JDocQA(Task):
    """Rows `question, answer, answer_type (0 yes/no, 1 factoid, 2 numerical, 3 open-ended), question_id,
    image_0 ... image_3` (unused pages null), split test."""

    name = "jdocqa"
    columns = ("question", "answer", "answer_type", "question_id", *IMAGE_FIELDS)
    metrics = ("jdocqa",)
    scales = {"jdocqa": "0-1, eval-mm jdocqa overall (exact match by answer type; BLEU/100 for open-ended)"}

    def samples(self, rows: Rows, limit: int | None) -> list[Sample]:
        count = len(rows.rows) if limit is None else min(limit, len(rows.rows))
        samples = []
        for index in range(count):
            answer_type = field(rows, index, "answer_type", int)
            if answer_type not in ANSWER_TYPES:
                raise BenchmarkDataError(f"{rows.file}: row {index}: field 'answer_type' is {answer_type}, expected "
                                         f"0-3 ({', '.join(ANSWER_TYPES.values())})")
            images = [image(rows, index, name, optional=True) for name in IMAGE_FIELDS]
            samples.append(Sample(str(field(rows, index, "question_id")), field(rows, index, "question", str),
                                  [i for i in images if i is not None], field(rows, index, "answer", str),
                                  {"answer_type": answer_type}))
        return samples

    def score(self, samples: list[Sample], predictions: list[str], judge=None) -> Scores:
        per_sample = []
        for sample, prediction in zip(samples, predictions):
            if ANSWER_TYPES[sample.doc["answer_type"]] == "open-ended":
                per_sample.append(metrics.bleu_ja(sample.reference, prediction))
            else:
                per_sample.append(float(jdocqa_normalize(sample.reference) in jdocqa_normalize(prediction)))
        details = {}
        for number, kind in ANSWER_TYPES.items():
            typed = [v for v, s in zip(per_sample, samples) if s.doc["answer_type"] == number]
            details[f"{kind}_{'bleu' if kind == 'open-ended' else 'exact'}"] = metrics.mean(typed) or 0.0
        details["overall"] = metrics.mean(per_sample)
        return Scores(per_sample={"jdocqa": per_sample}, summary={"jdocqa": details["overall"]},
                      details={"jdocqa": details})
