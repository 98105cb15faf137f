"""Open-ended Japanese VQA scored by ROUGE-L and LLM-as-a-judge: JA-VG-VQA-500 and JA-VLM-Bench-in-the-Wild
(eval_mm/tasks/ja_vg_vqa_500.py, eval_mm/tasks/ja_vlm_bench_in_the_wild.py; default metrics llm-as-a-judge and
rougel, eval_mm/metadata.py)."""

from __future__ import annotations

from train.benchmarks.base import Sample, Scores, Task, llm_as_a_judge_scores, rouge_scores
from train.benchmarks.data import BenchmarkDataError, Rows, field, image

VQA_SCALES = {"rouge_l_mecab_pct": "0-100, eval-mm rougel (MeCab tokens)", "rouge_l_chars_f1": "0-1, character LCS F1",
              "llm_as_a_judge": "1-5, eval-mm llm-as-a-judge (0: no digit in the judge's reply)"}


class OpenVqaTask(Task):
    metrics = ("llm_as_a_judge", "rouge_l_mecab_pct", "rouge_l_chars_f1")
    judge_metrics = ("llm_as_a_judge",)
    scales = VQA_SCALES

    def score(self, samples: list[Sample], predictions: list[str], judge=None) -> Scores:
        scores = Scores()
        llm_as_a_judge_scores(samples, predictions, judge, scores)
        rouge_scores(samples, predictions, scores)
        return scores


class JaVgVqa500(OpenVqaTask):
    """SakanaAI/JA-VG-VQA-500 (split test): rows `image_id, image, qas: [{qa_id, question, answer}]`, flattened to
    one sample per qa, question_id = qa_id."""

    name = "ja-vg-vqa-500"
    columns = ("image_id", "image", "qas")

    def samples(self, rows: Rows, limit: int | None) -> list[Sample]:
        samples = []
        for index in range(len(rows.rows)):
            qas = field(rows, index, "qas", list)
            picture = image(rows, index, "image")
            for number, qa in enumerate(qas):
                if limit is not None and len(samples) >= limit:
                    return samples
                if not isinstance(qa, dict):
                    raise BenchmarkDataError(f"{rows.file}: row {index}: field 'qas' item {number} is not an object")
                for key in ("qa_id", "question", "answer"):
                    if qa.get(key) is None:
                        raise BenchmarkDataError(f"{rows.file}: row {index}: missing field 'qas.{number}.{key}'")
                samples.append(Sample(str(qa["qa_id"]), str(qa["question"]), [picture], str(qa["answer"]),
                                      {"image_id": field(rows, index, "image_id")}))
        return samples


class JaVlmBenchInTheWild(OpenVqaTask):
    """SakanaAI/JA-VLM-Bench-In-the-Wild (split test): rows `image, question, answer`; question_id = the row's
    index, as eval-mm numbers them."""

    name = "ja-vlm-bench-in-the-wild"
    columns = ("image", "question", "answer")

    def samples(self, rows: Rows, limit: int | None) -> list[Sample]:
        count = len(rows.rows) if limit is None else min(limit, len(rows.rows))
        return [Sample(index, field(rows, index, "question", str), [image(rows, index, "image")],
                       field(rows, index, "answer", str))
                for index in range(count)]
