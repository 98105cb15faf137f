"""Every shipped recipe validates offline; the real-shape ones report the published component sizes."""

import json

import pytest

from tests.conftest import REPO, kakehashi

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def check(recipe):
    result = kakehashi("recipe", "check", recipe, "--json", "--skip-data", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_checks_offline(recipe):
    report = check(recipe)
    assert report["stages"] and all(sum(s["trainable"].values()) > 0 for s in report["stages"])


def test_asagi_2b_has_the_published_shapes_and_schedule():
    report = check(REPO / "recipes" / "asagi-2b.yaml")
    params = report["params"]
    assert 0.40e9 <= params["vision_encoder"] <= 0.44e9
    assert 1.75e9 <= params["llm"] <= 1.95e9
    assert params["projector"] == 1152 * 2048 + 2048 + 2048 * 2048 + 2048  # LLaVA's mlp2x_gelu
    pretrain, finetune = report["stages"]
    assert pretrain["trainable"] == {"vision_encoder": 0, "projector": params["projector"], "llm": 0}
    assert finetune["trainable"] == {"vision_encoder": 0, "projector": params["projector"], "llm": params["llm"]}
    assert (pretrain["zero_stage"], finetune["zero_stage"]) == (2, 3)


def test_sarashina2_vision_8b_has_the_published_shapes_and_schedule():
    report = check(REPO / "recipes" / "sarashina2-vision-8b.yaml")
    params = report["params"]
    assert 0.6e9 <= params["vision_encoder"] <= 0.7e9   # Qwen2-VL-7B's ViT without its merger
    assert 7.0e9 <= params["llm"] <= 7.6e9              # Sarashina2-7B
    # the 2x2 patch merger to the LLM width (LayerNorm(1280), 5120 -> 5120 -> 4096) + LayerNorm(4096) after it
    merger = 2 * 1280 + 5120 * 5120 + 5120 + 5120 * 4096 + 4096
    assert params["projector"] == merger + 2 * 4096
    projector, vision, instruct = report["stages"]
    assert projector["trainable"] == {"vision_encoder": 0, "projector": params["projector"], "llm": 0}
    assert vision["trainable"] == {"vision_encoder": params["vision_encoder"], "projector": params["projector"], "llm": 0}
    assert instruct["trainable"] == {"vision_encoder": 0, "projector": params["projector"], "llm": params["llm"]}
    assert [s["zero_stage"] for s in report["stages"]] == [2, 2, 3]


def test_tiny_sarashina_twin_unfreezes_only_the_last_vision_block():
    report = check(REPO / "recipes" / "tiny" / "sarashina-3stage.yaml")
    vision = report["stages"][1]
    assert 0 < vision["trainable"]["vision_encoder"] < report["params"]["vision_encoder"]
    assert vision["trainable"]["vision_encoder"] + vision["frozen"]["vision_encoder"] == report["params"]["vision_encoder"]
