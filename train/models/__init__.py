"""Model families, one module each, behind one registry: `vision_encoder.kind` -> the family that builds it.

A family (train/models/base.py: ModelFamily) says everything the rest of kakehashi needs about one kind of VLM.
To add one, write its module and add its kinds here; see CONTRIBUTING.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.errors import UsageError
from train.models.base import ModelFamily
from train.models.llava import LLAVA
from train.models.onevision import ONEVISION
from train.models.qwen2vl import QWEN2VL
from train.models.tokenizers import IMAGE_TOKEN, token_of
from train.models.weights import checkpoint_dir

FAMILIES: dict[str, ModelFamily] = {"siglip": LLAVA, "clip": LLAVA, "qwen2_vl": QWEN2VL}
TILED_FAMILIES: dict[str, ModelFamily] = {"siglip": ONEVISION}  # the same kinds with vision_encoder.tiling


def family_for(spec) -> ModelFamily:
    """The family of a recipe's model section: its vision_encoder.kind's, tiled or not (the recipe has checked
    that the kind is known and, with tiling, that a tiled family holds it)."""
    registry = TILED_FAMILIES if spec.vision_encoder.tiling is not None else FAMILIES
    return registry[spec.vision_encoder.kind]


def model_config(spec, tokenizer):
    """The family's architecture record of a recipe's model section, its vocabulary and token ids `tokenizer`'s."""
    names = {"image": IMAGE_TOKEN, **dict(zip(("image_start", "image_end"), spec.image_start_end or ()))}
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in names.items()}
    return family_for(spec).config(spec, len(tokenizer), token_ids)


def family_of_record(record: dict, where: str) -> ModelFamily:
    """The family that reads a checkpoint whose config.json is `record` (by its model_type)."""
    model_type = record.get("model_type")
    families = list(dict.fromkeys([*FAMILIES.values(), *TILED_FAMILIES.values()]))
    for family in families:
        if model_type in family.export_model_types:
            return family
    known = ", ".join(t for f in families for t in f.export_model_types)
    raise UsageError(f"{where}: model_type {model_type!r} is not a layout kakehashi reads ({known})")


def family_of_export(directory: Path | str) -> ModelFamily:
    """The family whose export (or stage) format `directory` holds, by the model_type in its config.json."""
    path = Path(directory, "config.json")
    if not path.is_file():
        raise UsageError(f"{directory} is not an exported model (no config.json)")
    return family_of_record(json.loads(path.read_text()), str(path))


def init_fields(init: dict) -> dict:
    """The recipe's model sections as model.init's checkpoint fixes them (its architecture, its family's fields):
    {"vision_encoder": {...}, "projector": {...}, "llm": {...}, ...}. ValueError when it cannot be read."""
    try:
        directory = checkpoint_dir(init, weights=False)
        path = directory / "config.json"
        if not path.is_file():
            raise UsageError(f"model.init: {directory} holds no config.json")
        record = json.loads(path.read_text())
        family = family_of_record(record, f"model.init {path}")
        image = token_of(directory, record["image_token_index"])
        if image != IMAGE_TOKEN:  # the data's placeholder must become the token the checkpoint was trained with
            raise UsageError(f"model.init: {directory}'s image token (id {record['image_token_index']}) is "
                             f"{image!r} in its tokenizer, not {IMAGE_TOKEN}, which kakehashi's data uses")
        return family.init_fields(directory, record)
    except UsageError as err:
        raise ValueError(str(err).removeprefix("model.init: ")) from None
