"""Loss targets for a tokenizer's own chat template, found by rendering the conversation incrementally.

For each turn the template is rendered twice: the conversation so far plus the user turn with
`add_generation_prompt=True` (the prompt), then with the answer added. The answer's rendering is the text between
the two; inside it the answer content (plus eos, when the template writes it right after) is the target, and any
wrapping the template adds (role headers, end-of-turn newlines) is not. This needs a prefix-stable template:
rendering more turns must only append text. Templates that rewrite earlier turns raise ValueError.
"""

from __future__ import annotations


def chat_template_segments(turns: list[tuple[str, str]], tokenizer, eos_token: str) -> list[tuple[str, bool]]:
    """(text, is_target) pieces whose concatenation is `apply_chat_template` of the whole conversation."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("template 'chat' needs a tokenizer with a chat_template")
    messages: list[dict] = []
    segments: list[tuple[str, bool]] = []
    rendered = ""  # the text already split into segments
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        prompt = _apply(tokenizer, messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": assistant})
        full = _apply(tokenizer, messages, add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError("chat template is not prefix-stable (adding a turn changes earlier text)")
        reply = full[len(prompt):]
        start = reply.find(assistant)
        if start < 0:
            raise ValueError("chat template does not render the assistant text verbatim")
        end = start + len(assistant)
        if eos_token and reply.startswith(eos_token, end):
            end += len(eos_token)
        segments += [(prompt[len(rendered):], False), (reply[:start], False), (reply[start:end], True),
                     (reply[end:], False)]
        rendered = full
    return segments


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
