"""Fault injection for the reliability tests, driven by environment variables (inert when they are unset).

KAKEHASHI_FAULT_NAN="RANK:STEP,STEP"      that rank's loss is NaN at those optimizer steps of every stage
KAKEHASHI_FAULT_KILL="POINT:STAGE:STEP"   SIGKILL this process (every rank) at POINT of that step:
                                          after_step (step done, no checkpoint yet) | in_save (checkpoint files
                                          written, not yet renamed into place)
KAKEHASHI_FAULT_STOP="RANK:STAGE:STEP"    SIGSTOP that rank after that step: a rank that hangs, without dying
"""

from __future__ import annotations

import os
import signal


def nan_steps(rank: int) -> set[int]:
    spec = os.environ.get("KAKEHASHI_FAULT_NAN", "")
    target, _, steps = spec.partition(":")
    return {int(s) for s in steps.split(",") if s} if spec and int(target) == rank else set()


def maybe_kill(point: str, stage: str, step: int) -> None:
    spec = os.environ.get("KAKEHASHI_FAULT_KILL", "")
    if spec and spec.split(":") == [point, stage, str(step)]:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_stop(rank: int, stage: str, step: int) -> None:
    spec = os.environ.get("KAKEHASHI_FAULT_STOP", "")
    if spec and spec.split(":") == [str(rank), stage, str(step)]:
        os.kill(os.getpid(), signal.SIGSTOP)
