"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint and a clean exit at the next step boundary.

The signal only sets a flag; the engine all-reduces it at each step boundary so every rank stops at the same step,
saves a complete checkpoint, and exits. Under Slurm the job then requeues itself and resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)

_requested: list[int] = []


def install_handlers() -> None:
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, _request_stop)


def _request_stop(signum, frame) -> None:
    _requested.append(signum)


def stop_requested() -> bool:
    return bool(_requested)


def slurm_job_id() -> str | None:
    """The id to requeue: an array task as ARRAYJOB_TASK, a plain job as its id; None outside Slurm."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue() -> bool:
    """Ask Slurm to requeue this job (rank 0 only). Returns whether it was accepted."""
    job = slurm_job_id()
    if job is None:
        return False
    # Logged before the call: the requeue signals this job's steps at once, and in a CI run under load a line
    # written after the call was missing from the requeued job's log.
    log.info("requeueing Slurm job %s; it resumes from the checkpoint just saved", job)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    return True
