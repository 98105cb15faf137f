"""The tests' progress-bound wait (tests/processes.py): a run that exits is returned whole; one that falls silent is
killed with everything it started, and the wait fails saying so."""

import os
import sys
import time

import pytest

from tests.processes import run_watched


def test_a_process_that_exits_is_returned_with_both_streams():
    done = run_watched([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                       cwd=".", env=os.environ)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_a_silent_process_group_is_killed_and_the_wait_fails(tmp_path):
    # the child starts a grandchild in a session of its own (out of reach of the process group, as a torchrun worker's
    # forkserver can be), says so, then both wait forever without a word
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(3600)'], start_new_session=True); print(child.pid, flush=True); time.sleep(3600)")
    with pytest.raises(AssertionError, match="no output for .* taken as a hang") as failure:
        run_watched([sys.executable, "-c", script], cwd=".", env=os.environ, stall_s=2)
    grandchild = int(str(failure.value).split("\n")[2])  # the line it printed, in the failure's tail
    for _ in range(600):  # SIGKILL is delivered, not awaited: wait for the state, bounded
        if not alive(grandchild):
            break
        time.sleep(0.1)
    assert not alive(grandchild)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return False
