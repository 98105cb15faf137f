"""Answer a prompt about images from an export, through its family's own loader (plain transformers for LLaVA)."""

from __future__ import annotations

import torch

from train.models import family_of_export


def load_export(model_dir):
    """An export (any family's format) -> (model in eval mode, processor)."""
    return family_of_export(model_dir).load_export(model_dir)


@torch.no_grad()
def answer(model, processor, images: list, prompt: str, max_new_tokens: int = 32, **generate) -> str:
    """Greedy answer to one user turn: the images first (as in training data), then the prompt.

    `generate`: extra `model.generate` arguments (periodic eval passes synced_gpus under ZeRO-3).
    """
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
