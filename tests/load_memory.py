"""Peak host memory of each rank when a real-width model is built and loaded for a ZeRO-3 stage (README, "Memory at
load"): Asagi-2B's widths (SigLIP so400m, all 27 blocks; llm-jp-3-1.8b, LLM_LAYERS of its 24 layers, its 99,584-row
vocabulary), stage 2's ZeRO-3 in bf16, the tiny builtin tokenizer (nothing downloaded).

    python -m tests.load_memory write DIR                          # once: DIR/recipe.yaml, DIR/stage/model.safetensors
    torchrun --nproc_per_node 2 -m tests.load_memory measure DIR   # each rank prints one JSON line

`write` saves random bf16 weights as a previous stage's directory (one process, the whole model: not measured).
`measure` builds the stage's model from it as a run does (train.build.build_stage_model), then sets up the stage's
DeepSpeed engine training the projector only (the optimizer state of a trained LLM is DeepSpeed's business, not the
load's); each rank reports its peak resident size (VmHWM) after each and the model's full fp32 size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
LLM_LAYERS = 12


def write_recipe(directory: Path) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "asagi-2b.yaml").read_text())
    model = recipe["model"]
    model["vision_encoder"].pop("path")
    model["vision_encoder"]["config"] = json.loads((REPO / "recipes/configs/siglip-so400m-patch14-384.json").read_text())
    model["llm"].pop("path")
    model["llm"]["config"] = {**json.loads((REPO / "recipes/configs/llm-jp-3-1.8b.json").read_text()),
                              "num_hidden_layers": LLM_LAYERS}
    model["tokenizer"] = "builtin:tiny-ja"
    recipe["stages"][1]["train"] = ["projector"]
    recipe["stages"][1]["lr"] = {"projector": 2.0e-5}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def family_and_config(directory: Path):
    from train.models import family_for
    from train.recipe import load_recipe
    from train.run import model_config_offline

    recipe = load_recipe(directory / "recipe.yaml", check_files=False)
    return recipe, family_for(recipe.model), model_config_offline(recipe)


def write(directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    write_recipe(directory)
    recipe, family, config = family_and_config(directory)
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    state = family.build(recipe.model, config, load_weights=False).state_dict()
    (directory / "stage").mkdir(exist_ok=True)
    save_file(state, directory / "stage" / "model.safetensors")
    print(json.dumps({"parameters": sum(v.numel() for v in state.values()), "dir": str(directory / "stage")}))


def peak_resident_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def measure(directory: Path) -> None:
    from train import distributed
    from train.build import build_stage_model
    from train.engine import setup_stage

    rank, world_size = distributed.init_distributed()
    recipe, family, config = family_and_config(directory)
    stage = recipe.stages[1]
    started = peak_resident_bytes()
    torch.manual_seed(recipe.seed)
    model = build_stage_model(family, recipe.model, config, stage, world_size, directory / "stage")
    built = peak_resident_bytes()
    parameters = sum(p.ds_numel for p in model.parameters())
    setup_stage(family, model, stage, iter(()), rank=rank, world_size=world_size, hooks=[])
    engine = peak_resident_bytes()
    gib = 2**30
    print(json.dumps({"rank": rank, "world_size": world_size, "parameters": parameters,
                      "full_fp32_gib": round(parameters * 4 / gib, 2),
                      "peak_gib": {"imports": round(started / gib, 2), "built_and_loaded": round(built / gib, 2),
                                   "engine_set_up": round(engine / gib, 2)},
                      "peak_share_of_full_fp32": round(engine / (parameters * 4), 3)}), flush=True)
    distributed.close()


if __name__ == "__main__":
    {"write": write, "measure": measure}[sys.argv[1]](Path(sys.argv[2]))
