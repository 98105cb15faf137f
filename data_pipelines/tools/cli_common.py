"""What the `kakehashi data` / `bench data` command modules share: shard arguments and the tokenizer they render
with. Imports none of the command modules (commands, convert, verify, bench), so they can all import it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from data_pipelines.errors import UsageError
from data_pipelines.read.shards import expand_shard_patterns


def shard_paths(patterns: list[str]) -> list[str]:
    """The shards that paths, globs and {000000..000003} ranges name; UsageError when one names none."""
    try:
        return expand_shard_patterns(patterns)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None


def load_tokenizer(path: str | None):
    """The tokenizer in folder `path`, or the tiny one (cached under $KAKEHASHI_CACHE when set). It supplies eos
    and, for the chat template, apply_chat_template. UsageError when `path` is missing or holds no tokenizer."""
    if path is not None:
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise UsageError(f"tokenizer folder {path} does not exist")
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load tokenizer from {path}: {str(err).splitlines()[0]}") from None
    from data_pipelines.synthetic.tiny_tokenizer import build_tiny_tokenizer, load_or_build_tiny_tokenizer

    cache = os.environ.get("KAKEHASHI_CACHE")
    if cache:
        return load_or_build_tiny_tokenizer(Path(cache) / "tiny-ja")
    with tempfile.TemporaryDirectory() as tmp:
        return build_tiny_tokenizer(tmp)
