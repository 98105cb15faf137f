"""Optional fast paths change speed, never results: activation checkpointing per component, compiled LLM blocks."""

import copy
import importlib.util

import pytest
import torch

from tests.conftest import TINY_RECIPE
from tests.train.conftest import IMAGE_TOKEN_ID, VOCAB, make_stage, random_batch
from train.engine import enable_fast_paths
from train.models.llava import LLAVA, LlavaForTraining
from train.recipe import RecipeError, load_recipe
from train.stages import resolve_stage


def loss_and_grads(llava, batch):
    llava.train()
    loss_sum, targets = LlavaForTraining(llava)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 pixel_values=batch["pixel_values"])
    (loss_sum / targets).backward()
    return float((loss_sum / targets).detach()), {n: p.grad.clone() for n, p in llava.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fields", [{"gradient_checkpointing": ["llm"]}, {"gradient_checkpointing": True},
                                    {"compile": True}])
def test_fast_paths_give_the_same_loss_and_gradients(tiny_model, fields):
    batch = random_batch(torch.Generator().manual_seed(1), batch=2, length=40, targets_from=20)
    baseline = loss_and_grads(copy.deepcopy(tiny_model), batch)
    enable_fast_paths(LLAVA, tiny_model, resolve_stage(make_stage(**fields), 1))
    towers = {"vision_encoder": tiny_model.model.vision_tower, "llm": tiny_model.model.language_model}
    wanted = fields.get("gradient_checkpointing", [])
    wanted = ["vision_encoder", "llm"] if wanted is True else wanted
    for component, tower in towers.items():
        assert tower.is_activation_checkpointing == (component in wanted)
    loss, grads = loss_and_grads(tiny_model, batch)
    assert loss == pytest.approx(baseline[0], abs=1e-5)
    assert grads.keys() == baseline[1].keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, baseline[1][name], atol=1e-5), name


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_a_recipe_error_naming_the_field():
    recipe = load_recipe(TINY_RECIPE, ["model.attn_implementation=flash_attention_2"], check_files=False)
    with pytest.raises(RecipeError, match=r"model\.attn_implementation: flash_attention_2 is not available here"):
        LLAVA.build(recipe.model, LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID}))
