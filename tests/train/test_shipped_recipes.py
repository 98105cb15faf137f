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
