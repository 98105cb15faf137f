"""Text metrics computed as llm-jp-eval-mm (`eval-mm`) computes them, so a kakehashi figure can stand beside a
published one.

rouge_l_mecab_pct  eval_mm/metrics/rougel_scorer.py: `rouge_score`'s ROUGE-L F-measure over MeCab tokens (fugashi's
             Tagger("-Owakati") with unidic-lite), after emoji removal, NFKC and whitespace folding; per sample on
             0-100 (eval-mm's `rouge_ja([ref], [pred])["rougeL"]`, a one-sample bootstrap whose mid is the score).
rouge_l_chars_f1   kakehashi's character-level LCS F1 on 0-1; not what eval-mm reports.
bleu_ja      eval_mm/metrics/jdocqa_scorer.py: sacrebleu's sentence BLEU, ja-mecab tokens, exp smoothing with
             value 0, no effective order, / 100 (so 0-1; fewer than four tokens give 0, as there).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# the ranges eval-mm strips after emoji.is_emoji (eval_mm/metrics/rougel_scorer.py, MecabTokenizer.normalize_answer)
_EMOJI_RANGES = re.compile("[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff"
                           "\U00002702-\U000027b0]+", flags=re.UNICODE)


def normalize(text: str) -> str:
    """eval-mm's normalize_answer: drop emoji (per character, then the pictograph ranges), NFKC, fold whitespace."""
    import emoji

    text = "".join("" if emoji.is_emoji(ch) else ch for ch in text)
    text = _EMOJI_RANGES.sub("", text)
    return " ".join(unicodedata.normalize("NFKC", text).split())


class MecabTokenizer:
    """The tokenizer eval-mm hands rouge_score: MeCab wakati over the normalised text."""

    def __init__(self):
        from fugashi import Tagger

        self.tagger = Tagger("-Owakati")

    def tokenize(self, text: str) -> list[str]:
        return self.tagger.parse(normalize(text)).split()


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=MecabTokenizer())


def rouge_l_mecab_pct(reference: str, prediction: str) -> float:
    """eval-mm's per-sample ROUGE-L over MeCab tokens, 0-100."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure * 100


def rouge_l_chars_f1(candidate: str, reference: str) -> float:
    """kakehashi's character-level ROUGE-L F1, 0-1: 2PR / (P + R) over the longest common subsequence of
    characters (not what eval-mm reports: that is rouge_l_mecab_pct)."""
    if not candidate or not reference:
        return float(candidate == reference)
    previous = [0] * (len(reference) + 1)
    for a in candidate:
        current = [0]
        for j, b in enumerate(reference):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def bleu_ja(reference: str, prediction: str) -> float:
    """eval-mm's JDocQA BLEU for open-ended answers, 0-1."""
    import logging

    from sacrebleu import sentence_bleu

    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # its effective-order advice, once per call
    score = sentence_bleu(hypothesis=prediction, references=[reference], smooth_method="exp", smooth_value=0.0,
                          tokenize="ja-mecab", use_effective_order=False, lowercase=False)
    return score.score / 100


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
