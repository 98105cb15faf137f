"""Every error a kakehashi command reports instead of a traceback, and its exit status.

Library code raises these and never exits; `train/cli.py` alone turns them into one message and `exit_code(err)`.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from data_pipelines.errors import TooManyBadSamples, UsageError

EXIT_USAGE = 2        # a bad command line, recipe or path: nothing ran
EXIT_NONFINITE = 3    # too many non-finite steps in a row; no checkpoint of the bad state
EXIT_BAD_DATA = 4     # more bad samples than the stage's bad_sample_limit
EXIT_DISK_FULL = 5    # a checkpoint or stage directory ran out of space; the previous complete state is untouched
EXIT_STALLED = 6      # no optimizer step within watchdog_s, or a collective failed or timed out (a lost rank)
EXIT_PREEMPTED = 143  # stopped on SIGTERM / SIGUSR1 after a checkpoint (128 + SIGTERM, as a killed process)


class RecipeError(UsageError):
    """A recipe that cannot run. `problems` lists every problem as 'field.path: message'."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self) -> str:
        return "\n".join([f"{self.source}: {len(self.problems)} problem(s)", *(f"  {p}" for p in self.problems)])


class TokenizerUnavailable(UsageError):
    """The recipe's tokenizer is neither a builtin, nor a local directory, nor loadable (offline, unknown hub id)."""


class UnsafeCheckpoint(UsageError):
    """A checkpoint file that cannot be loaded without running arbitrary code."""


class NonFiniteLimit(Exception):
    """Too many optimizer steps in a row had a non-finite loss or gradient; the run stops without a checkpoint."""


class DiskFull(Exception):
    """A write that ran out of space; what it had written is removed, what was complete before is untouched."""


class CollectiveFailed(Exception):
    """A collective that failed or timed out: another rank died, stopped or is stuck (the lost-rank case)."""


def free_space(path: Path) -> str:
    """'1.2 MiB free of 20.0 MiB' on the filesystem holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return ""


def is_disk_full(error: BaseException, path: Path) -> bool:
    """Whether a failed write into `path` ran out of space. OSError says so (ENOSPC, EDQUOT) and safetensors names
    it, but torch.save's zip writer only reports 'unexpected pos' or 'file write failed' (no errno): such a writer
    error counts as disk full when the filesystem has under 1% (or 1 MiB) free."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        path = Path(path)
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = shutil.disk_usage(path)
        return usage.free < max(usage.total // 100, 1 << 20)
    return False


class Preempted(Exception):
    """Raised once the checkpoint a stop was asked for (SIGTERM, SIGUSR1) is complete."""


EXIT_CODES: dict[type[BaseException], int] = {  # subclasses map like their base (RecipeError: usage)
    UsageError: EXIT_USAGE,
    FileNotFoundError: EXIT_USAGE,
    IsADirectoryError: EXIT_USAGE,
    NotADirectoryError: EXIT_USAGE,
    NonFiniteLimit: EXIT_NONFINITE,
    TooManyBadSamples: EXIT_BAD_DATA,
    DiskFull: EXIT_DISK_FULL,
    CollectiveFailed: EXIT_STALLED,
    Preempted: EXIT_PREEMPTED,
}


def exit_code(error: BaseException) -> int | None:
    """The exit status for an error a command reports, or None for a bug (which keeps its traceback)."""
    return next((code for kind, code in EXIT_CODES.items() if isinstance(error, kind)), None)


def message(error: BaseException) -> str:
    """What the CLI prints for `error` after `kakehashi: `."""
    if isinstance(error, RecipeError):
        return "error: " + error.report()
    return str(error) if isinstance(error, Preempted) else f"error: {error}"
