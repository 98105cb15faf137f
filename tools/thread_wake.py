"""What torch's first multi-threaded op costs after the process sat idle, against the same op while it is busy.

    .venv/bin/python tools/thread_wake.py [--threads 2] [--idle-ms 20] [--repeats 30]

The op is the copy `normalize` starts with: a packed micro-batch's uint8 pixels (38 images of 32x32, channels last)
made contiguous, 117 KB, which torch splits across its threads. Before each timing the main thread either sleeps
(as it does while it waits on the loader) or runs small matmuls for as long. Prints the median of each, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def idle(seconds: float, busy: bool) -> None:
    if not busy:
        time.sleep(seconds)
        return
    end, x = time.perf_counter() + seconds, torch.randn(64, 64)
    while time.perf_counter() < end:
        x @ x


def first_op_ms(busy: bool, idle_ms: float, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        pixels = torch.empty(38, 32, 32, 3, dtype=torch.uint8).permute(0, 3, 1, 2)  # channels last, as the loader's
        idle(idle_ms / 1000, busy)
        began = time.perf_counter()
        pixels.contiguous()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--idle-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for busy in (False, True):
        state = "busy" if busy else "asleep"
        print(f"{args.threads} threads, {state} for {args.idle_ms:g} ms before: "
              f"{first_op_ms(busy, args.idle_ms, args.repeats):.3f} ms")


if __name__ == "__main__":
    main()
