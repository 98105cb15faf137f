import re
import subprocess
import sys

from tests.conftest import REPO


def test_thread_wake_times_the_first_op_asleep_and_busy():
    done = subprocess.run([sys.executable, "tools/thread_wake.py", "--threads", "2", "--idle-ms", "1", "--repeats", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [re.sub(r"[\d.]+ ms$", "X", line) for line in lines] == [
        "2 threads, asleep for 1 ms before: X", "2 threads, busy for 1 ms before: X"]
    assert all(float(line.split(": ")[1].removesuffix(" ms")) > 0 for line in lines)
