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
from train.models.qwen2vl import QWEN2VL

FAMILIES: dict[str, ModelFamily] = {"siglip": LLAVA, "clip": LLAVA, "qwen2_vl": QWEN2VL}


def family_for(spec) -> ModelFamily:
    """The family of a recipe's model section (its vision_encoder.kind; the recipe has checked it is known)."""
    return FAMILIES[spec.vision_encoder.kind]


def model_config(spec, tokenizer):
    """The family's architecture record of a recipe's model section, its vocabulary sized for `tokenizer`."""
    from train.models.base import IMAGE_TOKEN

    return family_for(spec).config(spec, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def family_of_export(directory: Path | str) -> ModelFamily:
    """The family whose export (or stage) format `directory` holds, by the model_type in its config.json."""
    path = Path(directory, "config.json")
    if not path.is_file():
        raise UsageError(f"{directory} is not an exported model (no config.json)")
    model_type = json.loads(path.read_text()).get("model_type")
    for family in dict.fromkeys(FAMILIES.values()):
        if model_type in family.export_model_types:
            return family
    raise UsageError(f"{directory}: model_type {model_type!r} is not a format kakehashi reads")
