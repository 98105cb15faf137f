"""LLM-as-a-judge through any OpenAI-compatible `/chat/completions` endpoint, with eval-mm's prompts and scales.

Configured by the environment, as `kakehashi eval` always was: KAKEHASHI_JUDGE_URL (the API base, e.g.
http://127.0.0.1:8000/v1), KAKEHASHI_JUDGE_MODEL (default gpt-4o-2024-11-20, eval-mm's default judge),
KAKEHASHI_JUDGE_KEY (sent as a bearer token), KAKEHASHI_JUDGE_RETRIES (5 tries, as eval-mm's backoff) and
KAKEHASHI_JUDGE_BACKOFF (seconds before the second try, doubling after; 1).

Requests are those eval-mm sends (eval_mm/utils/azure_client.py): the messages, max_tokens 1024, temperature 0,
seed 0. Where eval-mm scores a request that still fails after its retries as an empty completion, kakehashi stops
with one line naming the endpoint and the last error: a judge score is never made up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from train.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_JUDGE_MODEL = "gpt-4o-2024-11-20"  # eval_mm/cli.py --judge_model default

# eval_mm/metrics/llm_as_a_judge_scorer.py: INSTRUCTION and its system message; a 1-5 score, the first digit of the
# completion (0 when it has none)
LLM_AS_A_JUDGE_SYSTEM = "You are an expert evaluator."
LLM_AS_A_JUDGE_PROMPT = """
You are an expert evaluator. You are given a (Question, Answer, Prediction) triplet. Your task is to evaluate how well the Prediction aligns with the Answer in the context of the Question.

Please assign a score from 1 to 5 based on the following criteria:

5: Excellent — The Prediction fully matches the Answer with complete correctness and relevance.
4: Good — The Prediction is mostly correct with only minor inaccuracies or missing details.
3: Fair — The Prediction is partially correct but contains noticeable errors or missing key points.
2: Poor — The Prediction is mostly incorrect or irrelevant, but there are small fragments of correctness.
1: Very Poor — The Prediction is completely incorrect or irrelevant.
Output only the score (an integer from 1 to 5). Do not add any explanation.

Triplet:
Question: {Question}
Answer: {Answer}
Prediction: {Prediction}

Your Score:
"""  # noqa: E501

# eval_mm/metrics/heron_bench_scorer.py: INSTRUCTION and its system message; the judge scores the reference answer
# ("score_gpt") and the model's ("score") 1-10 in one JSON object
HERON_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
HERON_PROMPT = """
You are an expert evaluator. You are given the following information:
- Context: A description of the image.
- Question: A question about the image.
- GPT-4o Answer: GPT-4o's answer to the question.
- Model Answer: The target model's answer to the question.

Your task is to evaluate each answer independently based on how well it answers the question given the context.

Please assign a score from 1 to 10 for each answer according to the following guideline:
- 10: Perfect — Completely correct, relevant, and fully addresses the question based on the context.
- 8-9: Very Good — Mostly correct with only minor inaccuracies or slight omissions.
- 6-7: Good — Generally correct but contains noticeable errors or lacks important details.
- 4-5: Poor — Significant errors or missing key points, but some relevance remains.
- 1-3: Very Poor — Mostly or completely incorrect, irrelevant, or nonsensical.

Output Format (JSON):
Return the result in the following JSON format:
```json
{{
    "score_gpt": int,
    "score": int
}}
```
Do not output anything other than the JSON.

Input:
{{
    "context": {context},
    "question": {question},
    "gpt4o_answer": {gpt4o_answer},
    "model_answer": {model_answer}
}}

Output:
"""


class JudgeError(UsageError):
    """The judge endpoint failed (after its retries) or answered something that is not a chat completion."""


# `kakehashi eval --data` (train/evaluate.py): a 1-10 score of an answer against the reference answer
REFERENCE_SCORE_PROMPT = (
    "次の質問に対する回答を、参照回答と比べて1から10の整数で採点してください。数字だけを答えてください。\n"
    "質問: {question}\n参照回答: {reference}\n回答: {answer}"
)


class Judge:
    """An OpenAI-compatible chat endpoint that scores answers."""

    def __init__(self, url: str, model: str = DEFAULT_JUDGE_MODEL, key: str | None = None, tries: int = 5,
                 backoff: float = 1.0, timeout: float = 120.0, concurrency: int = 10):
        self.url, self.model, self.key = url.rstrip("/") + "/chat/completions", model, key
        self.tries, self.backoff, self.timeout, self.concurrency = max(tries, 1), backoff, timeout, concurrency

    @classmethod
    def from_env(cls) -> Judge | None:
        """The judge the environment configures, or None without KAKEHASHI_JUDGE_URL."""
        url = os.environ.get("KAKEHASHI_JUDGE_URL")
        if not url:
            return None
        try:
            tries = int(os.environ.get("KAKEHASHI_JUDGE_RETRIES", "5"))
            backoff = float(os.environ.get("KAKEHASHI_JUDGE_BACKOFF", "1"))
        except ValueError as err:
            raise UsageError(f"KAKEHASHI_JUDGE_RETRIES / KAKEHASHI_JUDGE_BACKOFF: {err}") from None
        return cls(url, os.environ.get("KAKEHASHI_JUDGE_MODEL") or DEFAULT_JUDGE_MODEL,
                   os.environ.get("KAKEHASHI_JUDGE_KEY") or None, tries=tries, backoff=backoff)

    def complete(self, messages: list[dict]) -> str:
        """The completion's text; retried with exponential backoff, JudgeError after the last try."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": 1024, "temperature": 0.0,
                           "seed": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        problem = ""
        for attempt in range(self.tries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url, body, headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _completion_text(json.load(response))
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code} {err.reason}"
            except (urllib.error.URLError, OSError) as err:
                problem = str(getattr(err, "reason", err))
            except (ValueError, KeyError, IndexError, TypeError) as err:
                problem = f"not a chat completion ({type(err).__name__}: {err})"
            log.warning("judge %s: try %d/%d failed: %s", self.url, attempt + 1, self.tries, problem)
        raise JudgeError(f"judge endpoint {self.url} (model {self.model}) failed after {self.tries} tries: "
                         f"{problem}".replace("\n", " "))

    def complete_all(self, conversations: list[list[dict]]) -> list[str]:
        """Completions of many conversations, `concurrency` requests at a time, in order."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.complete, conversations))

    def describe(self) -> dict:
        return {"url": self.url, "model": self.model}


def _completion_text(document: dict) -> str:
    content = document["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    return content


# ---------------------------------------------------------------------------------------------- llm-as-a-judge


def llm_as_a_judge_messages(question: str, answer: str, prediction: str) -> list[dict]:
    content = LLM_AS_A_JUDGE_PROMPT.format(Question=question, Answer=answer, Prediction=prediction)
    return [{"role": "system", "content": LLM_AS_A_JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_llm_as_a_judge(completion: str) -> int:
    """eval-mm: the first digit in the completion, 0 when there is none."""
    found = re.search(r"\d", completion)
    return int(found.group()) if found else 0


# ---------------------------------------------------------------------------------------------- heron-bench


def heron_messages(context: str, question: str, reference: str, prediction: str) -> list[dict]:
    content = HERON_PROMPT.format(context=context, question=question, gpt4o_answer=reference, model_answer=prediction)
    return [{"role": "system", "content": HERON_SYSTEM}, {"role": "user", "content": content}]


def parse_heron(completion: str) -> dict[str, int]:
    """eval-mm's parse_score: the first ```json block (else {...} span) holding both scores; -1 / -1 when none."""
    candidates = re.findall(r"```json(.*?)```", completion, re.DOTALL) or re.findall(r"\{.*?\}", completion, re.DOTALL)
    for candidate in candidates:
        for text in (candidate.strip(), re.sub(r"[\x00-\x1F\x7F]", "", candidate.strip())):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict) and "score" in parsed and "score_gpt" in parsed:
                return {"score": int(parsed["score"]), "score_gpt": int(parsed["score_gpt"])}
            break  # parsed, but not the scores: eval-mm goes on to the next candidate
    return {"score": -1, "score_gpt": -1}


def reference_score_1_10(judge: Judge, question: str, reference: str, answer: str) -> float | None:
    """The judge's 1-10 score of `answer` against `reference` (REFERENCE_SCORE_PROMPT); None without a number."""
    content = REFERENCE_SCORE_PROMPT.format(question=question, reference=reference, answer=answer)
    digits = "".join(ch for ch in judge.complete([{"role": "user", "content": content}]).strip() if ch.isdecimal())
    return float(digits) if digits and 1 <= int(digits) <= 10 else None
