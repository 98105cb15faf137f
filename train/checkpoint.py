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
Files are memory-mapped for that check (and for elastic resume), so no rank reads every rank's state whole.

Elastic resume (another number of ranks than the checkpoint's) reads DeepSpeed's files itself, with the same
weights_only loads, and re-cuts the saved partitions for the new world: ZeRO-1/2 per flat group
(`saved_flat_groups` -> `load_flat_groups`, which also carries fp32 ZeRO-0's per-parameter state to and from
them), ZeRO-3 per parameter (`reshard_zero3`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import zipfile
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
                torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
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

    On another number of ranks than it was saved on (elastic resume; any ZeRO stage), or in the other optimizer
    layout (fp32 ZeRO-1/2 runs as ZeRO-0 on one rank: train/stages.py resolve_stage), the weights, optimizer state
    (re-cut), step and learning-rate schedule carry over, and the data position by sample count (rank 0's state is
    returned); the RNG streams of other ranks do not.
    """
    verify_checkpoint(path)
    saved_world = json.loads((path / COMPLETE).read_text())["world_size"]
    saved_flat = zero_stage != 3 and optim_states_file(path, 0).is_file()  # ZeRO-1/2 files (or DeepSpeed's bf16)
    if same_layout(engine, path, zero_stage, saved_flat) and (saved_world == world_size or zero_stage == 0):
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        same_world = saved_world == world_size
        state_file = path / f"kakehashi-rank{rank if same_world else 0:05d}.pt"
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if same_world:
            set_rng_state(state["rng"])
        return state
    layout = "" if saved_world != world_size else " (in another optimizer layout than this run's)"
    log.warning("%s was saved on %d ranks%s; resuming on %d: weights, optimizer state (re-sharded), step, schedule "
                "and data position (by sample count) carry over", path, saved_world, layout, world_size)
    model_states = load_mapped(_model_states_file(path))
    if zero_stage == 3:
        reshard_zero3(engine, path, saved_world, rank, world_size)
    else:
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True)
        params = _group_params(engine.optimizer)
        saved = (saved_flat_groups(path, saved_world) if saved_flat
                 else zero0_flat_groups(model_states["optimizer"], params))
        load_flat_groups(engine.optimizer, params, saved, rank)
    restore_schedule(engine, model_states)
    state = torch.load(path / "kakehashi-rank00000.pt", map_location="cpu", weights_only=True)
    engine.global_steps = state["step"]
    return state


def same_layout(engine, path: Path, zero_stage: int, saved_flat: bool) -> bool:
    """Whether DeepSpeed can load the checkpoint into this engine as it is: ZeRO-1/2's flat partitions and fp32
    ZeRO-0's per-parameter AdamW state (the optimizer DeepSpeed steps itself) do not mix, and ZeRO-3's files must be
    cut into the same sub-groups of parameters (train/engine.py ZERO3_SUB_GROUP). DeepSpeed's bf16 ZeRO-0 wrappers
    load their own files, as before."""
    if zero_stage == 3:
        return len(load_mapped(_model_states_file(path))["param_shapes"]) == len(engine.optimizer.fp16_groups)
    if _is_flat(engine.optimizer) or isinstance(engine.optimizer, torch.optim.Optimizer):
        return saved_flat == _is_flat(engine.optimizer)
    return True


def _model_states_file(path: Path) -> Path:
    """Rank 0's model states file: `mp_rank_00_model_states.pt` (ZeRO-0/1/2), `zero_pp_rank_0_...` (ZeRO-3)."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    return next(path / name for name in names if (path / name).is_file())


def load_mapped(file: Path) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped, with weights_only=True and the allowlist of verify_checkpoint."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def optim_states_file(path: Path, rank: int) -> Path:
    """A rank's ZeRO optimizer file; DeepSpeed prefixes its name with `bf16_` when the engine trains in bf16."""
    name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return path / name if (path / name).is_file() else path / f"bf16_{name}"


def restore_schedule(engine, model_states: dict) -> None:
    """The learning-rate schedule, and the optimizer's current learning rates, which the schedule set at the saved
    step (the scheduler's state alone would leave the next step at the first step's rate), and the engine's counts."""
    engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_samples = model_states.get("global_samples", engine.global_samples)
    engine.skipped_steps = model_states.get("skipped_steps", engine.skipped_steps)


def _is_flat(optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2 optimizer (flat fp32 partitions), not an optimizer on the parameters (fp32 ZeRO-0)."""
    return hasattr(optimizer, "single_partition_of_fp32_groups")


def _group_params(optimizer) -> list[list[torch.Tensor]]:
    """Each optimizer group's trained parameters, in the order ZeRO-1/2 flatten them."""
    if _is_flat(optimizer):
        return [list(group) for group in optimizer.round_robin_bit16_groups]
    return [list(group["params"]) for group in optimizer.param_groups]


def saved_flat_groups(path: Path, saved_world: int) -> list[dict]:
    """Each group's whole state from a ZeRO-1/2 checkpoint of `saved_world` ranks: {fp32 (master weights), exp_avg,
    exp_avg_sq: flat and unpadded, step}.

    ZeRO-1/2 keep, per parameter group, one flat fp32 vector (master weights, and AdamW's exp_avg / exp_avg_sq) cut
    into equal partitions, the last one padded; the saved partitions, joined and unpadded, are the whole group.
    """
    saved = [load_mapped(optim_states_file(path, r))["optimizer_state_dict"] for r in range(saved_world)]
    groups = []
    for group in range(len(saved[0]["single_partition_of_fp32_groups"])):
        padding = sum(s["group_paddings"][group] for s in saved)
        moments = [s["base_optimizer_state"]["state"][group] for s in saved]
        whole = {"fp32": torch.cat([s["single_partition_of_fp32_groups"][group] for s in saved]),  # saved unpadded
                 "step": moments[0]["step"]}
        for key in ("exp_avg", "exp_avg_sq"):
            joined = torch.cat([m[key] for m in moments])
            whole[key] = joined[: joined.numel() - padding]
        groups.append(whole)
    return groups


def zero0_flat_groups(optimizer_state: dict, params: list[list[torch.Tensor]]) -> list[dict]:
    """The same whole-group state from an fp32 ZeRO-0 checkpoint: AdamW's per-parameter state (the model states
    file's `optimizer`), and its master weights, which are the weights just loaded into `params`."""
    groups = []
    for group, members in zip(optimizer_state["param_groups"], params):
        states = [optimizer_state["state"].get(index, {}) for index in group["params"]]
        whole = {"fp32": torch.cat([p.detach().reshape(-1).float().cpu() for p in members]),
                 "step": states[0].get("step", torch.tensor(0.0))}
        for key in ("exp_avg", "exp_avg_sq"):  # no state: no step was applied yet
            whole[key] = torch.cat([st[key].reshape(-1) if key in st else torch.zeros(p.numel())
                                    for st, p in zip(states, members)])
        groups.append(whole)
    return groups


def adam_step(adam: torch.optim.Optimizer, step: torch.Tensor, device: torch.device) -> torch.Tensor:
    """AdamW's step count as torch's load_state_dict would place it: on the parameters' device for the fused (or
    capturable) kernels, else on the CPU."""
    group = adam.param_groups[0]
    on_device = group.get("fused") or group.get("capturable")
    return step.detach().clone().to(dtype=torch.float32, device=device if on_device else "cpu")


def load_flat_groups(optimizer, params: list[list[torch.Tensor]], saved: list[dict], rank: int) -> None:
    """Put each group's whole state into this rank's optimizer: its slice of every flat vector at its own partition
    size, zero-padded past the end (ZeRO-1/2), or each parameter's piece (fp32 ZeRO-0: AdamW on the parameters)."""
    if len(saved) != len(params) or any(s["fp32"].numel() != sum(p.numel() for p in g) for s, g in zip(saved, params)):
        raise UsageError("checkpoint's optimizer groups do not match this stage's trained parameters "
                         "(saved by another stage or model?)")
    with torch.no_grad():
        for group, whole in enumerate(saved):
            if _is_flat(optimizer):
                _load_partition(optimizer, group, whole, rank)
            else:
                _load_per_parameter(optimizer, params[group], whole)


def _load_partition(zero_optimizer, group: int, whole: dict, rank: int) -> None:
    flat = zero_optimizer.single_partition_of_fp32_groups[group]
    flat.copy_(_partition(whole["fp32"], flat.numel(), rank).to(flat.device))
    state = zero_optimizer.optimizer.state[flat]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = _partition(whole[key], flat.numel(), rank).to(flat.device)
    state["step"] = adam_step(zero_optimizer.optimizer, whole["step"], flat.device)


def _load_per_parameter(adam: torch.optim.Optimizer, params: list[torch.Tensor], whole: dict) -> None:
    offset = 0
    for param in params:
        pieces = {key: whole[key][offset: offset + param.numel()].view_as(param).to(param.device).clone()
                  for key in ("fp32", "exp_avg", "exp_avg_sq")}
        param.copy_(pieces.pop("fp32"))
        adam.state[param] = {"step": adam_step(adam, whole["step"], param.device), **pieces}
        offset += param.numel()


class Zero3Saved:
    """A ZeRO-3 checkpoint's state, whole per parameter, read from the partitions of the ranks that saved it.

    ZeRO-3 cuts every parameter into `ceil(numel / world)` elements per rank (the last rank's zero-padded). A rank's
    optimizer file holds, per sub-group, one flat fp32 vector (and AdamW's exp_avg / exp_avg_sq) that is its
    partition of each of the sub-group's parameters in order (`param_shapes` of the model states file, as
    DeepSpeed's zero_to_fp32.py reads it); frozen parameters are in the model states file as each rank's partition.
    Files are memory-mapped: a rank reads the pages of what it takes, not every saved rank's whole state.
    """

    def __init__(self, path: Path, world: int):
        self.models = [load_mapped(path / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world)]
        self.optims = [load_mapped(optim_states_file(path, r))["optimizer_state_dict"] for r in range(world)]
        self.world = world
        self.where = {}  # trained parameter name -> (sub-group, offset in its flat partition, shape)
        for group, shapes in enumerate(self.models[0]["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                self.where[name] = (group, offset, torch.Size(shape))
                offset += math.ceil(torch.Size(shape).numel() / world)
        self.frozen_shapes = self.models[0]["frozen_param_shapes"] or {}
        self.step = self.optims[0]["optimizer_state_dict"]["state"][0]["step"]

    def full(self, name: str, key: str) -> torch.Tensor:
        """The whole flat tensor of a parameter: `fp32` (master weights), `exp_avg`, `exp_avg_sq`, or `frozen`."""
        if key == "frozen":
            numel = torch.Size(self.frozen_shapes[name]).numel()
            return torch.cat([m["frozen_param_fragments"][name].reshape(-1) for m in self.models])[:numel]
        group, offset, shape = self.where[name]
        part = math.ceil(shape.numel() / self.world)

        def flat(optim: dict) -> torch.Tensor:
            if key == "fp32":
                return optim["fp32_flat_groups"][group]
            return optim["optimizer_state_dict"]["state"][group][key]

        return torch.cat([flat(o).narrow(0, offset, part) for o in self.optims])[: shape.numel()]


def _partition(full: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """This rank's `size` elements of a flat tensor cut into equal partitions, zero-padded past its end."""
    piece = torch.zeros(size, dtype=full.dtype)
    chunk = full[rank * size: (rank + 1) * size]
    piece[: chunk.numel()] = chunk
    return piece


def reshard_zero3(engine, path: Path, saved_world: int, rank: int, world_size: int) -> None:
    """Load a ZeRO-3 checkpoint saved on `saved_world` ranks into this rank's partitions of another world size.

    Each trained parameter's fp32 master weights and AdamW moments are made whole from the saved partitions
    (`Zero3Saved`) and cut again at this world's partition size, into this rank's flat fp32 partition, its optimizer
    state and the parameter's own (bit16) partition; frozen parameters likewise from their saved partitions; AdamW's
    step count carries over. The schedule and the engine's counts: `restore_schedule`.
    """
    saved, optimizer = Zero3Saved(path, saved_world), engine.optimizer
    names = {param: name for name, param in engine.module.named_parameters()}
    trained = set()
    with torch.no_grad():
        for group, params in enumerate(optimizer.fp16_groups):
            flat = optimizer.fp32_partitioned_groups_flat[group]
            state = optimizer.optimizer.state[flat]
            targets = {"fp32": flat, **{key: state.setdefault(key, torch.zeros_like(flat))
                                        for key in ("exp_avg", "exp_avg_sq")}}
            offset = 0
            for param in params:
                name, size = _zero3_name(names, param, saved.where), param.partition_numel()
                for key, target in targets.items():
                    mine = _partition(saved.full(name, key), size, rank)
                    target.narrow(0, offset, size).copy_(mine)
                    if key == "fp32":  # the parameter's own partition (a view of the bit16 flat partition)
                        param.ds_tensor.data.copy_(mine)
                offset = offset + size
                trained.add(name)
            state["step"] = adam_step(optimizer.optimizer, saved.step, flat.device)
        for param, name in names.items():
            if name not in trained and param.ds_numel:
                size = param.partition_numel()
                param.ds_tensor.data.copy_(_partition(saved.full(_zero3_name(names, param, saved.frozen_shapes),
                                                                 "frozen"), size, rank))
    log.info("ZeRO-3 state of %d ranks re-cut for %d: %d trained and %d frozen parameters", saved_world, world_size,
             len(trained), len(names) - len(trained))


def _zero3_name(names: dict, param, saved: dict) -> str:
    name = names[param]
    if name not in saved:
        raise UsageError(f"checkpoint has no ZeRO-3 state for parameter {name} (saved by another stage or model?)")
    return name
