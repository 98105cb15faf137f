"""LoRA / DoRA through peft: adapters only train, merge exactly, and the export stays a plain LLaVA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, kakehashi
from tests.train.conftest import IMAGE_TOKEN_ID, make_stage, random_batch
from train.lora import inject_adapters, merged_state_dict
from train.model import LlavaForTraining, build_model, llava_config
from train.recipe import load_recipe
from train.stages import apply_freeze_plan

LORA_RECIPE = REPO / "recipes" / "tiny" / "asagi-lora.yaml"


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_weights_compute_what_the_adapters_did(tiny_model, dora):
    recipe = load_recipe(LORA_RECIPE, check_files=False)
    config = tiny_model.config
    stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-3, "llm": 1e-3},
                       lora={"llm": {"rank": 4, "alpha": 8, "dora": dora}})
    inject_adapters(tiny_model, stage)
    table = apply_freeze_plan(tiny_model, stage)
    assert 0 < table["llm"]["trainable"] < 0.05 * (table["llm"]["trainable"] + table["llm"]["frozen"])
    assert all(("lora_" in n) == p.requires_grad for n, p in tiny_model.named_parameters() if "language_model" in n)
    with torch.no_grad():  # adapters start as a no-op (B = 0); make them matter
        for name, param in tiny_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    batch = random_batch(torch.Generator().manual_seed(0), 2, 40, 20)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        with_adapters = LlavaForTraining(tiny_model.eval()).logits(*inputs)
        merged, adapters = merged_state_dict(tiny_model.state_dict(),
                                             lambda: build_model(recipe.model, config, load_weights=False), stage)
        plain = build_model(recipe.model, config, load_weights=False)
        plain.load_state_dict(merged)  # strict: no adapter keys left
        merged_logits = LlavaForTraining(plain.eval()).logits(*inputs)
    assert adapters and all("lora_" in k for k in adapters)
    assert torch.allclose(merged_logits, with_adapters, atol=1e-5), (merged_logits - with_adapters).abs().max()


def test_lora_must_be_on_a_trained_component(tiny_recipe_text):
    from train.recipe import RecipeError, parse_recipe

    text = tiny_recipe_text.replace("    train: [projector]\n", "    train: [projector]\n    lora: {llm: {rank: 4}}\n", 1)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, check_files=False)
    assert any("lora.llm is set but the stage freezes llm" in p for p in caught.value.problems)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora")
    result = kakehashi("train", LORA_RECIPE, "--output", workdir / "run", cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "run"


def test_tiny_lora_recipe_trains_few_llm_parameters_and_exports_plain_llava(lora_run):
    summary = json.loads((lora_run / "stages" / "02-lora" / "summary.json").read_text())
    llm_total = summary["trainable"]["llm"] + summary["frozen"]["llm"]
    assert 0 < summary["trainable"]["llm"] < 0.05 * llm_total
    adapters = load_file(lora_run / "stages" / "02-lora" / "adapters" / "adapter_model.safetensors")
    assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)
    assert (lora_run / "stages" / "02-lora" / "adapters" / "llm" / "adapter_config.json").is_file()
    assert not any("lora_" in k or "base_layer" in k for k in load_file(lora_run / "export" / "model.safetensors"))
    from transformers import LlavaForConditionalGeneration

    exported = LlavaForConditionalGeneration.from_pretrained(lora_run / "export").state_dict()
    before = load_file(lora_run / "stages" / "01-captions" / "model.safetensors")
    embed = "model.language_model.embed_tokens.weight"
    assert torch.equal(exported[embed], before[embed])  # not a LoRA target: frozen, bit-identical
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[q_proj], before[q_proj])  # the merged adapter moved it


def test_merged_lora_export_answers_the_colour_question(lora_run):
    from train.shapes_eval import shapes_accuracy

    report = shapes_accuracy(lora_run / "export", samples=100, seed=77)
    assert report["colour_accuracy"] >= 0.8, report
