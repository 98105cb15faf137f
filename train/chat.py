"""Answer a prompt about images from an export, with plain transformers."""

from __future__ import annotations

import torch


def load_export(model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from train import qwen2vl

    if qwen2vl.is_export(model_dir):  # our format (Qwen2-VL vision encoder): see README "Qwen2-VL encoder exports"
        return qwen2vl.load_export(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    model.eval()
    return model, AutoProcessor.from_pretrained(model_dir)


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
