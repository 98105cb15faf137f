"""`python -m train.launch [torchrun options] -m train RECIPE --output DIR`: torchrun that survives preemption signals.

The training workers checkpoint and exit on SIGUSR1 or SIGTERM (see train.preemption), but they can only do so if
the torchrun agent above them stays alive meanwhile. Slurm signals the agent (`--signal=USR1@N`, `scancel
--signal`, the time limit's SIGTERM), and, with most process trackers, every process of the step at once:

- an unhandled SIGUSR1 kills the agent (the default action), and Slurm then kills the step's remaining processes,
  workers included, in the middle of their checkpoint;
- torchrun's own SIGTERM handling (`--signals-to-handle`) shuts the workers down and gives up on them after a
  timeout; a second signal during that shutdown (srun forwarding the one the whole step already got) aborts the
  agent at once, with the same result.

So this agent takes SIGUSR1 and SIGTERM itself: it passes each on to its worker processes (which may get it twice;
they only set a flag) and keeps supervising them. The workers agree on a step, save a complete checkpoint, rank 0
requeues the Slurm job, and they exit 143; this agent then exits 143 too. Workers that stalled or lost a rank
(exit 6: train/watchdog.py, a failed collective) or ran out of disk space (5) make it exit with their code, not
torchrun's 1. Everything else is plain torchrun.
A signal that arrives before the workers have started (during rendezvous) is not passed on.
"""

from __future__ import annotations

import os
import signal
import sys

from train import collector
from train.errors import EXIT_DISK_FULL, EXIT_PREEMPTED, EXIT_STALLED

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_HANDLES = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's defaults less SIGTERM, which is forwarded instead
_received: list[int] = []


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent`, from /proc (the torchrun agent's workers are its direct children)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdecimal():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


def _forward(signum, frame) -> None:
    _received.append(signum)
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    for signum in FORWARDED:
        signal.signal(signum, _forward)
    try:
        torchrun(["--signals-to-handle", TORCHRUN_HANDLES, *argv])
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if EXIT_PREEMPTED in codes:  # the workers were asked to stop, and saved a checkpoint first
            names = ", ".join(sorted({signal.Signals(s).name for s in _received})) or "none here"
            print(f"train.launch: workers stopped after a checkpoint (exit codes {codes}; signals to this agent: "
                  f"{names})", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        for code, what in ((EXIT_DISK_FULL, "ran out of disk space"), (EXIT_STALLED, "stalled or lost a rank")):
            if code in codes:  # the workers' own exit code, not torchrun's 1: the same in the job's status
                print(f"train.launch: the workers {what} (exit codes {codes}); run the same command again to "
                      f"resume from the last complete checkpoint", file=sys.stderr, flush=True)
                return code
        raise
    return 0


if __name__ == "__main__":
    with collector.for_a_process():  # the agent imports torch too (0.36 s of collections at its exit)
        sys.exit(main(sys.argv[1:]))
