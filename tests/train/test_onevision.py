"""The tiled family (LLaVA-OneVision layout): its training forward is transformers' own on the same tiles, its
export loads in plain transformers exactly, its recipe fields are checked, and the tiny tiled recipe trains."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

from data_pipelines.image.pixels import normalize
from tests.conftest import REPO, kakehashi
from tests.pictures import noise_picture
from train.models import family_for, model_config
from train.models.onevision import ONEVISION
from train.recipe import load_recipe
from train.run import build_processor

TILED_RECIPE = REPO / "recipes" / "tiny" / "onevision-tiles.yaml"


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onevision")
    recipe = load_recipe(TILED_RECIPE, check_files=False)
    processor = build_processor(recipe, tmp / "cache")
    torch.manual_seed(0)
    model = ONEVISION.build(recipe.model, model_config(recipe.model, processor.tokenizer)).eval()
    return recipe, model, processor, tmp


def test_a_tiled_recipe_builds_the_onevision_family(tiled):
    recipe, model, _, _ = tiled
    assert family_for(recipe.model) is ONEVISION and isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert model.config.image_grid_pinpoints == [[32, 32], [32, 64], [32, 96], [32, 128], [64, 32], [64, 64],
                                                 [96, 32], [128, 32]]
    assert model.config.vision_aspect_ratio == "anyres_max_4"


@pytest.mark.parametrize("sizes", [[(100, 300)], [(300, 90)], [(64, 64)], [(40, 150), (90, 60)]],
                         ids=["wide", "tall", "square", "two-images"])
def test_the_training_forward_is_transformers_own_on_the_same_tiles(tiled, sizes):
    """Our forward (tiles as the loader cuts them, packed per image) gives the logits of
    LlavaOnevisionForConditionalGeneration.forward on the same pixels, image sizes and image counts."""
    recipe, model, processor, _ = tiled
    images = [noise_picture(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    tiler = ONEVISION.image_inputs(model.config, processor)["patchify"]
    tiles, layout = tiler(images)
    counts = tiler.tokens(layout)
    text = "".join("<image>" * n for n in counts) + "何色?"
    input_ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    pixels = normalize(tiles, mean, std)
    module = ONEVISION.training_module(model)
    with torch.no_grad():
        ours = module.logits(input_ids, torch.ones_like(input_ids), pixels, layout)
        per_image = torch.split(pixels, layout[:, 2].tolist())
        padded = torch.stack([torch.cat([p, p.new_zeros(max(layout[:, 2]) - len(p), *p.shape[1:])]) for p in per_image])
        theirs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=padded,
                       image_sizes=layout[:, :2], batch_num_images=torch.tensor([len(images)])).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_export_loads_in_plain_transformers_exactly(tiled):
    """AutoModelForImageTextToText reads the export as LlavaOnevisionForConditionalGeneration, every tensor equal;
    processor_config.json holds what LlavaOnevisionProcessor is built from."""
    _, model, processor, tmp = tiled
    ONEVISION.save_export(model, processor, tmp / "export")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp / "export")
    assert type(loaded) is LlavaOnevisionForConditionalGeneration
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    config = json.loads((tmp / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    names = safetensors_names(tmp / "export" / "model.safetensors")  # the published names, as llava-hf writes them
    assert "image_newline" in names and "vision_tower.vision_model.post_layernorm.weight" in names
    record = json.loads((tmp / "export" / "processor_config.json").read_text())
    assert record["processor_class"] == "LlavaOnevisionProcessor"
    assert (record["num_image_tokens"], record["vision_aspect_ratio"]) == (16, "anyres_max_4")
    assert record["image_processor"]["image_grid_pinpoints"] == model.config.image_grid_pinpoints


def safetensors_names(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("height,width", [(32, 32), (100, 300), (300, 90), (37, 150), (129, 64), (500, 380),
                                          (1000, 20), (64, 640)])
def test_image_token_counts_are_llava_onevision_processors(tiled, height, width):
    """Our count (the loader's, before packing) is LlavaOnevisionProcessor._get_number_of_features, called on a
    stand-in for the processor (building the real one needs torchvision, for its video half)."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    _, model, processor, _ = tiled
    stand_in = SimpleNamespace(image_processor=processor.image_processor, num_image_tokens=16,
                               vision_aspect_ratio="anyres_max_4")
    stand_in._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(stand_in, *a)
    theirs = LlavaOnevisionProcessor._get_number_of_features(stand_in, height, width, 32, 32)
    tiler = ONEVISION.image_inputs(model.config, processor)["patchify"]
    assert tiler.tokens(torch.tensor([[height, width, 2]])) == [theirs]
    assert processor.counts([[height, width]], [1]) == [theirs]
    assert processor.counts([[height, width]] * 2, [2]) == [17, 17]  # beside another image: squared + a newline


@pytest.mark.parametrize("override,message", [
    ("model.vision_encoder.kind=qwen2_vl", "vision_encoder.tiling: kind qwen2_vl does not tile"),
    ("model.vision_encoder.tiling.min_tiles=5", "min_tiles 5 is over max_tiles 4"),
    ("model.vision_encoder.select_strategy=default", "tiling takes full"),
    ("model.projector.hidden_size=256", "projector.hidden_size: tiling builds its projector at the LLM's width"),
])
def test_a_bad_tiling_setting_is_refused_at_recipe_check(tmp_path, override, message):
    result = kakehashi("recipe", "check", TILED_RECIPE, "--skip-data", "--set", override)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
