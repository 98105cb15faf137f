"""Run a function on several ranks of a real gloo process group, in fresh processes, and collect what each returns:
the distributed pieces (all-reduces, lockstep generation, the guarded optimizer, eval split over ranks) tested
directly, not only through whole trainings."""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import tempfile
import time
import traceback

HANG_S = 1800  # only a hang reaches this: a rank that ends without a result fails the wait at once


def _rank_main(fn, rank: int, world_size: int, store_file: str, args: tuple, results) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    try:
        # a file store, no port: two test workers side by side cannot pick the same one
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - hand the traceback to the test process
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn, *args, world_size: int = 2) -> list:
    """fn(rank, world_size, *args) on every rank (a module-level function: processes are spawned); returns the
    results in rank order, or fails with the traceback of the first rank that raised."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store_dir = tempfile.mkdtemp(prefix="kakehashi-ranks-")
    store_file = os.path.join(store_dir, "store")
    processes = [context.Process(target=_rank_main, args=(fn, rank, world_size, store_file, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected = {}
    try:
        started, dead = time.monotonic(), []
        while len(collected) < world_size:
            try:
                # after a rank is seen dead, one longer look: it may have put its result just before exiting
                rank, status, value = results.get(timeout=30 if dead else 1)
            except queue.Empty:
                if dead:  # a rank process that exited (killed, crashed in C) never puts a result: fail now
                    raise AssertionError(f"ranks {dead} ended without a result (exit codes "
                                         f"{[processes[r].exitcode for r in dead]})") from None
                dead = [r for r, p in enumerate(processes) if r not in collected and p.exitcode is not None]
                if time.monotonic() - started > HANG_S:
                    raise AssertionError(f"no result from every rank in {HANG_S} s: taken as a hang") from None
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            collected[rank], dead = value, []
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
        shutil.rmtree(store_dir, ignore_errors=True)
    return [collected[rank] for rank in range(world_size)]
