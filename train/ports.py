"""A port to listen on that no other process on this host can be handed in the meantime.

`bind(("", 0))` returns an ephemeral port and frees it again when the probe closes. Until the real listener binds it,
the kernel may give that same port to anything else: an outgoing connection, or a listener that asks for port 0
(srun does). An agent then connects to the wrong socket and waits for ever. Ports below the kernel's ephemeral range
are never handed out that way: one free there now stays free for whoever was told to take it, unless another process
makes this same search meanwhile (the seed starts them far apart). Where one process both picks and listens, binding
port 0 itself is better still (train/distributed.py's world of one); this is for a port others must be told first.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FIRST_USABLE = 1024  # below: privileged ports
LOWEST_START = 10000  # the search starts above the ports well-known services listen on


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 when the file is not there: Linux's default)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def stable_free_port(seed: int, host: str = "") -> int | None:
    """A port free on `host` now and below the ephemeral range, or None if there is none. The search starts at a
    point `seed` picks (a Slurm job id, a process id), so callers sharing a host start apart, and counts up."""
    low = ephemeral_low()
    base = max(FIRST_USABLE, min(LOWEST_START, low - 1))
    # Knuth's multiplicative hash: consecutive seeds (job ids, process ids) start far apart, not one port apart,
    # where the first would take the second's port while the second has picked it but not yet bound it
    start = base + seed * 2654435761 % max(1, low - base)
    for port in [*range(start, low), *range(FIRST_USABLE, min(start, low))]:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return port
    return None


def main(argv: list[str]) -> int:
    """`python -m train.ports SEED`: print the port (slurm/train.sbatch's rendezvous). Exit 2 on a bad SEED, 1 when
    every port below the ephemeral range is taken; one line on stderr either way."""
    if len(argv) != 1 or not argv[0].isdecimal():
        print(f"usage: python -m train.ports SEED (a non-negative integer such as a job id), got {argv!r}",
              file=sys.stderr)
        return 2
    port = stable_free_port(int(argv[0]))
    if port is None:
        print(f"train.ports: no free port between {FIRST_USABLE} and {ephemeral_low()}", file=sys.stderr)
        return 1
    print(port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
