"""`kakehashi eval MODEL --data SHARD...`: validation loss per source, and generation metrics on VQA samples.

Generation metrics, as Japanese VLM benchmarks report them:
  exact match    the answer equals the reference after stripping whitespace and the EOS
  ROUGE-L        rouge_l_chars_f1: character-level LCS F1, 0-1 (Japanese has no spaces to split words on)
  judge          optional (Heron-Bench style): an OpenAI-compatible chat endpoint scores each answer 1-10;
                 off unless KAKEHASHI_JUDGE_URL is set (KAKEHASHI_JUDGE_MODEL, KAKEHASHI_JUDGE_KEY optional)
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from data_pipelines.image.images import decode_image
from train.benchmarks.metrics import exact_match, rouge_l_chars_f1


def first_turn(meta: dict, images: list) -> tuple[str, list, str]:
    """(prompt without placeholders, the images it shows, stripped reference) of a VQA sample's first turn."""
    from data_pipelines.render.templates import conversation_turns

    question, reference = conversation_turns(meta["conversations"])[0]
    return question.replace("<image>", "").strip(), images[: question.count("<image>")], reference.strip()


def _samples(patterns: list[str]):
    from data_pipelines.read.shard_reader import iter_raw_samples
    from data_pipelines.read.shards import expand_shard_patterns

    for shard in expand_shard_patterns(patterns):
        for raw in iter_raw_samples(shard):
            yield Path(shard).name, raw


def example_maker(family, model, processor, patterns: list[str], template: str, max_length: int = 4096):
    """raw sample -> Example, made by the training loader's own per-sample path for this export's family (a
    caption sample as a caption source, anything else as VQA). Raises BadSample."""
    from data_pipelines.batch.loader import MixtureLoader, SourceSpec
    from data_pipelines.render.samples import sample_task

    image_processor = processor.image_processor
    loader = MixtureLoader(
        [SourceSpec(patterns, 1.0, "caption", "caption"), SourceSpec(patterns, 1.0, "vqa", "vqa")],
        tokenizer=processor.tokenizer, template=template, max_length=max_length, micro_batch_size=1, seed=0,
        num_workers=0, image_mean=tuple(image_processor.image_mean), image_std=tuple(image_processor.image_std),
        **family.image_inputs(model.config, processor))
    return lambda raw: loader.build_example(raw, 0 if sample_task(raw.meta or {}) == "caption" else 1)


@torch.no_grad()
def evaluate(model_dir, patterns: list[str], template: str, max_samples: int = 200, max_new_tokens: int = 32) -> dict:
    from data_pipelines.batch.collate import collate, model_inputs
    from data_pipelines.render.samples import BadSample
    from train.benchmarks.generate import answer
    from train.benchmarks.judge import Judge, reference_score_1_10
    from train.models import family_of_export

    family = family_of_export(model_dir)
    model, processor = family.load_export(model_dir)
    forward, make_example = family.training_module(model), example_maker(family, model, processor, patterns, template)
    image_processor, pad = processor.image_processor, processor.tokenizer.pad_token_id
    judge = Judge.from_env()
    loss_sum, loss_count = defaultdict(float), defaultdict(int)
    generation = {"samples": 0, "exact_match": 0.0, "rouge_l_chars_f1": 0.0, "judge": []}
    bad, seen = 0, 0
    for shard, raw in _samples(patterns):
        if seen >= max_samples:
            break
        try:
            example = make_example(raw)
        except BadSample:
            bad += 1
            continue
        seen += 1
        source = (raw.meta or {}).get("source") or shard.rsplit("-", 1)[0]
        inputs = model_inputs(collate([example], pad), model.device, image_processor.image_mean,
                              image_processor.image_std)
        sample_loss, targets = forward(**inputs)
        loss_sum[source] += sample_loss.item()
        loss_count[source] += int(targets)
        if "conversations" in raw.meta:  # generation metrics on the first turn of each VQA sample
            prompt, images, reference = first_turn(raw.meta, [decode_image(data) for data in raw.images])
            said = answer(model, processor, images, prompt, max_new_tokens)
            generation["samples"] += 1
            generation["exact_match"] += exact_match(said, reference)
            generation["rouge_l_chars_f1"] += rouge_l_chars_f1(said, reference)
            if judge is not None:
                generation["judge"].append(reference_score_1_10(judge, prompt, reference, said))
    return _report(seen, bad, loss_sum, loss_count, generation)


def _report(seen: int, bad: int, loss_sum: dict, loss_count: dict, generation: dict) -> dict:
    n = max(generation["samples"], 1)
    scores = [s for s in generation["judge"] if s is not None]
    return {
        "samples": seen,
        "bad_samples": bad,
        "loss": sum(loss_sum.values()) / max(sum(loss_count.values()), 1),
        "loss_by_source": {s: loss_sum[s] / max(loss_count[s], 1) for s in loss_sum},
        "vqa_samples": generation["samples"],
        "exact_match": generation["exact_match"] / n,
        "rouge_l_chars_f1": generation["rouge_l_chars_f1"] / n,
        "judge": (sum(scores) / len(scores)) if scores else None,
    }
