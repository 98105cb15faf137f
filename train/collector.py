"""Python's cyclic garbage collector in a kakehashi process (every command, the torchrun agent of train.launch).

Start-up imports torch, transformers and DeepSpeed: about 400,000 objects that live until exit. At the default
thresholds a full collection walks all of them whenever the younger generations have grown by a quarter, which
happens again and again while they are being imported (0.8 s of a training process's 4.6 s of imports on the 2-core
machine); at exit the interpreter walks them once more (1.1 s), to free nothing. So full collections come 10x less
often (young ones, where short-lived cycles die, as often as before), and at exit every object left is frozen out of
the final walk (atexit handlers and logging's flush still run). docs/performance.md: "Process start and exit".
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

FULL_COLLECTION_EVERY = 100  # young (generation-1) collections per full one; Python's default is 10


@contextlib.contextmanager
def for_a_process() -> Iterator[None]:
    """Around a process's whole main function."""
    gc.set_threshold(*gc.get_threshold()[:2], FULL_COLLECTION_EVERY)
    try:
        yield
    finally:
        gc.freeze()
