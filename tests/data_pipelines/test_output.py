"""data_pipelines/output.py: a command's stdout holds its result only, whatever else writes to file descriptor 1."""

import subprocess
import sys

from tests.conftest import REPO

# what a command's libraries do while it runs: Python prints, a child process (DeepSpeed's JIT op build runs the
# compiler so), a write to file descriptor 1 from native code
NOISY_COMMAND = """
import os, subprocess, sys
from data_pipelines.output import result, results_on_stdout
with results_on_stdout():
    print("a print")
    subprocess.run(["echo", "a child process"], check=True)
    os.write(1, b"a write to descriptor 1\\n")
    result("the result")
print("after the command")
"""


def test_only_the_result_reaches_stdout_while_a_command_runs():
    done = subprocess.run([sys.executable, "-c", NOISY_COMMAND], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "the result\nafter the command\n"  # stdout is the process's own again afterwards
    assert done.stderr.splitlines() == ["a print", "a child process", "a write to descriptor 1"]
