"""`kakehashi eval MODEL --data SHARD...`: validation loss per source, and generation metrics on VQA samples.

Generation metrics, as Japanese VLM benchmarks report them:
  exact match    the answer equals the reference after stripping whitespace and the EOS
  ROUGE-L        character-level LCS F1 (JA-VG-VQA-500 style: Japanese has no spaces to split words on)
  judge          optional (Heron-Bench style): an OpenAI-compatible chat endpoint scores each answer 1-10;
                 off unless KAKEHASHI_JUDGE_URL is set (KAKEHASHI_JUDGE_MODEL, KAKEHASHI_JUDGE_KEY optional)
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections import defaultdict
from pathlib import Path

import torch

JUDGE_PROMPT = (
    "次の質問に対する回答を、参照回答と比べて1から10の整数で採点してください。数字だけを答えてください。\n"
    "質問: {question}\n参照回答: {reference}\n回答: {answer}"
)


def rouge_l(candidate: str, reference: str) -> float:
    """Character-level ROUGE-L F1: 2PR / (P + R) over the longest common subsequence of characters."""
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


def first_turn(meta: dict, images: list) -> tuple[str, list, str]:
    """(prompt without placeholders, the images it shows, stripped reference) of a VQA sample's first turn."""
    from data_pipelines.templates import conversation_turns

    question, reference = conversation_turns(meta["conversations"])[0]
    return question.replace("<image>", "").strip(), images[: question.count("<image>")], reference.strip()


def judge_score(question: str, reference: str, answer: str, url: str) -> float | None:
    """Ask an OpenAI-compatible /chat/completions endpoint for a 1-10 score; None when it gives no number."""
    body = {
        "model": os.environ.get("KAKEHASHI_JUDGE_MODEL", "judge"),
        "messages": [{"role": "user", "content": JUDGE_PROMPT.format(question=question, reference=reference, answer=answer)}],
        "temperature": 0,
    }
    headers = {"Content-Type": "application/json"}
    if os.environ.get("KAKEHASHI_JUDGE_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['KAKEHASHI_JUDGE_KEY']}"
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        text = json.load(response)["choices"][0]["message"]["content"]
    digits = "".join(ch for ch in text.strip() if ch.isdigit())
    return float(digits) if digits and 1 <= int(digits) <= 10 else None


def _samples(patterns: list[str]):
    from data_pipelines.shard_reader import iter_raw_samples
    from data_pipelines.shards import expand_shard_patterns

    for shard in expand_shard_patterns(patterns):
        for raw in iter_raw_samples(shard):
            yield Path(shard).name, raw


@torch.no_grad()
def evaluate(model_dir, patterns: list[str], template: str, max_samples: int = 200, max_new_tokens: int = 32) -> dict:
    from data_pipelines.samples import BadSample, prepare_sample
    from data_pipelines.tokenize import encode
    from train.chat import answer, load_export

    model, processor = load_export(model_dir)
    tokenizer = processor.tokenizer
    dynamic = hasattr(processor, "image_start_end")  # a Qwen2-VL encoder: token counts depend on each image
    if not dynamic:
        tokens_per_image = processor(images=[_blank()], text="<image>", return_tensors="pt")["input_ids"].eq(
            model.config.image_token_index).sum().item()
    judge_url = os.environ.get("KAKEHASHI_JUDGE_URL")
    loss_sum, loss_count = defaultdict(float), defaultdict(int)
    generation = {"samples": 0, "exact_match": 0.0, "rouge_l": 0.0, "judge": []}
    bad, seen = 0, 0
    for shard, raw in _samples(patterns):
        if seen >= max_samples:
            break
        try:
            prepared = prepare_sample(raw, task=None, template=template, eos_token=tokenizer.eos_token, tokenizer=tokenizer)
        except BadSample:
            bad += 1
            continue
        seen += 1
        source = (raw.meta or {}).get("source") or shard.rsplit("-", 1)[0]
        images = processor.image_processor(images=prepared.images, return_tensors="pt") if prepared.images else {}
        if dynamic:  # as the training loader encodes it: per-image counts, start/end tokens around each image
            grid = images.get("image_grid_thw")
            counts = [] if grid is None else (grid.prod(-1) // processor.image_processor.merge_size ** 2).tolist()
            encoded = encode(prepared.segments, tokenizer, tokens_per_image=counts, max_length=4096,
                             image_start_end=processor.image_start_end)
        else:
            encoded = encode(prepared.segments, tokenizer, tokens_per_image=tokens_per_image, max_length=4096)
        input_ids = torch.tensor([encoded.input_ids])
        if dynamic:
            logits = model.logits(input_ids, torch.ones_like(input_ids), images.get("pixel_values"), images.get("image_grid_thw"))
        else:
            logits = model(input_ids=input_ids, pixel_values=images.get("pixel_values"),
                           attention_mask=torch.ones_like(input_ids)).logits
        labels = torch.tensor([encoded.labels])[:, 1:]
        loss_sum[source] += torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), labels[0], ignore_index=-100, reduction="sum").item()
        loss_count[source] += int((labels != -100).sum())

        if "conversations" in raw.meta:  # generation metrics on the first turn of each VQA sample
            prompt, images, reference = first_turn(raw.meta, prepared.images)
            said = answer(model, processor, images, prompt, max_new_tokens)
            generation["samples"] += 1
            generation["exact_match"] += exact_match(said, reference)
            generation["rouge_l"] += rouge_l(said, reference)
            if judge_url:
                generation["judge"].append(judge_score(prompt, reference, said, judge_url))
    n = max(generation["samples"], 1)
    scores = [s for s in generation["judge"] if s is not None]
    return {
        "samples": seen,
        "bad_samples": bad,
        "loss": sum(loss_sum.values()) / max(sum(loss_count.values()), 1),
        "loss_by_source": {s: loss_sum[s] / max(loss_count[s], 1) for s in loss_sum},
        "vqa_samples": generation["samples"],
        "exact_match": generation["exact_match"] / n,
        "rouge_l": generation["rouge_l"] / n,
        "judge": (sum(scores) / len(scores)) if scores else None,
    }


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64), (255, 255, 255))
