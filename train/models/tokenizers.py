"""The recipe's tokenizer (with the image tokens added), and a stand-in of the LLM's vocabulary size
where the recipe's is not on this machine (benchmarks)."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer

from data_pipelines.render.templates import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from train.errors import TokenizerUnavailable
from train.models.configs import llm_config

log = logging.getLogger(__name__)


def token_of(directory: Path, token_id: int) -> str:
    """The token that a checkpoint's own tokenizer has at `token_id`."""
    return AutoTokenizer.from_pretrained(directory).convert_ids_to_tokens(token_id)


def load_tokenizer(spec, cache_dir: str | Path, offline: bool = False, stand_in: bool = False):
    """The recipe's tokenizer, with the image token (and image start/end tokens) added as special tokens if missing.

    A hub tokenizer that cannot be loaded (not on this machine and offline, unknown id) is TokenizerUnavailable,
    naming it; with `stand_in` (benchmarks: the shapes, not the text, matter) the hub is not asked at all and a
    tokenizer not on this machine is replaced by `stand_in_tokenizer`, which has the LLM's vocabulary size."""
    if spec.tokenizer.startswith("builtin:"):
        from data_pipelines.synthetic.tiny_tokenizer import load_or_build_tiny_tokenizer

        name = spec.tokenizer.removeprefix("builtin:")
        tokenizer = load_or_build_tiny_tokenizer(Path(cache_dir) / name, spec.tokenizer)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=spec.llm.trust_remote_code,
                                                      local_files_only=offline or stand_in)
        except (OSError, ValueError) as err:
            if not stand_in:
                raise TokenizerUnavailable(f"model.tokenizer: cannot load {spec.tokenizer} "
                                           f"({str(err).strip().splitlines()[0]})") from None
            tokenizer = stand_in_tokenizer(spec, cache_dir)
    missing = [t for t in (IMAGE_TOKEN, *(spec.image_start_end or ())) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out of the loss anyway
    return tokenizer


def stand_in_tokenizer(spec, cache_dir: str | Path):
    """builtin:tiny-ja padded to the LLM config's vocabulary size (with the image tokens kakehashi adds), so a
    model built for it has the real embedding and LM head shapes. `tokenizer.kakehashi_stand_in` is True."""
    from data_pipelines.synthetic.tiny_tokenizer import load_or_build_stand_in_tokenizer

    try:
        vocab_size = llm_config(spec, 0).vocab_size  # the config's own size (0: it gives none)
    except OSError as err:  # a hub config, offline
        raise TokenizerUnavailable(f"model.tokenizer: {spec.tokenizer} is not on this machine, nor model.llm's "
                                   f"config for a stand-in ({str(err).strip().splitlines()[0]})") from None
    if not vocab_size:
        raise TokenizerUnavailable(f"model.tokenizer: {spec.tokenizer} is not on this machine, and model.llm's "
                                   f"config gives no vocab_size for a stand-in of its size")
    specials = [IMAGE_TOKEN, *(spec.image_start_end or ())]
    tokenizer = load_or_build_stand_in_tokenizer(Path(cache_dir) / f"stand-in-{vocab_size}", vocab_size, specials)
    tokenizer.kakehashi_stand_in = True
    log.warning("model.tokenizer %s is not on this machine: a stand-in tokenizer of %d tokens (the LLM's "
                "vocabulary) takes its place; the shapes are real, the text's tokens are not", spec.tokenizer,
                len(tokenizer))
    return tokenizer


def is_stand_in(tokenizer) -> bool:
    """Whether `load_tokenizer` gave a stand-in for the recipe's tokenizer."""
    return getattr(tokenizer, "kakehashi_stand_in", False)


class ChatProcessor:
    """What the processors of kakehashi's families share (`tokenizer`, `image_token`, `image_start_end` set by
    each): the tokenizer's chat template, each <image> expanded to its image's tokens, and the texts tokenised into
    the BatchFeature transformers' processors return."""

    image_start_end: tuple[str, str] | None = None

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def expand(self, text: str, counts: list[int]) -> str:
        """`text` with each <image> replaced by its image's tokens (the next of `counts`, taken off the front),
        between the family's start and end tokens if it has them."""
        pieces = text.split(self.image_token)
        start, end = self.image_start_end or ("", "")
        taken = [counts.pop(0) for _ in pieces[1:]]
        return pieces[0] + "".join(start + self.image_token * n + end + p for n, p in zip(taken, pieces[1:]))

    def encoded(self, texts: list[str], one: bool, image_inputs: dict, return_tensors: str, padding: bool):
        """input_ids and attention_mask of the texts (of texts[0] alone when `one`), with the image inputs."""
        from transformers import BatchFeature

        encoded = self.tokenizer(texts[0] if one else texts, return_tensors=return_tensors, padding=padding)
        return BatchFeature({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                             **image_inputs})
