"""`model.init`: a recipe starts from a whole VLM (a llava-hf-layout checkpoint with SigLIP or CLIP, a checkpoint
in Sarashina2-Vision's layout), trains a stage and exports; frozen weights stay the checkpoint's, the export
computes what trained; a bad `model.init` is one line naming the field."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_RECIPE, kakehashi
from tests.train.test_qwen2vl import SARASHINA
from train.models import model_config
from train.models.llava import LLAVA
from train.models.qwen2vl import QWEN2VL
from train.recipe import load_recipe
from train.run import build_processor

PUBLISHED = json.loads((REPO / "tests" / "fixtures" / "llava-1.5-7b-hf.weights.json").read_text())["weights"]
CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8, "projection_dim": 32}


def pattern(name: str) -> str:
    import re

    return re.sub(r"\.\d+\.", ".N.", name)


def write_checkpoint(tmp, kind: str):
    """A checkpoint in its family's published layout, random weights from a fixed seed: llava-hf's (siglip, clip)
    or Sarashina2-Vision's (qwen2_vl)."""
    overrides = {"siglip": [], "clip": ["model.vision_encoder.kind=clip", "model.vision_encoder.select_strategy=default"],
                 "qwen2_vl": []}[kind]
    recipe = load_recipe(SARASHINA if kind == "qwen2_vl" else TINY_RECIPE, overrides, check_files=False)
    if kind == "clip":
        recipe.model.vision_encoder.config = CLIP
    family = QWEN2VL if kind == "qwen2_vl" else LLAVA
    processor = build_processor(recipe, tmp / "cache")
    torch.manual_seed(11)
    model = family.build(recipe.model, model_config(recipe.model, processor.tokenizer))
    family.save_export(model, processor, tmp / "checkpoint")
    return tmp / "checkpoint", model


def init_recipe(tmp, checkpoint, train, **model):
    recipe = {"name": f"from-{checkpoint.name}", "model": {"init": str(checkpoint), **model},
              "synthesize": {"out": str(tmp / "shapes"), "samples": 40},
              "stages": [{"name": "tune", "train": train, "lr": {c: 1e-3 for c in train}, "steps": 3,
                          "global_batch_size": 4, "micro_batch_size": 2, "max_length": 96, "zero_stage": 2,
                          "precision": "fp32", "data_workers": 0,
                          "data": [{"shards": str(tmp / "shapes" / "vqa-*.tar"), "task": "vqa"}]}]}
    path = tmp / "init.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["siglip", "clip", "qwen2_vl"])
def test_a_recipe_starts_from_a_published_layout_trains_and_exports(kind, tmp_path):
    checkpoint, source = write_checkpoint(tmp_path, kind)
    if kind != "qwen2_vl":  # the checkpoint is written under llava-hf's published names
        index = load_file(checkpoint / "model.safetensors")
        assert {pattern(n) for n in index if "vision_tower" not in n} <= {pattern(n) for n in PUBLISHED}
    extra = {"vision_encoder": {"min_pixels": 1024, "max_pixels": 4096}} if kind == "qwen2_vl" else {}
    recipe = init_recipe(tmp_path, checkpoint, ["projector"], **extra)
    checked = kakehashi("recipe", "check", recipe, "--json")  # offline, from the checkpoint's files
    assert checked.returncode == 0, checked.stderr[-2000:]
    params = json.loads(checked.stdout)["params"]
    family = QWEN2VL if kind == "qwen2_vl" else LLAVA
    assert params == family.parameter_counts(source)
    done = kakehashi("train", recipe, "--output", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]

    trained = load_file(tmp_path / "run" / "stages" / "01-tune" / "model.safetensors")
    names = {c: [n for n, _ in ps] for c, ps in family.component_parameters(source).items()}
    before = source.state_dict()
    assert all(torch.equal(trained[n], before[n]) for n in names["vision_encoder"] + names["llm"])  # frozen
    assert not all(torch.equal(trained[n], before[n]) for n in names["projector"])
    exported, _ = family.load_export(tmp_path / "run" / "export")
    assert all(torch.equal(exported.state_dict()[n], trained[n]) for n in trained)


@pytest.mark.parametrize("edit, message", [
    ({"init": "/no/such/checkpoint"}, "model: no such directory: /no/such/checkpoint"),
    ({"llm": {"config": {"hidden_size": 32}}}, "model: llm.config.hidden_size: 32 in the recipe, 128 in model.init"),
    ({"vision_encoder": {"kind": "clip"}}, "model: vision_encoder.kind: 'clip' in the recipe, 'siglip' in model.init"),
    ({"llm": {"path": "/models/llm"}}, "model: llm.path: the weights come from model.init"),
])
def test_a_bad_init_is_one_line_naming_the_field(edit, message, tmp_path):
    checkpoint, _ = write_checkpoint(tmp_path, "siglip")
    recipe = init_recipe(tmp_path, checkpoint, ["projector"], **{k: v for k, v in edit.items() if k != "init"})
    if "init" in edit:
        text = yaml.safe_load(recipe.read_text())
        text["model"]["init"] = edit["init"]
        recipe.write_text(yaml.safe_dump(text))
    done = kakehashi("recipe", "check", recipe, "--skip-data")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr, done.stderr


def test_a_checkpoint_of_an_unknown_layout_is_refused(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    recipe = init_recipe(tmp_path, tmp_path / "bert", ["projector"])
    done = kakehashi("recipe", "check", recipe, "--skip-data")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model_type 'bert' is not a layout kakehashi reads (llava, sarashina2_vision)" in done.stderr


def test_a_checkpoint_whose_tensors_do_not_fit_the_recipe_is_refused_by_check_and_train_naming_them(tmp_path):
    """An Asagi-layout checkpoint (its projector twice the LLM's width, as the release's conversion scripts write
    the 8B and 14B) under a recipe whose projector is the LLM's width: exit 2 naming each tensor and both shapes,
    in `recipe check` and in `train`, before anything is built."""
    from safetensors.torch import save_file

    checkpoint, _ = write_checkpoint(tmp_path, "siglip")
    weights = load_file(checkpoint / "model.safetensors")
    weights["multi_modal_projector.linear_1.weight"] = torch.zeros(256, 64)
    weights["multi_modal_projector.linear_1.bias"] = torch.zeros(256)
    weights["multi_modal_projector.linear_2.weight"] = torch.zeros(128, 256)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    recipe = init_recipe(tmp_path, checkpoint, ["projector"])
    for command in (("recipe", "check", recipe, "--skip-data"), ("train", recipe, "--output", tmp_path / "run")):
        done = kakehashi(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert ("model.init: model.multi_modal_projector.linear_1.bias: shape (256,) in the checkpoint, (128,) in the "
                "model the recipe builds") in done.stderr
        assert "model.multi_modal_projector.linear_2.weight: shape (128, 256) in the checkpoint" in done.stderr
