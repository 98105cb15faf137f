"""Prompt templates: sample JSON -> text segments marked as loss targets or not, and the matching Jinja chat template.

Captions always render with `plain` ("<image>\\n" then the caption); conversations with the recipe's template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from data_pipelines.render.chat_spans import chat_template_segments

IMAGE_PLACEHOLDER = "<image>"


class Segment(NamedTuple):
    text: str
    is_target: bool  # whether the model is trained to predict these tokens


@dataclass(frozen=True)
class TurnFormat:
    """Text around each turn: preamble + per turn (user_prefix + user + assistant_prefix + ANSWER+eos + turn_suffix)."""

    preamble: str = ""
    user_prefix: str = ""
    assistant_prefix: str = ""
    turn_suffix: str = ""


@dataclass(frozen=True)
class TokenizerChatTemplate:
    """Marker: render with the tokenizer's own `apply_chat_template`."""


ASAGI_PREAMBLE = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"

TEMPLATES: dict[str, TurnFormat | TokenizerChatTemplate] = {
    "asagi": TurnFormat(ASAGI_PREAMBLE, "\n\n### 指示:\n", "\n\n### 応答:\n"),  # Asagi (Japanese Alpaca style)
    "sarashina": TurnFormat("", "### Human: ", "\n### Assistant: ", "\n"),     # Sarashina-VL
    "plain": TurnFormat(),                                                     # no wrapping; captions use it
    "chat": TokenizerChatTemplate(),                                           # tokenizer.apply_chat_template
}


def template_format(template: str) -> TurnFormat | TokenizerChatTemplate:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}") from None


def conversation_turns(conversations) -> list[tuple[str, str]]:
    """(user, assistant) pairs; ValueError unless turns alternate user/assistant from user and end on assistant."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations must be a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise ValueError(f"turn {i} must be an object with a string content")
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.get("role") != expected:
            raise ValueError(f"turn {i} has role {turn.get('role')!r}, expected {expected!r}")
    if len(conversations) % 2:
        raise ValueError("conversation must end with an assistant turn")
    return [(conversations[i]["content"], conversations[i + 1]["content"]) for i in range(0, len(conversations), 2)]


def render(meta: dict, template: str, eos_token: str, tokenizer=None, *, num_images: int = 1) -> list[Segment]:
    """Segments whose concatenated text is the full training text; targets are each answer + eos.

    `num_images` is the number of `<image>` placeholders put before a caption (conversations carry their own).
    """
    fmt = template_format(template)
    if "caption" in meta and "conversations" not in meta:
        if not isinstance(meta["caption"], str) or not meta["caption"]:
            raise ValueError("caption must be a non-empty string")
        turns = [(f"{IMAGE_PLACEHOLDER}\n" * num_images, meta["caption"])]
        return merge_segments(_render_turns(turns, TEMPLATES["plain"], eos_token))
    if "conversations" not in meta or "caption" in meta:
        raise ValueError("sample must have exactly one of 'caption' and 'conversations'")
    turns = conversation_turns(meta["conversations"])
    if isinstance(fmt, TokenizerChatTemplate):
        if tokenizer is None:
            raise ValueError("the chat template needs a tokenizer")
        return merge_segments([Segment(text, target)
                               for text, target in chat_template_segments(turns, tokenizer, eos_token)])
    return merge_segments(_render_turns(turns, fmt, eos_token))


def _render_turns(turns: list[tuple[str, str]], fmt: TurnFormat, eos_token: str) -> list[Segment]:
    segments = [Segment(fmt.preamble, False)]
    for user, assistant in turns:
        segments += [
            Segment(fmt.user_prefix + user + fmt.assistant_prefix, False),
            Segment(assistant + eos_token, True),
            Segment(fmt.turn_suffix, False),
        ]
    return segments


def merge_segments(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if not segment.text:
            continue
        if merged and merged[-1].is_target == segment.is_target:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.is_target)
        else:
            merged.append(segment)
    return merged


def generation_prompt(user_text: str, template: str, tokenizer=None) -> str:
    """Inference prompt for one user turn: the rendered text up to where the answer starts."""
    fmt = template_format(template)
    if isinstance(fmt, TokenizerChatTemplate):
        if tokenizer is None:
            raise ValueError("the chat template needs a tokenizer")
        messages = [{"role": "user", "content": user_text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return fmt.preamble + fmt.user_prefix + user_text + fmt.assistant_prefix


def jinja_chat_template(template: str) -> str:
    """A Jinja chat template (HF `chat_template`) that renders exactly what `render` does for `template`.

    Message content may be a string or an HF content list: `{"type": "image"}` renders as "<image>\\n" and
    `{"type": "text", "text": ...}` as its text, so `[image, text "Q"]` equals the string "<image>\\nQ".
    """
    fmt = template_format(template)
    if isinstance(fmt, TokenizerChatTemplate):
        raise ValueError("the chat template is the tokenizer's own; there is nothing to generate")

    def literal(text: str) -> str:  # every fixed text goes through a string literal so newlines survive trimming
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    return (
        "{%- macro content(message) -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}" + literal(IMAGE_PLACEHOLDER + "\n") +
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        + literal(fmt.preamble) +
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}" + literal(fmt.user_prefix) + "{{ content(message) }}"
        "{%- if not loop.last -%}" + literal(fmt.assistant_prefix) + "{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{ content(message) }}{{ eos_token }}" + literal(fmt.turn_suffix) +
        "{%- else -%}{{ raise_exception('only user and assistant roles are supported') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages and messages[-1]['role'] == 'user' -%}"
        + literal(fmt.assistant_prefix) + "{%- endif -%}"
    )
