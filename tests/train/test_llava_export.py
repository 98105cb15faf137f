"""LLaVA exports in the published llava-hf layout: the names and shapes of a published checkpoint, sharded like
save_pretrained, the config fields consumers read, and transformers loading them exactly."""

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.conftest import REPO, TINY_RECIPE
from train.models import model_config
from train.models.llava import LLAVA, published_state_dict
from train.recipe import load_recipe
from train.run import build_processor

PUBLISHED = json.loads((REPO / "tests" / "fixtures" / "llava-1.5-7b-hf.weights.json").read_text())


def test_a_clip_llava_at_llava_1_5_shapes_exports_the_published_names_and_shapes():
    """Built at llava-1.5-7b-hf's architecture (on the meta device), our export writes exactly its tensor names,
    with the shapes its index holds."""
    config = PUBLISHED["config"]
    vision = dict(config["vision"], hidden_act="quick_gelu")
    text = dict(config["text"], model_type="llama")
    recipe = load_recipe(TINY_RECIPE, ["model.vision_encoder.kind=clip", "model.vision_encoder.select_strategy=default",
                                       "model.vision_encoder.feature_layer=-2"], check_files=False)
    recipe.model.vision_encoder.config, recipe.model.llm.config = vision, text
    with torch.device("meta"):
        model = LLAVA.build(recipe.model, LLAVA.config(recipe.model, text["vocab_size"], {"image": 32000}), load_weights=False)
        written = {name: list(tensor.shape) for name, tensor in published_state_dict(model).items()}
    assert sorted(written) == sorted(PUBLISHED["weights"])
    assert written == PUBLISHED["weights"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava-export")
    recipe = load_recipe(TINY_RECIPE, check_files=False)
    processor = build_processor(recipe, tmp / "cache")
    torch.manual_seed(0)
    model = LLAVA.build(recipe.model, model_config(recipe.model, processor.tokenizer)).eval()
    LLAVA.save_export(model, processor, tmp / "export", max_shard_size="300KB")
    return model, processor, tmp / "export"


def test_a_large_export_is_sharded_with_an_index_as_save_pretrained_does(tiny_export):
    _, _, export = tiny_export
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in export.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert all(name.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                                "language_model.lm_head.")) for name in index["weight_map"])
    assert not (export / "model.safetensors").exists()


def test_the_config_says_what_the_model_is(tiny_export):
    model, processor, export = tiny_export
    config = json.loads((export / "config.json").read_text())
    tokenizer = processor.tokenizer
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
    assert config["image_seq_length"] == 16  # 32 px / 8 px patches, squared; not LlavaConfig's 576
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-1, "full")
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>")
    assert (config["text_config"]["eos_token_id"], config["text_config"]["pad_token_id"]) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert json.loads((export / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}


def test_transformers_loads_the_published_layout_exactly(tiny_export):
    from PIL import Image

    model, _, export = tiny_export
    loaded = LlavaForConditionalGeneration.from_pretrained(export).eval()
    processor = AutoProcessor.from_pretrained(export)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    inputs = processor(images=[Image.new("RGB", (40, 30), "red")], text="<image>\n何色?", return_tensors="pt")
    assert inputs["input_ids"].eq(loaded.config.image_token_index).sum() == 16
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
