"""Mid-stage checkpoints: atomic, verified before loading, the last K kept.

OUTPUT/checkpoints/NN-stage/
  step-0000040/          DeepSpeed's files (model, optimizer, scheduler: per rank for ZeRO) + one state file per
                         rank (step, data-loader position, RNG states) + COMPLETE, written last
  latest                 the newest complete checkpoint's name; moved only after its directory is complete

A checkpoint is written into `.tmp-step-N`, and renamed once every rank has finished writing, so a directory named
`step-N` is always complete; a kill mid-save leaves only a `.tmp-*` directory, which resume skips (and says so).

DeepSpeed loads its files with pickle (`weights_only=False`). Before we hand a checkpoint to it, every file is
loaded here with `weights_only=True` and an allowlist of the few plain DeepSpeed classes its optimizer states
contain; a file that needs anything else (a malicious pickle, for instance) is refused and nothing from it runs.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from train import distributed, faults
from train.errors import UnsafeCheckpoint, UsageError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_checkpoint(path: Path) -> None:
    """Load every file of a checkpoint with weights_only=True (plus DeepSpeed's plain state classes), or refuse."""
    for file in sorted(path.rglob("*")):
        if file.suffix not in (".pt", ".pth", ".bin"):
            continue
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means we will not unpickle it for real
            lines = str(err).strip().splitlines()
            first = lines[0] if lines else repr(err)
            reason = next((line.strip() for line in lines if "Unsupported global" in line), first)
            reason = reason.split(" was not an allowed global")[0]
            raise UnsafeCheckpoint(f"refusing checkpoint {path}: {file.name} cannot be loaded safely ({reason})") \
                from None


def rng_state() -> dict:
    """RNG states as tensors and plain numbers, so the state file loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, rank_state: dict, *, rank: int, keep_last: int, stage: str = "") -> Path:
    """Write a complete checkpoint of `step` under `root` (collective: every rank calls it)."""
    final = root / step_name(step)
    tmp_tag = f".tmp-{step_name(step)}"
    if rank == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    world_size = torch.distributed.get_world_size()
    state = {"step": step, "world_size": world_size, "rng": rng_state(), **rank_state}
    torch.save(state, root / tmp_tag / f"kakehashi-rank{rank:05d}.pt")
    distributed.barrier()  # every rank's files are on disk
    faults.maybe_kill("in_save", stage, step)
    if rank == 0:
        (root / tmp_tag / COMPLETE).write_text(json.dumps({"step": step, "world_size": world_size}) + "\n")
        if final.exists():  # an older run's copy of this step, superseded by this one
            shutil.rmtree(final)
        (root / tmp_tag).rename(final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        latest_tmp.replace(root / "latest")
        prune(root, keep_last)
    distributed.barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    for old in complete[:-keep_last]:
        shutil.rmtree(old)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; torn ones (killed mid-save) are reported and skipped."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".tmp-"):
            log.warning("skipping torn checkpoint %s (killed while saving)", path)
        elif path.is_dir() and path.name.startswith("step-"):
            if (path / COMPLETE).is_file():
                found.append(path)
            else:
                log.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE)
    return found


def load(engine, path: Path, rank: int, world_size: int, zero_stage: int) -> dict:
    """Restore engine (model, optimizer, scheduler) and RNG; returns this rank's state.

    On another number of ranks than it was saved on (elastic resume; ZeRO-0/1/2), the weights, optimizer state
    (re-sharded), step and learning-rate schedule carry over, and the data position by sample count (rank 0's state
    is returned); the RNG streams of other ranks do not.
    """
    verify_checkpoint(path)
    saved_world = json.loads((path / COMPLETE).read_text())["world_size"]
    if saved_world == world_size or zero_stage == 0:  # ZeRO-0 keeps the whole optimizer in the model states file
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        same_world = saved_world == world_size
        state_file = path / f"kakehashi-rank{rank if same_world else 0:05d}.pt"
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if same_world:
            set_rng_state(state["rng"])
        return state
    if zero_stage == 3:
        raise UsageError(f"{path} was saved on {saved_world} ranks with ZeRO-3; resume it on {saved_world} ranks "
                         f"(re-sharding ZeRO-3 state is not supported yet), or train with ZeRO-0/1/2 for elastic "
                         f"resume")
    log.warning("%s was saved on %d ranks; resuming on %d: weights, optimizer state (re-sharded), step, schedule and "
                "data position (by sample count) carry over", path, saved_world, world_size)
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True)
    model_states = next(path.glob("*model_states.pt"))
    scheduler_state = torch.load(model_states, map_location="cpu", weights_only=True)["lr_scheduler"]
    engine.lr_scheduler.load_state_dict(scheduler_state)
    reshard_zero12_optimizer(engine.optimizer, path, saved_world, rank)
    state = torch.load(path / "kakehashi-rank00000.pt", map_location="cpu", weights_only=True)
    engine.global_steps = state["step"]
    return state


def reshard_zero12_optimizer(zero_optimizer, path: Path, saved_world: int, rank: int) -> None:
    """Load a ZeRO-1/2 optimizer saved on `saved_world` ranks into this rank's partitions of another world size.

    ZeRO-1/2 keep, per parameter group, one flat fp32 vector (master weights, and AdamW's exp_avg / exp_avg_sq) cut
    into equal partitions, the last one padded. The saved partitions, joined and unpadded, are the whole group;
    this rank takes its slice of that at its own partition size, zero-padded past the end.
    """
    with torch.serialization.safe_globals(_safe_globals()):
        saved = [torch.load(path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu",
                            weights_only=True)["optimizer_state_dict"] for r in range(saved_world)]
    for group, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        padding = sum(s["group_paddings"][group] for s in saved)

        def whole(parts: list[torch.Tensor], padded: bool) -> torch.Tensor:
            joined = torch.cat(parts)
            return joined[: joined.numel() - padding] if padded and padding else joined

        def my_slice(full: torch.Tensor) -> torch.Tensor:
            piece = torch.zeros(flat.numel(), dtype=flat.dtype)
            chunk = full[rank * flat.numel(): (rank + 1) * flat.numel()]
            piece[: chunk.numel()] = chunk
            return piece.to(flat.device)

        with torch.no_grad():  # master weights are saved without padding
            flat.copy_(my_slice(whole([s["single_partition_of_fp32_groups"][group] for s in saved], padded=False)))
        moments = [s["base_optimizer_state"]["state"][group] for s in saved]
        state = zero_optimizer.optimizer.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = my_slice(whole([m[key] for m in moments], padded=True))
        state["step"] = moments[0]["step"].clone()
