"""Every error a kakehashi command reports instead of a traceback, and its exit status.

Library code raises these and never exits; `train/cli.py` alone turns them into one message and `exit_code(err)`.
"""

from __future__ import annotations

from data_pipelines.errors import TooManyBadSamples, UsageError

EXIT_USAGE = 2        # a bad command line, recipe or path: nothing ran
EXIT_NONFINITE = 3    # too many non-finite steps in a row; no checkpoint of the bad state
EXIT_BAD_DATA = 4     # more bad samples than the stage's bad_sample_limit
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


class Preempted(Exception):
    """Raised once the checkpoint a stop was asked for (SIGTERM, SIGUSR1) is complete."""


EXIT_CODES: dict[type[BaseException], int] = {  # subclasses map like their base (RecipeError: usage)
    UsageError: EXIT_USAGE,
    FileNotFoundError: EXIT_USAGE,
    IsADirectoryError: EXIT_USAGE,
    NotADirectoryError: EXIT_USAGE,
    NonFiniteLimit: EXIT_NONFINITE,
    TooManyBadSamples: EXIT_BAD_DATA,
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
