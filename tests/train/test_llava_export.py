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


def tiny_llava(tmp, *overrides):
    """The tiny recipe's model (with `overrides`), random init from a fixed seed, and its processor."""
    recipe = load_recipe(TINY_RECIPE, list(overrides), check_files=False)
    processor = build_processor(recipe, tmp / "cache")
    torch.manual_seed(0)
    return LLAVA.build(recipe.model, model_config(recipe.model, processor.tokenizer)).eval(), processor


def test_a_projector_wider_than_the_llm_is_exported_with_its_width_and_read_back_by_kakehashi(tmp_path):
    """projector.hidden_size 256, twice the LLM's width (the released Asagi 8B / 14B): the llava-hf names, the width
    in config.json; transformers' LlavaConfig has no field for it, so from_pretrained refuses the projector's shapes
    and kakehashi's load_export (eval, shapes-eval, chat) reads it, computing what trained."""
    from PIL import Image
    from safetensors import safe_open

    model, processor = tiny_llava(tmp_path, "model.projector.hidden_size=256")
    LLAVA.save_export(model, processor, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["projector_hidden_size"] == 256
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if n.startswith("multi_modal_projector.")}
    assert shapes == {"multi_modal_projector.linear_1.weight": (256, 64), "multi_modal_projector.linear_1.bias": (256,),
                      "multi_modal_projector.linear_2.weight": (128, 256), "multi_modal_projector.linear_2.bias": (128,)}
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path / "export")
    loaded, loaded_processor = LLAVA.load_export(tmp_path / "export")
    assert type(loaded) is LlavaForConditionalGeneration and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    inputs = loaded_processor(images=[Image.new("RGB", (40, 30), "red")], text="<image>\n何色?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert loaded.generation_config.pad_token_id == processor.tokenizer.pad_token_id


def test_a_projector_at_the_llms_width_exports_exactly_as_without_the_field(tmp_path):
    """projector.hidden_size equal to the LLM's width is transformers' own projector: the same files, byte for byte,
    as a recipe without the field (plain llava-hf, which transformers and vLLM load)."""
    for name, overrides in (("plain", ()), ("same-width", ("model.projector.hidden_size=128",))):
        model, processor = tiny_llava(tmp_path, *overrides)
        LLAVA.save_export(model, processor, tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "same-width").iterdir())
    assert all((tmp_path / "plain" / f).read_bytes() == (tmp_path / "same-width" / f).read_bytes() for f in files)
    assert "projector_hidden_size" not in json.loads((tmp_path / "plain" / "config.json").read_text())
