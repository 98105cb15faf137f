"""Tiny Japanese tokenizers, trained offline in about a second on the templates and the synthetic texts.

builtin:tiny-ja is a byte-level BPE (tokenizers): any text encodes (no unknown characters) and decodes back
exactly. Frequent fixed phrases (the Asagi preamble, the questions) become single tokens, so the tiny model's
sequences stay short. builtin:tiny-ja-sp is a sentencepiece model (with byte fallback) behind transformers'
LlamaTokenizer, as Sarashina2's own tokenizer is: tools that read `tokenizer.model` (llama.cpp's converter) take it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from data_pipelines.render.templates import IMAGE_PLACEHOLDER, TEMPLATES, TurnFormat, generation_prompt
from data_pipelines.synthetic.synth import COLOURS, SHAPES, synth_texts

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]  # ids 0..4, in this order
VOCAB_SIZE = 512
JAPANESE_PUNCTUATION = "、。，．・：；？！「」『』（）［］【】〜ー…　"
FIXED_TEXT_REPEATS = 50  # weight of the template texts against the synthetic ones, so their merges are learned


def training_corpus() -> list[str]:
    """The texts the BPE merges are learned from, cut where `tokenize.encode` cuts (at images and special tokens)."""
    texts = synth_texts()
    prompts: list[str] = []
    for name, fmt in TEMPLATES.items():
        if not isinstance(fmt, TurnFormat):
            continue
        for text in texts:
            prompts.append(generation_prompt(text, name))
            prompts.append(fmt.user_prefix + text + fmt.assistant_prefix)
        prompts.append(fmt.turn_suffix)
    pieces = [piece for text in prompts + texts for piece in text.split(IMAGE_PLACEHOLDER)] * FIXED_TEXT_REPEATS
    pieces += [chr(code) for code in range(0x20, 0x7F)] + list(JAPANESE_PUNCTUATION)
    return [piece for piece in pieces if piece]


def build_tiny_tokenizer(save_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train the tokenizer, save it with `save_pretrained(save_dir)` and return it. Deterministic."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Colour and shape words stand alone, so answers are colour/shape tokens the model must pick from the image
    # rather than one token per whole sentence. ByteLevel without its regex only maps bytes to printable
    # characters, so nothing is lost and decoding is exact.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("|".join([*COLOURS, *SHAPES])), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    # BOS on plain `tokenizer(text)` calls (as at inference through a processor), matching tokenize.encode,
    # which adds it itself and tokenizes with add_special_tokens=False
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=[IMAGE_PLACEHOLDER], clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(save_dir))
    return fast


SENTENCEPIECE_VOCAB = 640  # 256 byte pieces (fallback) + the corpus's characters + merges
SENTENCEPIECE_SYMBOLS = [IMAGE_PLACEHOLDER, "<|vision_start|>", "<|vision_end|>"]  # always one piece each


def build_tiny_sentencepiece_tokenizer(save_dir: str | Path):
    """Train a sentencepiece BPE model into save_dir/tokenizer.model and save transformers' LlamaTokenizer for it
    beside (tokenizer.json); returns the tokenizer. Deterministic (one thread, fixed corpus)."""
    import sentencepiece
    from transformers import LlamaTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()), model_prefix=str(save_dir / "tokenizer"),
        vocab_size=SENTENCEPIECE_VOCAB, model_type="bpe", character_coverage=1.0, byte_fallback=True,
        user_defined_symbols=SENTENCEPIECE_SYMBOLS, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_by_whitespace=False, num_threads=1, minloglevel=2, max_sentence_length=4096)
    tokenizer = LlamaTokenizer.from_pretrained(str(save_dir), legacy=False, add_prefix_space=False,
                                               add_bos_token=True, pad_token="<pad>")
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_stand_in_tokenizer(save_dir: str | Path, vocab_size: int, specials: list[str]) -> PreTrainedTokenizerFast:
    """builtin:tiny-ja with its vocabulary padded to exactly `vocab_size` ids, `specials` (the image token, image
    start/end) among them: a stand-in for a tokenizer that is not on the machine, for benchmarks, whose embedding
    and LM head then have the real model's shapes. The filler tokens are never produced; texts encode as tiny-ja's."""
    import json

    tiny = build_tiny_tokenizer(save_dir)
    state = json.loads(tiny.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    extra = [token for token in specials if token not in vocab]
    fillers = vocab_size - len(vocab) - len(extra)
    if fillers < 0:
        raise ValueError(f"a stand-in tokenizer needs at least {len(vocab) + len(extra)} tokens, not {vocab_size}")
    for i in range(fillers):
        vocab[f"<|stand-in-{i}|>"] = len(vocab)
    for token in extra:  # special tokens of their own id, as load_tokenizer would add them to the real tokenizer
        vocab[token] = len(vocab)
        state["added_tokens"].append({"id": vocab[token], "content": token, "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens=[IMAGE_PLACEHOLDER, *extra], clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(save_dir))
    return fast


def load_or_build_stand_in_tokenizer(cache_dir: str | Path, vocab_size: int, specials: list[str]):
    """The stand-in saved in `cache_dir` (built there first if missing)."""
    cache = Path(cache_dir)
    if not (cache / "tokenizer.json").is_file():
        return build_stand_in_tokenizer(cache, vocab_size, specials)
    return PreTrainedTokenizerFast.from_pretrained(str(cache))


BUILDERS = {"builtin:tiny-ja": build_tiny_tokenizer, "builtin:tiny-ja-sp": build_tiny_sentencepiece_tokenizer}


def load_or_build_tiny_tokenizer(cache_dir: str | Path, name: str = "builtin:tiny-ja"):
    """The tokenizer saved in `cache_dir`, building it there first if missing (atomically, for parallel callers)."""
    cache = Path(cache_dir)
    if not (cache / "tokenizer.json").is_file():
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        BUILDERS[name](tmp)
        try:
            if cache.is_dir() and not any(cache.iterdir()):
                cache.rmdir()
            tmp.rename(cache)
        except OSError:  # another process finished first, or other files are in the way: keep them
            if not (cache / "tokenizer.json").is_file():
                shutil.copytree(tmp, cache, dirs_exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
    if name == "builtin:tiny-ja":
        return PreTrainedTokenizerFast.from_pretrained(str(cache))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cache))
