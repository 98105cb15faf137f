"""Batched greedy generation for benchmarks, on any family's export (or the model a stage is training).

Each request is asked as eval-mm's model adapters ask (e.g. examples/runtimes/transformers/llava_1_5.py): one user
turn of the images first and then the text, through the export's own chat template, with the generation prompt.
Requests are left-padded into batches; generation is greedy (do_sample off, one beam), stops at the tokenizer's EOS
or at the template's stop strings (Sarashina's "\\n###", as eval-mm's sarashina2_vision adapter), and the answer is
the decoded new tokens (special tokens skipped) up to the first stop string, stripped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipelines.render.tokenize import pad_token_id
from train.benchmarks.data import ImageRef

STOP_STRINGS = {"sarashina": ("\n###",)}  # template -> where an answer ends besides EOS
DEFAULT_MAX_NEW_TOKENS = 256               # eval_mm/cli.py --max_new_tokens
DEFAULT_BATCH_SIZE = 8


@dataclass
class GenerationSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    template: str | None = None
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def for_template(cls, template: str | None, **overrides) -> GenerationSettings:
        return cls(template=template, stop_strings=STOP_STRINGS.get(template or "", ()), **overrides)

    @classmethod
    def for_export(cls, model_dir: Path | str, **overrides) -> GenerationSettings:
        """The settings for an export: its template (kakehashi.json; none for a foreign export) and its stops."""
        info = Path(model_dir, "kakehashi.json")
        template = json.loads(info.read_text())["template"] if info.is_file() else None
        return cls.for_template(template, **overrides)

    def record(self) -> dict:
        """What the output says of how the answers were generated."""
        return {"do_sample": False, "num_beams": 1, "temperature": 0.0, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "stop_strings": list(self.stop_strings), "template": self.template,
                "chat_template": "the export's own (processor.apply_chat_template)", "padding_side": "left"}


def chat_prompt(processor, image_count: int, text: str) -> str:
    content = [{"type": "image"} for _ in range(image_count)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def cut_at_stops(text: str, stop_strings: tuple[str, ...]) -> str:
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text.strip()


@torch.no_grad()
def generate_answers(model, processor, requests: list[tuple[list, str]], settings: GenerationSettings,
                     **generate) -> list[str]:
    """The answer to each (images, text) request, in order, `settings.batch_size` at a time.

    `images`: PIL images or objects with `load()` (train/benchmarks/data.py ImageRef). `generate`: extra
    `model.generate` arguments (periodic eval passes synced_gpus under ZeRO-3)."""
    tokenizer = processor.tokenizer
    pad = pad_token_id(tokenizer)
    stops = {"stop_strings": list(settings.stop_strings), "tokenizer": tokenizer} if settings.stop_strings else {}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens start at the same column in each row
    answers: list[str] = []
    try:
        for start in range(0, len(requests), settings.batch_size):
            batch = requests[start:start + settings.batch_size]
            images = [image.load() if isinstance(image, ImageRef) else image for shown, _ in batch for image in shown]
            texts = [chat_prompt(processor, len(shown), text) for shown, text in batch]
            inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True).to(model.device)
            output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **stops, **generate)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers += [cut_at_stops(tokenizer.decode(row, skip_special_tokens=True), settings.stop_strings)
                        for row in new_tokens]
    finally:
        tokenizer.padding_side = side
    return answers


def answer(model, processor, images: list, prompt: str, max_new_tokens: int = 32, **generate) -> str:
    """Greedy answer to one user turn, the images first (as in training data), then the prompt: generate_answers
    for one request (`chat`, `shapes-eval`, `eval --data` and periodic eval all answer through it)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=1)
    return generate_answers(model, processor, [(images, prompt)], settings, **generate)[0]
