"""Export a finished stage in its model family's published layout: weights (safetensors), processor, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from train.errors import UsageError
from train.models import family_for
from train.recipe import load_recipe
from train.rundir import RunDir, atomic_write_dir, is_complete


def export_stage(run_dir: Path, stage_path: Path, out: Path, force: bool = False) -> Path:
    """Write `out` from the run's finished stage at `stage_path` (atomically: complete or absent)."""
    from train.report import model_card

    run = RunDir(run_dir)
    if not is_complete(stage_path):
        raise UsageError(f"{stage_path} is not a finished stage (no summary.json)")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} already exists and is not empty; choose another --out or pass --force")
        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()
    recipe = load_recipe(run.recipe_file, check_files=False)
    family = family_for(recipe.model)
    model, processor = family.load_stage(stage_path), family.load_processor(run.processor)

    def write(tmp: Path) -> None:
        family.save_export(model, processor, tmp)
        (tmp / "README.md").write_text(model_card(run_dir), encoding="utf-8")
        info = {"recipe": recipe.name, "template": recipe.template, "stage": stage_path.name}
        (tmp / "kakehashi.json").write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_dir(out, write)
    return out
