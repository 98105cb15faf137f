"""The rendezvous port: free now and below the kernel's ephemeral range, so nothing else is handed it meanwhile."""

import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from train import ports


def test_the_port_is_free_and_below_the_ephemeral_range():
    port = ports.stable_free_port(35)
    assert ports.FIRST_USABLE <= port < ports.ephemeral_low()
    with socket.socket() as listener:
        listener.bind(("", port))  # still free: nothing was left holding it


def test_a_port_in_use_is_passed_over_for_the_next_one():
    taken = ports.stable_free_port(1234)
    with socket.socket() as listener:
        listener.bind(("", taken))
        listener.listen()
        again = ports.stable_free_port(1234)
    assert again != taken
    assert taken < again < ports.ephemeral_low() or ports.FIRST_USABLE <= again < taken  # searched on, then wrapped


def test_the_search_ends_with_none_when_every_port_below_the_range_is_taken(tmp_path, monkeypatch):
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("1026\t60999\n")  # leaves 1024 and 1025 below the range
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", range_file)
    held = []
    try:
        for port in (1024, 1025):
            sock = socket.socket()
            held.append(sock)
            try:
                sock.bind(("", port))
            except OSError:  # not root, or in use: taken either way
                pass
        assert ports.stable_free_port(7) is None
    finally:
        for sock in held:
            sock.close()


def test_the_command_prints_the_port_the_batch_script_uses():
    result = subprocess.run([sys.executable, "-m", "train.ports", "35"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ports.FIRST_USABLE <= int(result.stdout) < ports.ephemeral_low()


@pytest.mark.parametrize("argv", [["abc"], [], ["-3"], ["1", "2"], ["²"]])
def test_the_command_refuses_a_seed_that_is_not_a_number_in_one_line(argv):
    result = subprocess.run([sys.executable, "-m", "train.ports", *argv], cwd=REPO, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("usage: python -m train.ports SEED") and len(result.stderr.splitlines()) == 1
