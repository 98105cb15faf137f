"""Process-group set-up shared by `kakehashi train` (one process) and `torchrun -m train` (many)."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch

DEFAULT_TIMEOUT_S = 600  # the recipe's collective_timeout_s default (train/recipe.py)


def init_distributed(timeout_s: int = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join (or, run alone, create) the process group. Returns (rank, world_size).

    `timeout_s` bounds every collective: one that waits longer for a rank (stopped, dead, stuck) raises instead of
    waiting for ever (gloo; NCCL's own watchdog aborts the process and names the collective)."""
    if not torch.cuda.is_available():
        # must precede the first `import deepspeed`: it picks its accelerator at import time
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    alone = "RANK" not in os.environ  # a plain single process: a world of one
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend, timeout = ("nccl" if torch.cuda.is_available() else "gloo"), timedelta(seconds=timeout_s)
    if alone and not torch.distributed.is_initialized():
        _start_world_of_one(backend, timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)  # adopts the group, if made
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _start_world_of_one(backend: str, timeout: timedelta) -> None:
    """The group of one process. Its store listens on the port in MASTER_PORT, or else on one the kernel picks as it
    binds (port 0): a port chosen first and bound later could be handed to another process in between."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", 0)),
                                       world_size=1, is_master=True, timeout=timeout)
    os.environ["MASTER_PORT"] = str(store.port)  # for whatever reads it later, as under a launcher
    torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value):
    """Sum a number, or each number of a list in one collective, over all ranks (float64)."""
    tensor = torch.tensor(value, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        tensor = tensor.to(device())
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast_object(value):
    """Rank 0's `value` on every rank (a picklable object)."""
    if world()[1] == 1:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(value) -> list:
    """Every rank's `value` (a picklable object), in rank order."""
    if world()[1] == 1:
        return [value]
    gathered = [None] * world()[1]
    torch.distributed.all_gather_object(gathered, value)
    return gathered


_C10D = str(Path("torch", "distributed", "distributed_c10d.py"))
_REPO = Path(__file__).resolve().parents[1]


def failed_collective(error: BaseException) -> str | None:
    """For an error raised inside a torch.distributed collective (a peer that died or stopped answering, a timeout):
    'all_reduce called from train/engine.py:203 (train_step)'; None for any other error.

    gloo raises a plain RuntimeError, so the collective is read from the traceback: the innermost frame in
    torch.distributed's collectives module is the collective, the innermost frame of this repository its caller."""
    if not isinstance(error, RuntimeError):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    collectives = [f for f in frames if f.filename.endswith(_C10D)]
    if not collectives and not isinstance(error, torch.distributed.DistError):
        return None
    name = collectives[-1].name if collectives else "a collective waited on asynchronously"
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(_REPO) and "site-packages" not in f.filename
            and Path(f.filename).resolve() != Path(__file__).resolve()]  # this module's wrappers: their caller
    if not ours:
        return name
    caller = ours[-1]
    return f"{name} called from {Path(caller.filename).resolve().relative_to(_REPO)}:{caller.lineno} ({caller.name})"


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def close() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
