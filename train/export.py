"""Export a finished stage as a plain transformers LLaVA: safetensors weights + LlavaProcessor, no remote code."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from safetensors.torch import load_file

from train.recipe import UsageError
from train.run import atomic_write_dir, is_complete


def export_stage(run_dir: Path, stage_path: Path, out: Path, force: bool = False) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if not is_complete(stage_path):
        raise UsageError(f"{stage_path} is not a finished stage (no summary.json)")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} already exists and is not empty; choose another --out or pass --force")
        import shutil

        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()
    from train import qwen2vl

    if qwen2vl.is_export(stage_path):  # no transformers class for a Qwen2-VL ViT + Llama: our format
        model = qwen2vl.Qwen2VLVisionLM(qwen2vl.Qwen2VLVisionLMConfig.from_pretrained(stage_path))
        processor = qwen2vl.Qwen2VLChatProcessor.from_pretrained(run_dir / "processor")
    else:
        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(stage_path))
        processor = LlavaProcessor.from_pretrained(run_dir / "processor")
    model.load_state_dict(load_file(stage_path / "model.safetensors"))

    def write(tmp: Path) -> None:
        from train.report import model_card

        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(run_dir), encoding="utf-8")
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        info = {"recipe": recipe["name"], "template": recipe["template"], "stage": stage_path.name}
        (tmp / "kakehashi.json").write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_dir(out, write)
    return out


def find_stage(run_dir: Path, stage: str | None) -> Path:
    """A run's stage directory by name or 1-based number; default: the last finished stage."""
    finished = sorted(p for p in (run_dir / "stages").glob("*") if is_complete(p)) if (run_dir / "stages").is_dir() else []
    if not finished:
        raise UsageError(f"{run_dir} has no finished stage")
    if stage is None:
        return finished[-1]
    for path in finished:
        number, _, name = path.name.partition("-")
        if stage in (name, number, str(int(number))):
            return path
    raise UsageError(f"{run_dir} has no finished stage {stage!r}; finished: {', '.join(p.name for p in finished)}")
