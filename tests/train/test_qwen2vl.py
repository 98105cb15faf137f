"""The Qwen2-VL-encoder model (train.qwen2vl): forward contract, ZeRO-3-safe dummy image, packing, export round
trip, partial unfreezing on a real DeepSpeed engine, and the recipe's refusals."""

import itertools

import pytest
import torch
import yaml

from tests.conftest import REPO, kakehashi
from tests.train.conftest import make_stage, random_batch
from train.engine import train_stage
from train.models.llava import LLAVA
from train.models.qwen2vl import QWEN2VL
from train.recipe import RecipeError, load_recipe, parse_recipe

SARASHINA = REPO / "recipes" / "tiny" / "sarashina-3stage.yaml"
VOCAB, IMAGE_ID = 300, 4
PATCH_DIM = 3 * 2 * 8 * 8  # channels x temporal patch x patch x patch


@pytest.fixture
def qwen_model():
    recipe = load_recipe(SARASHINA, check_files=False)
    torch.manual_seed(0)
    return QWEN2VL.build(recipe.model, QWEN2VL.config(recipe.model, VOCAB, {"image": IMAGE_ID})).eval()


def images(grids, seed=0):
    grid_thw = torch.tensor(grids)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid_thw.prod(-1).sum()), PATCH_DIM, generator=generator), grid_thw


def text_with_images(counts, length=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (1, length), generator=generator)
    at = 1
    for n in counts:  # each image's tokens, one text token apart
        input_ids[0, at:at + n] = IMAGE_ID
        at += n + 1
    return input_ids


def test_components_split_merger_as_projector(qwen_model):
    names = {c: [n for n, _ in ps] for c, ps in QWEN2VL.component_parameters(qwen_model).items()}
    assert all(n.startswith(("visual.patch_embed", "visual.blocks")) for n in names["vision_encoder"])
    assert all(n.startswith(("visual.merger", "norm.")) for n in names["projector"])
    assert any(n.startswith("norm.") for n in names["projector"])
    assert all(n.startswith("llm.") for n in names["llm"])
    assert sum(map(len, names.values())) == len(list(qwen_model.named_parameters()))


def test_images_of_different_sizes_give_their_own_token_counts_and_do_not_mix(qwen_model):
    pixels, grid = images([[1, 4, 8], [1, 2, 2]])  # 32 and 4 patches -> 8 and 1 tokens
    with torch.no_grad():
        together = qwen_model.image_features(pixels, grid)
        alone = [qwen_model.image_features(pixels[:32], grid[:1]), qwen_model.image_features(pixels[32:], grid[1:])]
    assert together.shape == (9, 64)
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    input_ids = text_with_images([8, 1])
    with torch.no_grad():
        logits = qwen_model.logits(input_ids, torch.ones_like(input_ids), pixels, grid)
    assert logits.shape == (1, 40, VOCAB)
    with pytest.raises(ValueError, match="9 image features"):
        qwen_model.logits(text_with_images([8, 2]), torch.ones_like(input_ids), pixels, grid)


def test_without_an_image_the_encoder_runs_but_contributes_nothing(qwen_model):
    input_ids = torch.randint(5, VOCAB, (2, 12))
    labels = input_ids.clone()
    loss_sum, targets = qwen_model(input_ids, torch.ones_like(input_ids), labels)
    plain = qwen_model.llm(input_ids=input_ids).logits
    expected = torch.nn.functional.cross_entropy(plain[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert int(targets) == 22 and torch.allclose(loss_sum, expected, atol=1e-4)
    loss_sum.backward()  # the vision encoder took part in the graph (ZeRO-3 gathers its parameters on every rank)
    block_grad = qwen_model.visual.blocks[0].mlp.fc1.weight.grad
    assert block_grad is not None and not block_grad.any()


def test_packed_rows_with_position_ids_equal_separate_samples(qwen_model):
    first, second = torch.randint(5, VOCAB, (1, 7)), torch.randint(5, VOCAB, (1, 5))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        together = qwen_model.logits(packed, torch.ones_like(packed), position_ids=position_ids)
        alone = [qwen_model.logits(t, torch.ones_like(t)) for t in (first, second)]
    assert torch.allclose(together, torch.cat(alone, dim=1), atol=1e-5)


def test_export_round_trip_gives_the_same_logits_and_token_expansion(qwen_model, tmp_path):
    from PIL import Image

    from train.chat import load_export
    from train.models import model_config
    from train.run import build_processor

    recipe = load_recipe(SARASHINA, check_files=False)
    processor = build_processor(recipe, tmp_path / "build")
    tokenizer = processor.tokenizer
    config = model_config(recipe.model, tokenizer)
    torch.manual_seed(1)
    model = QWEN2VL.build(recipe.model, config).eval()
    model.save_pretrained(tmp_path / "export")
    processor.save_pretrained(tmp_path / "export")
    loaded, loaded_processor = load_export(tmp_path / "export")
    inputs = loaded_processor(images=[Image.new("RGB", (64, 32), "red")], text="<image>\n何色?")
    ids = inputs["input_ids"][0].tolist()
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in recipe.model.image_start_end)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
    assert ids[ids.index(start) + 1:ids.index(end)] == [config.image_token_index] * 8  # 4 x 8 patches / 2 x 2
    with torch.no_grad():
        assert torch.equal(model.logits(**inputs), loaded.logits(**inputs))
    assert torch.equal(model.generate(**inputs, max_new_tokens=3), loaded.generate(**inputs, max_new_tokens=3))


def _train_partially(family, model, batch, blocks):
    before = [{n: p.detach().clone() for n, p in block.named_parameters()} for block in blocks]
    stage = make_stage(train=["vision_encoder", "projector"], lr={"vision_encoder": 1e-2, "projector": 1e-2},
                       vision_encoder_last_blocks=1, global_batch_size=2, micro_batch_size=2)
    _, summary = train_stage(family, model, stage, itertools.repeat(batch), rank=0, world_size=1)
    changed = [any(not torch.equal(p, before[i][n]) for n, p in block.named_parameters()) for i, block in enumerate(blocks)]
    return changed, summary


@pytest.mark.parametrize("kind", ["qwen2_vl", "siglip"])
def test_partial_unfreezing_trains_only_the_last_blocks(world, qwen_model, tiny_model, kind):
    if kind == "qwen2_vl":
        model = qwen_model.train()
        pixels, grid = images([[1, 4, 4], [1, 4, 4]])
        input_ids = text_with_images([4]).repeat(2, 1)
        input_ids[1] = text_with_images([4], seed=1)[0]
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
                 "pixel_values": pixels, "image_grid_thw": grid, "num_target_tokens": 78}
        blocks = list(model.visual.blocks)
    else:
        model = tiny_model
        batch = random_batch(torch.Generator().manual_seed(0), 2, 24, 17)
        blocks = list(model.model.vision_tower.encoder.layers)
    changed, summary = _train_partially(QWEN2VL if kind == "qwen2_vl" else LLAVA, model, batch, blocks)
    assert changed == [False] * (len(blocks) - 1) + [True]
    assert 0 < summary.trainable["vision_encoder"] < summary.trainable["vision_encoder"] + summary.frozen["vision_encoder"]


def _recipe_text(**edits):
    recipe = yaml.safe_load(SARASHINA.read_text())
    for path, value in edits.items():
        node = recipe
        *keys, last = path.split(".")
        for key in keys:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    return yaml.safe_dump(recipe, allow_unicode=True)


@pytest.mark.parametrize("edits, expected", [
    ({"model.vision_encoder.kind": "siglip", "model.vision_encoder.min_pixels": None,
      "model.vision_encoder.max_pixels": None}, "qwen2_vl_merger goes with qwen2_vl"),
    ({"model.vision_encoder.kind": "clip"}, "min_pixels / max_pixels apply to kind qwen2_vl only"),
    ({"model.projector.kind": "mlp2x_gelu"}, "does not fit vision_encoder.kind qwen2_vl"),
    ({"stages.0.vision_encoder_last_blocks": 1}, "stages.0: vision_encoder_last_blocks is set but the stage freezes"),
    ({"model.vision_encoder.min_pixels": 10_000}, "min_pixels 10000 is more than max_pixels 4096"),
    ({"model.projector.hidden_size": 256}, "projector.hidden_size applies to kind mlp2x_gelu only"),
])
def test_recipe_refuses_mismatched_parts(edits, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe(_recipe_text(**edits), check_files=False)
    assert expected in str(err.value)


def test_unfreezing_more_blocks_than_the_encoder_has_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(_recipe_text(**{"stages.1.vision_encoder_last_blocks": 4}))
    result = kakehashi("recipe", "check", path, "--skip-data")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stages.vision.vision_encoder_last_blocks: 4 is more than the vision encoder's 3 blocks" in result.stderr


def test_vision_weights_load_from_a_qwen2_vl_checkpoint_and_the_merger_starts_new(tmp_path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    recipe = load_recipe(SARASHINA, check_files=False)
    vision = dict(recipe.model.vision_encoder.config, hidden_size=48)  # its merger projects to 48, not our LLM's 64
    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=VOCAB)
    torch.manual_seed(3)
    checkpoint = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text))
    checkpoint.save_pretrained(tmp_path / "qwen2-vl")
    recipe.model.vision_encoder.path = str(tmp_path / "qwen2-vl")
    torch.manual_seed(0)
    model = QWEN2VL.build(recipe.model, QWEN2VL.config(recipe.model, VOCAB, {"image": IMAGE_ID}))
    source = checkpoint.model.visual.state_dict()
    assert all(torch.equal(p, source[n]) for n, p in model.visual.state_dict().items() if not n.startswith("merger."))
    assert model.visual.merger.mlp[2].weight.shape == (64, 128)  # new, at the LLM's width, and all of it new:
    assert not torch.equal(model.visual.merger.mlp[0].weight, source["merger.mlp.0.weight"])


def test_gradient_checkpointing_keeps_the_loss(qwen_model):
    pixels, grid = images([[1, 4, 4]])
    input_ids = text_with_images([4])
    loss, _ = qwen_model.train()(input_ids, torch.ones_like(input_ids), input_ids, pixels, grid)
    from train.engine import enable_fast_paths
    from train.stages import resolve_stage

    enable_fast_paths(QWEN2VL, qwen_model, resolve_stage(make_stage(gradient_checkpointing=True), 1))  # both towers, as the engine does
    checkpointed, _ = qwen_model(input_ids, torch.ones_like(input_ids), input_ids, pixels, grid)
    checkpointed.backward()
    assert torch.allclose(loss, checkpointed) and qwen_model.visual.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
