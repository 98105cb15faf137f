"""JMMMU: multiple-choice and open questions over one to seven images, scored by accuracy with MMMU's answer
parsing as eval-mm applies it (eval_mm/tasks/jmmmu.py for the prompt and images, eval_mm/metrics/jmmmu_scorer.py
for parsing and aggregation; MMMU's own eval_utils.py underneath). eval-mm's default random_choice=False: an
answer that names no choice is wrong."""

from __future__ import annotations

import ast
import re
from collections import defaultdict

from train.benchmarks.base import Sample, Scores, Task
from train.benchmarks.data import BenchmarkDataError, Rows, field, image

MULTI_CHOICE_PROMPT = "与えられた選択肢の中から最も適切な回答のアルファベットを直接記入してください。"
OPEN_ENDED_PROMPT = "質問に対する回答を単語や短いフレーズで記入してください。"
MAX_IMAGES = 7
DOMAINS = {  # eval_mm/metrics/jmmmu_scorer.py DOMAIN_CAT2SUB_CAT
    "Art and Psychology": ["Design", "Music", "Psychology"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
# get_key_subresponses' indicators; "解答は、" "回答は" are one string there (two literals side by side), kept so
OPEN_INDICATORS = ("よって", "よって、", "答えは", "答えは、", "最終的に", "最終的に、", "解答は", "解答は、回答は",
                   "回答は、")
PUNCTUATION = (",", ".", "!", "?", ";", ":", "'", "、", "。", "！", "？", "；", "：")


def construct_prompt(question: str, question_type: str, options: str) -> str:
    """eval-mm's construct_prompt: the question, lettered options and the instruction (multiple choice), or the
    open-ended instruction."""
    question = question.replace("<image1>", "<image 1>")
    if question_type == "multiple-choice":
        choices = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(ast.literal_eval(options)))
        return f"{question}\n{choices}\n\n{MULTI_CHOICE_PROMPT}"
    return f"{question}\n\n{OPEN_ENDED_PROMPT}"


def doc_to_text(prompt: str) -> str:
    """replace_images_tokens: <image 1> ... <image 7> become <image> (which the runner then removes)."""
    for i in range(1, MAX_IMAGES + 1):
        prompt = prompt.replace(f"<image {i}>", "<image>")
    return prompt


def image_fields(prompt: str) -> list[str]:
    """doc_to_visual: the image_N fields the prompt's <image N> tokens name, sorted, each once."""
    return sorted({token.strip("<>").replace(" ", "_") for token in re.findall(r"<image \d+>", prompt)})


class Jmmmu(Task):
    """JMMMU/JMMMU (every subject's split test): rows `id, question, options (a Python list literal, as the
    dataset stores it), answer, question_type, image_1 ... image_7`."""

    name = "jmmmu"
    columns = ("id", "question", "options", "answer", "question_type", "image_1")
    metrics = ("accuracy",)
    scales = {"accuracy": "0-1, eval-mm jmmmu Overall (instance-level accuracy)"}

    def samples(self, rows: Rows, limit: int | None) -> list[Sample]:
        count = len(rows.rows) if limit is None else min(limit, len(rows.rows))
        samples = []
        for index in range(count):
            question_type, options = field(rows, index, "question_type", str), field(rows, index, "options", str)
            try:
                parsed = ast.literal_eval(options) if question_type == "multiple-choice" else []
            except (ValueError, SyntaxError):
                raise BenchmarkDataError(f"{rows.file}: row {index}: field 'options' is not a list literal") from None
            prompt = construct_prompt(field(rows, index, "question", str), question_type, options)
            doc = {"id": field(rows, index, "id", str), "question_type": question_type,
                   "options": [str(option) for option in parsed]}
            extract_subset_name(doc["id"], f"{rows.file}: row {index}: field 'id'")
            images = [image(rows, index, name) for name in image_fields(prompt)]
            samples.append(Sample(doc["id"], doc_to_text(prompt), images, str(field(rows, index, "answer")), doc))
        return samples

    def score(self, samples: list[Sample], predictions: list[str], judge=None) -> Scores:
        scores = Scores()
        parsed = [parse_answer(s.doc, p) for s, p in zip(samples, predictions)]
        correct = [int(is_correct(s.doc, s.reference, answer)) for s, answer in zip(samples, parsed)]
        scores.per_sample["accuracy"] = correct
        scores.per_sample["parsed_answer"] = [a if isinstance(a, (str, type(None))) else sorted(map(str, a))
                                              for a in parsed]
        scores.details["accuracy"] = aggregate([s.doc["id"] for s in samples], correct)
        scores.summary["accuracy"] = sum(correct) / len(correct)  # eval-mm's overall_score (unrounded)
        return scores


# ---------------------------------------------------------------------------------------------- parsing


def parse_answer(doc: dict, response: str):
    if doc["question_type"] == "multiple-choice":
        letters = [chr(ord("A") + i) for i in range(len(doc["options"]))]
        return parse_multi_choice(response, letters, dict(zip(letters, doc["options"])))
    return parse_open(response)


def is_correct(doc: dict, reference: str, parsed) -> bool:
    if doc["question_type"] == "multiple-choice":  # eval_multi_choice
        return reference == parsed
    answers = normalize_str(reference)  # eval_open
    for prediction in parsed:
        if isinstance(prediction, str):
            if any(isinstance(a, str) and a in prediction for a in answers):
                return True
        elif prediction in answers:
            return True
    return False


def parse_multi_choice(response: str, choices: list[str], index2ans: dict[str, str]) -> str | None:
    """MMMU's parse_multi_choice_response with JMMMU's extra rule (a letter between Japanese characters)."""
    for char in PUNCTUATION:
        response = response.strip(char)
    response = " " + response + " "  # avoid partial matches
    candidates = [c for c in choices if f"({c})" in response]
    bracketed, by_content = bool(candidates), False
    if not candidates:
        candidates = [c for c in choices if f"{c} " in response]
    if not candidates:
        japanese = r"[\u3040-\u30FF\u4E00-\u9FFF]"
        candidates = [c for c in choices if re.search(rf"{japanese}{c}{japanese}", response)]
    if not candidates:
        candidates = [c for c in choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates, by_content = [c for c, answer in index2ans.items() if answer.lower() in response.lower()], True
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    else:
        positions = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    return candidates[max(range(len(positions)), key=lambda i: (positions[i], -i))]  # np.argmax: the first maximum


def extract_numbers(text: str) -> list[str]:
    """JMMMU's extract_numbers: numbers with commas, scientific, simple, and before a Japanese counter."""
    return (re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text) + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
            + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])", text)
            + re.findall(r"(\d+)(?:つ|個|度|円|人|年|匹|台|%)", text))


def normalize_str(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def key_subresponses(response: str) -> list[str]:
    """get_key_subresponses: per sentence, the shortest tail after an indicator (in the last one also = or ＝)."""
    response = response.strip().strip("。")
    sentences = re.split(r"[。！？.]\s*|\n", response)
    indicators = list(OPEN_INDICATORS)
    found = []
    for index, sentence in enumerate(sentences):
        if index == len(sentences) - 1:
            indicators += ["＝", "="]
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in PUNCTUATION:
            found.append(shortest)
    return found or [response]


def parse_open(response: str) -> list:
    keys = key_subresponses(response)
    predictions = keys + [number for key in keys for number in extract_numbers(key)]
    return list({value for prediction in predictions for value in normalize_str(prediction)})


# ---------------------------------------------------------------------------------------------- aggregation


def extract_subset_name(question_id: str, where: str = "id") -> str:
    """The subject in an id such as validation_Accounting_1 (eval-mm's extract_subset_name)."""
    split = question_id.split("_")[0]
    match = re.search(rf"^{re.escape(split)}_(.+?)_\d+$", question_id)
    if not match:
        raise BenchmarkDataError(f"{where}: {question_id!r} is not SPLIT_SUBJECT_NUMBER (e.g. test_Accounting_1)")
    return match.group(1)


def aggregate(ids: list[str], correct: list[int]) -> dict[str, float]:
    """eval-mm's JMMMUScorer.aggregate: accuracy per subject, per domain (instance-level) and Overall."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for question_id, score in zip(ids, correct):
        by_subject[extract_subset_name(question_id)].append(score)
    accuracy = {subject: sum(s) / len(s) for subject, s in by_subject.items()}
    result: dict[str, float] = {}
    for domain, subjects in DOMAINS.items():
        present = [s for s in subjects if s in accuracy]
        count = sum(len(by_subject[s]) for s in present)
        result["Overall-" + domain] = round(sum(accuracy[s] * len(by_subject[s]) for s in present) / count, 5) \
            if count else 0
        result.update({s: round(accuracy[s], 5) for s in present})
    result["Overall"] = round(sum(correct) / len(correct), 5)
    return result
