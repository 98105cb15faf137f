"""Where a command's output goes: its result on stdout, everything else on stderr (every kakehashi command, data and
train alike).

A command's result (the JSON document with `--json`, its table or summary line without) is written with
`result()` / `result_json()`. Everything else, progress, freeze tables, logs, and what third-party code prints
(DeepSpeed's op builds run compilers whose output goes straight to file descriptor 1), goes to stderr: while a
command runs, file descriptor 1 points at stderr and only the result stream writes to the real stdout. So
`kakehashi ... --json | jq` always reads exactly one document.

Logs carry a timestamp, and the rank when a run has several.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Iterator, TextIO

_results: TextIO | None = None  # the real stdout while a command runs
NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "huggingface_hub", "httpx", "urllib3")


@contextlib.contextmanager
def results_on_stdout() -> Iterator[TextIO]:
    """Reserve stdout for the command's result while the block runs; anything else written to it goes to stderr.

    In a real process that is done at the file-descriptor level (child processes and C code included). Where
    sys.stdout is not the process's own (pytest's capture, an embedding program), only `print` is redirected.
    """
    global _results
    original = stdout = sys.stdout
    stdout.flush()
    saved_fd = os.dup(1) if stdout is sys.__stdout__ and _fileno(stdout) == 1 else None
    if saved_fd is not None:
        os.dup2(2, 1)
        stdout = open(saved_fd, "w", encoding="utf-8", closefd=False)
    previous, _results, sys.stdout = _results, stdout, sys.stderr
    try:
        yield stdout
    finally:
        stdout.flush()
        original.flush()
        sys.stdout, _results = original, previous
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def result(text: str, end: str = "\n") -> None:
    """Write (part of) the command's result."""
    print(text, end=end, file=_results or sys.stdout, flush=True)


def result_json(document) -> None:
    """Write the command's result as one JSON document."""
    result(json.dumps(document, ensure_ascii=False))


def configure_logging() -> None:
    """Logs to stderr with a timestamp; rank 0 at INFO, other ranks WARNING, each line naming its rank when the run
    has several. Third-party loggers are kept at WARNING."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    where = f" [rank {rank}/{world_size}]" if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s{where} %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    if "transformers" in sys.modules:  # imported already: the variable is read no more (not imported for it: 0.5 s)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
