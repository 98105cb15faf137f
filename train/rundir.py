"""The run directory: its layout, which stages are complete, where a run resumes, and atomic directory writes.

OUTPUT/
  recipe.yaml                 the resolved recipe (overrides applied); a different recipe is refused
  processor/                  tokenizer (with the image token, chat template) + image processor
  cache/                      the built-in tokenizer and other things built once per run
  metrics.jsonl               one JSON object per logged step (and per periodic eval)
  checkpoints/NN-name/        DeepSpeed checkpoints every `save_every` steps (train/checkpoint.py)
  stages/NN-name/             consolidated weights (model.safetensors), config.json, summary.json; written to a
                              temporary directory and renamed, so a stage directory is complete or absent
  export/                     the model in its family's published layout (train/models/)
  wandb.json, wandb/          wandb run ids per stage, and wandb's files
  report/                     `kakehashi report`
  stalls/rankNNNNN.json       what a rank was doing when its stall watchdog fired (train/watchdog.py)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from train import checkpoint
from train.errors import DiskFull, RecipeError, UsageError, free_space, is_disk_full

ENTRIES = ("recipe.yaml", "processor", "cache", "metrics.jsonl", "stages", "checkpoints", "export", "wandb",
           "wandb.json", "report", "stalls")
SUMMARY = "summary.json"  # written last into a stage directory: its presence means the stage is complete


def is_complete(stage_path: Path) -> bool:
    return (stage_path / SUMMARY).is_file()


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory through `write(tmp)` into a temporary sibling, then rename it into place; a write that
    runs out of space removes the temporary directory and raises DiskFull."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except Exception as err:  # noqa: BLE001 - a full disk becomes DiskFull; anything else is raised as it is
        full, free = is_disk_full(err, tmp), free_space(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(f"no space left on device writing {final} ({free}); nothing of it was kept; "
                           f"free space and run the same command again to resume") from None
        raise
    if final.exists():
        raise UsageError(f"{final} appeared while writing it; refusing to overwrite")
    tmp.rename(final)


class RunDir:
    """One recipe's run directory (see the module docstring for the layout)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.recipe_file = self.root / "recipe.yaml"
        self.processor = self.root / "processor"
        self.cache = self.root / "cache"
        self.metrics = self.root / "metrics.jsonl"
        self.export = self.root / "export"
        self.wandb_ids = self.root / "wandb.json"
        self.report = self.root / "report"
        self.stalls = self.root / "stalls"

    def stage(self, index: int, name: str) -> Path:
        return self.root / "stages" / f"{index + 1:02d}-{name}"

    def checkpoints(self, index: int, name: str) -> Path:
        return self.root / "checkpoints" / self.stage(index, name).name

    def reference_logps(self, index: int, name: str, rank: int, world_size: int) -> Path:
        """A `reference: precomputed` stage's reference log-probabilities on one rank (train/objectives.py)."""
        return self.checkpoints(index, name) / "reference-logps" / f"rank-{rank:05d}-of-{world_size:05d}.safetensors"

    def stored_recipe(self) -> dict:
        import yaml

        return yaml.safe_load(self.recipe_file.read_text(encoding="utf-8"))

    def finished_stages(self) -> list[Path]:
        stages = self.root / "stages"
        return sorted(p for p in stages.glob("*") if is_complete(p)) if stages.is_dir() else []

    def find_stage(self, stage: str | None) -> Path:
        """A finished stage's directory by name or 1-based number; default: the last finished stage."""
        finished = self.finished_stages()
        if not finished:
            raise UsageError(f"{self.root} has no finished stage")
        if stage is None:
            return finished[-1]
        for path in finished:
            number, _, name = path.name.partition("-")
            if stage in (name, number, str(int(number))):
                return path
        names = ", ".join(p.name for p in finished)
        raise UsageError(f"{self.root} has no finished stage {stage!r}; finished: {names}")

    # ------------------------------------------------------------------------------------------ starting a run

    def prepare(self, recipe, force: bool, resume: str) -> None:
        """Refuse to mix runs: the directory holds this recipe's run, or is new; then store the recipe."""
        from train.recipe import dump_recipe

        occupied = self.root.exists() and any(self.root.iterdir())
        if resume == "never" and occupied:
            if not force:
                raise UsageError(f"--resume never: {self.root} is not empty; pass --force to start over "
                                 f"(its run is deleted)")
            for entry in ENTRIES:
                path = self.root / entry
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        elif self.recipe_file.is_file():
            if not self.holds(recipe) and not force:
                raise UsageError(f"{self.root} holds a run of a different recipe (see its recipe.yaml); "
                                 f"use a new --output or --force")
        elif occupied and not force:
            raise UsageError(f"{self.root} is not empty and holds no kakehashi run; use a new --output or --force")
        self.root.mkdir(parents=True, exist_ok=True)
        self.recipe_file.write_text(dump_recipe(recipe), encoding="utf-8")

    def holds(self, recipe) -> bool:
        """Whether recipe.yaml is this recipe, compared as parsed recipes: a field added to the schema since the run
        started takes its default in both, so upgrading kakehashi does not orphan a run."""
        from train.recipe import parse_recipe

        try:
            text = self.recipe_file.read_text(encoding="utf-8")
            before = parse_recipe(text, str(self.recipe_file), check_files=False)
        except RecipeError:
            return False
        return before.model_dump(mode="json") == recipe.model_dump(mode="json")

    def resume_point(self, recipe, resume: str) -> tuple[int, Path | None]:
        """(index of the first stage to train, checkpoint to resume it from or None).

        auto: the first unfinished stage, from its newest complete and intact checkpoint if it has one; never: stage
        0 from scratch; a path: that checkpoint, which must belong to the first unfinished stage and be intact.
        Collective: every rank checks a share of the checkpoint's checksums.
        """
        dirs = [self.stage(i, stage.name) for i, stage in enumerate(recipe.stages)]
        first = next((i for i, d in enumerate(dirs) if not is_complete(d)), len(dirs))
        if resume == "never" or first == len(dirs):
            return first, None
        if resume == "auto":
            return first, checkpoint.newest_intact(self.checkpoints(first, recipe.stages[first].name))
        path = Path(resume)
        if not (path / checkpoint.COMPLETE).is_file():
            raise UsageError(f"--resume {resume}: not a complete checkpoint (no {checkpoint.COMPLETE} marker)")
        names = [d.name for d in dirs]
        if path.parent.name not in names or path.parent.parent.resolve() != (self.root / "checkpoints").resolve():
            raise UsageError(f"--resume {resume}: not a checkpoint of this run "
                             f"(expected {self.root}/checkpoints/NN-stage/step-N)")
        problem = checkpoint.damage(path)
        if problem is not None:
            raise UsageError(f"--resume {resume}: damaged checkpoint ({problem})")
        index = names.index(path.parent.name)
        if index != first:
            state = "already finished" if index < first else f"after unfinished stage {recipe.stages[first].name}"
            raise UsageError(f"--resume {resume}: stage {recipe.stages[index].name} is {state}")
        return index, path

    def stage_summary(self, stage_path: Path) -> dict:
        return json.loads((stage_path / SUMMARY).read_text())

    def stage_summaries(self) -> list[dict]:
        return [self.stage_summary(p) for p in self.finished_stages()]
