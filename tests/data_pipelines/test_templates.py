import pytest

from data_pipelines.render.templates import Segment, generation_prompt, jinja_chat_template, render

TWO_TURNS = {
    "conversations": [
        {"role": "user", "content": "<image>\nこの図形は何色ですか？"},
        {"role": "assistant", "content": "赤色です。"},
        {"role": "user", "content": "この図形は何ですか？"},
        {"role": "assistant", "content": "円です。"},
    ],
    "source": "ignored",
}

ASAGI_GOLDEN = (
    "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
    "### 指示:\n<image>\nこの図形は何色ですか？\n\n### 応答:\n赤色です。</s>"
    "\n\n### 指示:\nこの図形は何ですか？\n\n### 応答:\n円です。</s>"
)
SARASHINA_GOLDEN = (
    "### Human: <image>\nこの図形は何色ですか？\n### Assistant: 赤色です。</s>\n"
    "### Human: この図形は何ですか？\n### Assistant: 円です。</s>\n"
)


def text(segments):
    return "".join(segment.text for segment in segments)


@pytest.mark.parametrize("template,golden", [("asagi", ASAGI_GOLDEN), ("sarashina", SARASHINA_GOLDEN)])
def test_golden_rendering_and_targets(template, golden):
    segments = render(TWO_TURNS, template, "</s>")
    assert text(segments) == golden
    assert [s.text for s in segments if s.is_target] == ["赤色です。</s>", "円です。</s>"]
    assert all(a.is_target != b.is_target for a, b in zip(segments, segments[1:]))  # adjacent ones merged


def test_captions_always_render_plain():
    for template in ("asagi", "sarashina", "plain"):
        assert render({"caption": "赤色の円。"}, template, "</s>") == [
            Segment("<image>\n", False), Segment("赤色の円。</s>", True)]
    assert text(render({"caption": "c"}, "asagi", "</s>", num_images=2)) == "<image>\n<image>\nc</s>"


@pytest.mark.parametrize("conversations", [
    [],
    [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "q"}],
    [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    "not a list",
])
def test_malformed_conversations_raise(conversations):
    with pytest.raises(ValueError):
        render({"conversations": conversations}, "asagi", "</s>")


def test_meta_needs_exactly_one_kind_and_known_template():
    with pytest.raises(ValueError):
        render({"source": "x"}, "asagi", "</s>")
    with pytest.raises(ValueError):
        render({"caption": "c", "conversations": TWO_TURNS["conversations"]}, "asagi", "</s>")
    with pytest.raises(ValueError, match="unknown template"):
        render(TWO_TURNS, "alpaca", "</s>")


def test_generation_prompts():
    assert generation_prompt("質問", "asagi") == (
        "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n質問\n\n### 応答:\n")
    assert generation_prompt("質問", "sarashina") == "### Human: 質問\n### Assistant: "
    assert generation_prompt("<image>\n", "plain") == "<image>\n"


def as_list_content(conversations):
    """HF processor style: the leading <image> placeholder as an image item."""
    out = []
    for turn in conversations:
        content = turn["content"]
        if content.startswith("<image>\n"):
            content = [{"type": "image"}, {"type": "text", "text": content[len("<image>\n"):]}]
        out.append({"role": turn["role"], "content": content})
    return out


@pytest.mark.parametrize("template", ["asagi", "sarashina", "plain"])
def test_jinja_template_matches_render(tiny_tokenizer, template):
    tokenizer = tiny_tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = jinja_chat_template(template)
    try:
        for messages in (TWO_TURNS["conversations"], as_list_content(TWO_TURNS["conversations"])):
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
            assert rendered == text(render(TWO_TURNS, template, tokenizer.eos_token))
            prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            assert prompt == generation_prompt("<image>\nこの図形は何色ですか？", template)
        caption = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "赤色の円。"}]
        if template == "plain":
            assert tokenizer.apply_chat_template(caption, tokenize=False) == text(
                render({"caption": "赤色の円。"}, "plain", "</s>"))
    finally:
        tokenizer.chat_template = saved


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_targets_only_answers_and_eos(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = CHATML
    try:
        segments = render(TWO_TURNS, "chat", tokenizer.eos_token, tokenizer)
        assert text(segments) == tokenizer.apply_chat_template(TWO_TURNS["conversations"], tokenize=False)
        assert [s.text for s in segments if s.is_target] == ["赤色です。</s>", "円です。</s>"]
        assert segments[0] == Segment("<|im_start|>user\n<image>\nこの図形は何色ですか？<|im_end|>\n"
                                      "<|im_start|>assistant\n", False)
        assert generation_prompt("q", "chat", tokenizer) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    finally:
        tokenizer.chat_template = saved
    with pytest.raises(ValueError):
        render(TWO_TURNS, "chat", "</s>")  # no tokenizer
