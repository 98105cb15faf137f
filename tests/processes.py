"""Subprocesses that tests wait for on their progress, not on a wall clock.

A training on a loaded 2-core machine may take many times its quiet duration, so a fixed timeout either fails a
healthy run or waits far too long on a hung one. Every command these tests run (training, torchrun, the bench) logs
as it goes: a wait here ends when the processes exit, and gives up only when none of them has written a byte for
STALL_S seconds, killing their whole process groups (torchrun's workers too) and failing with what they printed."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

STALL_S = 600.0  # silence that counts as a hang: far above any quiet stretch of a run (a DeepSpeed op build, export)
# after the process exits (and its group is killed): how long the pipes may stay held before its tagged descendants
# outside the group are swept. Such a descendant is an orphan with nothing more to say (a killed torchrun worker's
# data-loader forkserver and workers, which otherwise live on: every kill -9 of a rank cost the full wait); the
# readers then finish reading after the sweep, so no output is lost to a short grace
ORPHAN_GRACE_S = 3.0
TAG = "KAKEHASHI_TEST_RUN"  # in every descendant's environment: found and ended even outside the process group


class Watched:
    """A process started in its own session, its stdout and stderr read by threads that note each write."""

    def __init__(self, command, *, cwd, env, merge_output: bool = False):
        self.tag = uuid.uuid4().hex
        self.process = subprocess.Popen(command, cwd=cwd, env={**env, TAG: self.tag}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                                        start_new_session=True)
        self.chunks = {"stdout": [], "stderr": []}
        self.last_output = time.monotonic()
        streams = [("stdout", self.process.stdout)] + ([] if merge_output else [("stderr", self.process.stderr)])
        self.readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                        for name, stream in streams]
        for reader in self.readers:
            reader.start()

    def _read(self, name, stream) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            self.chunks[name].append(chunk)
            self.last_output = time.monotonic()

    def text(self, name: str) -> str:
        return b"".join(self.chunks[name]).decode("utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL the process and its process group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def sweep(self) -> None:
        """SIGKILL every process with this run's tag in its environment: descendants that left the process group
        (a torchrun worker in a session of its own, a data loader's forkserver). Only for a run that hangs or
        leaves its pipes held: a Slurm job the run submitted carries the tag too, and must live on."""
        marker = f"{TAG}={self.tag}".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except OSError:
                pass

    def result(self) -> subprocess.CompletedProcess:
        self.process.wait()
        self.kill()  # anything it left in its group would hold the pipes open
        for reader in self.readers:
            reader.join(timeout=ORPHAN_GRACE_S)
        if any(reader.is_alive() for reader in self.readers):  # held by a descendant outside the group
            self.sweep()
            for reader in self.readers:
                reader.join(timeout=30)  # still held: what was read so far is the output
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, self.text("stdout"),
                                           self.text("stderr"))


def wait_all(watched: list[Watched], stall_s: float = STALL_S) -> list[subprocess.CompletedProcess]:
    """Wait until every process exits; fail (killing them all) once none has written anything for `stall_s`."""
    while any(w.process.poll() is None for w in watched):
        silent = time.monotonic() - max(w.last_output for w in watched)
        if silent > stall_s:
            for w in watched:
                w.kill()
                w.sweep()
            tails = "\n".join(f"--- {w.process.args}\n{(w.text('stdout') + w.text('stderr'))[-3000:]}"
                              for w in watched)
            raise AssertionError(f"no output for {silent:.0f} s: taken as a hang\n{tails}")
        time.sleep(0.5)
    return [w.result() for w in watched]


def run_watched(command, *, cwd, env, stall_s: float = STALL_S) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True), bounded by progress (see the module's doc)."""
    return wait_all([Watched(command, cwd=cwd, env=env)], stall_s)[0]
