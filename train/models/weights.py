"""Weights as kakehashi reads them: tensors named as the model's state dict, each read when asked for
(safetensors one tensor at a time, a `path` component from transformers' from_pretrained), copied into a
model one at a time (under ZeRO-3 into the gathered parameter); model.init's checkpoint directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from train.errors import UsageError

log = logging.getLogger(__name__)


def checkpoint_dir(init, weights: bool = True) -> Path:
    """model.init's directory (`init`: its recipe section or a dict of it): the local one, or the hub snapshot of
    its files (with `weights`, the safetensors too; else the configs and tokenizer only)."""
    source = init if isinstance(init, dict) else init.model_dump()
    path = Path(source["path"]).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source["path"].startswith((".", "~")) or source["path"].count("/") != 1:
        raise UsageError(f"model.init: no such directory: {source['path']}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.jinja", "*.txt", *(["*.safetensors"] if weights else [])]
    try:
        return Path(snapshot_download(source["path"], revision=source.get("revision"), allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...: one line naming it
        raise UsageError(f"model.init: cannot read {source['path']} ({str(err).splitlines()[0]})") from None


def resized_vocabulary(state: dict[str, torch.Tensor], names: tuple[str, ...], vocab_size: int) -> dict:
    """`state` with the embedding and LM head rows `names` grown (new rows: the mean row) to `vocab_size`: a
    checkpoint's vocabulary plus tokens kakehashi added to its tokenizer."""
    for name in names:
        if name in state and state[name].shape[0] < vocab_size:
            rows = state[name]
            extra = rows.mean(0, keepdim=True).expand(vocab_size - rows.shape[0], -1)
            state[name] = torch.cat([rows, extra])
    return state


class Weight(NamedTuple):
    """One tensor of a weight source, read only when `read()` is called: a loader copies one tensor at a time, and
    under ZeRO-3 only the rank that fills the gathered parameter reads it."""

    name: str                    # the model's state-dict name
    shape: tuple[int, ...]       # the shape `read()` returns (checked on every rank before anything is read)
    read: Callable[[], torch.Tensor]


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_weights(path: Path | str) -> list[Weight]:
    """The tensors of one safetensors file, each read by itself with plain file reads: no memory map, so the
    process holds the tensor being copied, not the file's pages (which would count in its resident memory)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    header.pop("__metadata__", None)

    def reader(entry: dict) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            with open(path, "rb") as file:
                file.seek(8 + header_size + begin)
                file.readinto(raw.numpy())
            return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return read

    return [Weight(name, tuple(entry["shape"]), reader(entry)) for name, entry in header.items()]


def directory_weights(directory: Path) -> list[Weight]:
    """Every tensor of a checkpoint directory's safetensors files (one file, or the shards beside an index)."""
    return [w for file in sorted(Path(directory).glob("*.safetensors")) for w in safetensors_weights(file)]


def grown_rows(weight: Weight, rows: int) -> Weight:
    """`weight` (embedding or LM head rows) grown to `rows` as resized_vocabulary grows them."""
    if weight.shape[0] >= rows:
        return weight
    return Weight(weight.name, (rows, *weight.shape[1:]),
                  lambda: resized_vocabulary({weight.name: weight.read()}, (weight.name,), rows)[weight.name])


def module_weights(prefix: str, names: Iterable[str], load: Callable[[], nn.Module], shapes: dict) -> list[Weight]:
    """Weights `prefix` + name for each of a module's state-dict `names`, read from the module `load()` returns
    (loaded once, on the first read: a `path` component through transformers' from_pretrained)."""
    loaded = []

    def tensor(name: str) -> torch.Tensor:
        if not loaded:
            loaded.append(load().state_dict())
        return loaded[0][name]

    return [Weight(prefix + name, tuple(shapes[prefix + name]), lambda name=name: tensor(name)) for name in names]


def load_weights(model: nn.Module, weights: Iterable[Weight], *, strict: bool, gathered=None) -> int:
    """Copy `weights` into `model`, one tensor at a time; returns how many. A shape that differs is an error; a name
    the model lacks is logged and skipped (as from_pretrained does: a checkpoint may carry a pooling head, ...); with
    `strict` a parameter or buffer left out is an error (tied weights: one of its names is enough).
    `gathered(tensor)`: a context yielding whether this process fills `tensor` (train/build.py's ZeRO-3 gather)."""
    from contextlib import nullcontext

    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True))
    filled, count, unused = set(), 0, []
    for weight in weights:
        target = targets.get(weight.name)
        if target is None or weight.name not in persistent:
            unused.append(weight.name)
            continue
        shape = tuple(getattr(target, "ds_shape", target.shape))
        if shape != tuple(weight.shape):
            raise ValueError(f"{weight.name}: shape {tuple(weight.shape)} where the model has {shape}")
        with torch.no_grad(), (gathered(target) if gathered else nullcontext(True)) as fills:
            if fills:
                target.data.copy_(weight.read())
        filled.add(id(target))
        count += 1
    if unused:
        log.warning("%d weights the model has no place for, not used: %s", len(unused), ", ".join(unused[:5]))
    missing = [n for n, t in targets.items() if n in persistent and id(t) not in filled]
    if strict and missing:
        raise ValueError(f"no weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return count


def shape_problems(model: nn.Module, weights: Iterable[Weight]) -> list[str]:
    """Each weight whose shape is not the model's tensor of that name: 'NAME: shape (..) in the file, (..) in the
    model'. Reads the shapes only (safetensors headers), never the data: `recipe check` runs it on the meta device."""
    shapes = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in model.state_dict(keep_vars=True).items()}
    return [f"{w.name}: shape {tuple(w.shape)} in the checkpoint, {shapes[w.name]} in the model the recipe builds"
            for w in weights if w.name in shapes and tuple(w.shape) != shapes[w.name]]


def parameter_size(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves an empty placeholder; ds_numel is the real size
