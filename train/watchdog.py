"""The stall watchdog: ends a rank whose stage makes no progress, instead of letting it wait for ever.

A thread per process watches the time since the last optimizer step completed. When a stage's `watchdog_s` passes
without one (the data loader, forward, backward, a collective, a checkpoint or eval in the hooks: whatever the main
thread is stuck in), it logs which stage, step and phase, writes all threads' Python stacks to stderr
(`faulthandler`: it reads them without the GIL-holding main thread's help), records the same in
OUTPUT/stalls/rankNNNNN.json, and ends the process with `os._exit(EXIT_STALLED)`: the main thread may be stuck in C
code (a collective, a lock), where no exception would reach it. The launcher then sees a failed worker and ends the
others (train/launch.py exits with the same code).

The main thread reports through module functions (`arm`, `phase`, `step_done`, `disarm`), which do nothing while no
watchdog runs (tests and benches that train a stage directly).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from train.errors import EXIT_STALLED

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the thread looks: the watchdog fires at most this late


class Watchdog(threading.Thread):
    def __init__(self, record_dir: Path, rank: int):
        super().__init__(name="kakehashi-watchdog", daemon=True)
        self.record_dir, self.rank = Path(record_dir), rank
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.stage, self.timeout_s, self.step, self.phase = "", 0, 0, ""
        self.since = time.monotonic()  # the last completed step, or arming

    def run(self) -> None:
        while not self.stopped.wait(POLL_S):
            with self.lock:
                stalled = self.timeout_s and time.monotonic() - self.since > self.timeout_s
                what = dict(stage=self.stage, step=self.step, phase=self.phase, watchdog_s=self.timeout_s,
                            seconds=round(time.monotonic() - self.since, 1))
            if stalled:
                self.fire(what)

    def fire(self, what: dict) -> None:
        log.error("stage %s: no optimizer step completed in %.0fs (watchdog_s %d); last completed step %d, then in "
                  "%s; all threads' stacks follow; exiting with code %d", what["stage"], what["seconds"],
                  what["watchdog_s"], what["step"], what["phase"], EXIT_STALLED)
        _flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:  # after the stacks: a stuck filesystem must not keep them from the log
            self.record_dir.mkdir(parents=True, exist_ok=True)
            record = {**what, "rank": self.rank, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (self.record_dir / f"rank{self.rank:05d}.json").write_text(json.dumps(record) + "\n")
        except OSError as err:
            log.error("could not record the stall in %s: %s", self.record_dir, err)
        _flush()
        kill_descendants()  # os._exit runs no cleanup: the loader's forkserver and workers would outlive the rank
        os._exit(EXIT_STALLED)


def kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs (the data loader's forkserver and its workers, which a
    forkserver start leaves outside this process's group), read from /proc; nothing where there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    todo, found = [os.getpid()], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


_current: Watchdog | None = None


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()


def start(record_dir: Path, rank: int) -> None:
    """Start this process's watchdog thread, unarmed."""
    global _current
    stop()
    _current = Watchdog(record_dir, rank)
    _current.start()


def stop() -> None:
    global _current
    if _current is not None:
        _current.stopped.set()
        _current = None


def _update(**fields) -> None:
    if _current is not None:
        with _current.lock:
            for key, value in fields.items():
                setattr(_current, key, value)


def arm(stage: str, timeout_s: int, step: int) -> None:
    """Watch a stage from `step` on (timeout 0: not at all); the clock starts now."""
    _update(stage=stage, timeout_s=timeout_s, step=step, phase="the first step", since=time.monotonic())


def phase(name: str) -> None:
    """What the stage does now (the stall record says it); the clock runs on."""
    _update(phase=name)


def step_done(step: int) -> None:
    """An optimizer step completed: the clock starts again."""
    _update(step=step, since=time.monotonic())


def where() -> str:
    """'stage instruct, after step 5, in the Checkpoints hook after step 5' ('' while no watchdog runs)."""
    if _current is None or not _current.stage:
        return ""
    with _current.lock:
        return f"stage {_current.stage}, after step {_current.step}, in {_current.phase}"


def disarm() -> None:
    _update(timeout_s=0)
