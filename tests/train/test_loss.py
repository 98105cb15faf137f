"""The training loss (train/models/base.py: lm_loss_sum): the chunked linear cross-entropy gives the full-logits
path's loss and gradients (fp32, 1e-6) for both families, with tied embeddings, LoRA on the LM head, packed rows and
under a ZeRO-3 engine; the recipe's loss field and its refusals."""

import copy
import importlib.util
import json

import pytest
import torch

from tests.conftest import TINY_RECIPE
from tests.train.conftest import IMAGE_TOKEN_ID, VOCAB, make_stage, random_batch
from tests.train.test_qwen2vl import SARASHINA, images, text_with_images
from train.engine import train_stage
from train.hooks import stage_hooks
from train.lora import inject_adapters
from train.models.llava import LLAVA, LlavaForTraining
from train.models.loss import loss_of
from train.models.qwen2vl import QWEN2VL
from train.recipe import RecipeError, load_recipe
from train.reporting import MetricsLog

CHUNKS = [7, 32, 4096]  # 78 shifted tokens: 7 and 32 do not divide it, 4096 is one chunk


def loss_and_grads(forward, model, loss, *inputs):
    """(loss sum, target count, {name: gradient}) of one forward + backward with `loss` = (kind, chunk size).

    The gradients are those of the mean token loss, which the engine optimises (the sum over the targets of a step,
    divided by their count): the sum's own gradients are tens of times larger, and so are their float roundings."""
    model.kakehashi_loss = loss
    model.zero_grad(set_to_none=True)
    loss_sum, count = forward(*inputs)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_sum.detach(), count, grads


def assert_same(full, chunked):
    (loss_full, count_full, grads_full), (loss_chunked, count_chunked, grads_chunked) = full, chunked
    assert loss_chunked.dtype == torch.float32 and count_chunked == count_full
    torch.testing.assert_close(loss_chunked, loss_full, rtol=1e-6, atol=1e-6)
    assert grads_chunked.keys() == grads_full.keys() and grads_full
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_chunked[name], grad, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def llava_inputs(seed=1):
    batch = random_batch(torch.Generator().manual_seed(seed), 2, 40, 20)
    return batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_loss_equals_the_full_logits_loss_llava(tiny_model, chunk):
    forward = LlavaForTraining(tiny_model)
    full = loss_and_grads(forward, tiny_model, ("full", 0), *llava_inputs())
    assert_same(full, loss_and_grads(forward, tiny_model, ("chunked", chunk), *llava_inputs()))


def test_chunked_loss_with_tied_embeddings():
    recipe = load_recipe(TINY_RECIPE, check_files=False)
    config = LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID})
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LLAVA.build(recipe.model, config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    forward = LlavaForTraining(model)
    full = loss_and_grads(forward, model, ("full", 0), *llava_inputs())
    assert_same(full, loss_and_grads(forward, model, ("chunked", 7), *llava_inputs()))


def test_chunked_loss_with_lora_on_the_llm(tiny_model):
    stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-3, "llm": 1e-3},
                       lora={"llm": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    inject_adapters(LLAVA, tiny_model, stage)
    with torch.no_grad():  # adapters start as a no-op (B = 0); make them matter
        for name, param in tiny_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    assert any("lora_A" in name for name, _ in tiny_model.named_parameters())
    forward = LlavaForTraining(tiny_model)
    full = loss_and_grads(forward, tiny_model, ("full", 0), *llava_inputs())
    assert_same(full, loss_and_grads(forward, tiny_model, ("chunked", 7), *llava_inputs()))


@pytest.mark.parametrize("chunk", [5, 4096])
def test_chunked_loss_equals_the_full_logits_loss_qwen2vl_packed(chunk):
    recipe = load_recipe(SARASHINA, check_files=False)
    torch.manual_seed(0)
    model = QWEN2VL.build(recipe.model, QWEN2VL.config(recipe.model, VOCAB, {"image": 4}))
    assert loss_of(model) == (recipe.model.loss, recipe.model.loss_chunk_size)
    first, second = text_with_images([], length=20, seed=1), text_with_images([], length=23, seed=2)
    packed = torch.cat([first, second], dim=1)  # one packed row of two samples: position ids restart
    position_ids = torch.cat([torch.arange(20), torch.arange(23)]).unsqueeze(0)
    labels = packed.clone()
    labels[0, 20] = -100  # the second sample's first token is no target of the first
    inputs = (packed, torch.ones_like(packed), labels, None, None, position_ids)
    full = loss_and_grads(model, model, ("full", 0), *inputs)
    assert_same(full, loss_and_grads(model, model, ("chunked", chunk), *inputs))
    pixels, grid = images([[1, 4, 4]])  # and with an image (4 tokens after the 2x2 merge)
    text = text_with_images([4])
    with_image = (text, torch.ones_like(text), text.clone(), pixels, grid)
    assert_same(loss_and_grads(model, model, ("full", 0), *with_image),
                loss_and_grads(model, model, ("chunked", 9), *with_image))


def test_chunked_loss_trains_like_the_full_loss_under_zero3(world, tiny_model, tmp_path):
    """Two ZeRO-3 steps (the LM head partitioned, gathered by each chunk's call and again in backward's recompute):
    the step's loss and gradient norm equal the full-logits run's. (Not the weights: AdamW's first steps turn the
    sign of near-zero gradients into whole learning-rate steps, so roundings there move weights by lr.)"""
    rank, world_size = world
    records = {}
    for kind, chunk in (("full", 0), ("chunked", 7)):
        model = copy.deepcopy(tiny_model)
        model.kakehashi_loss = (kind, chunk)
        generator = torch.Generator().manual_seed(3)
        batches = iter([random_batch(generator, 2, 40, 20) for _ in range(4)])
        stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-3, "llm": 1e-3}, max_grad_norm=1e9,
                           zero_stage=3)
        metrics = MetricsLog(tmp_path / f"{kind}.jsonl")
        train_stage(LLAVA, model, stage, batches, rank=rank, world_size=world_size,
                    hooks=stage_hooks(stage, rank=rank, metrics=metrics))
        records[kind] = [json.loads(line) for line in (tmp_path / f"{kind}.jsonl").read_text().splitlines()]
    assert len(records["full"]) == len(records["chunked"]) == 2
    for full, chunked in zip(records["full"], records["chunked"]):
        assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-6)
        assert chunked["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-6)


def test_the_recipe_chooses_the_loss_and_refuses_what_cannot_run():
    recipe = load_recipe(TINY_RECIPE, ["model.loss=full", "model.loss_chunk_size=64"], check_files=False)
    assert (recipe.model.loss, recipe.model.loss_chunk_size) == ("full", 64)
    assert load_recipe(TINY_RECIPE, check_files=False).model.loss == "chunked"
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_RECIPE, ["model.loss=fused", "model.loss_chunk_size=0", "model.loss_chunks=3"],
                    check_files=False)
    report = err.value.report()
    assert "model.loss" in report and "model.loss_chunk_size" in report and "model.loss_chunks" in report


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_liger_kernel_is_a_recipe_error_naming_the_field():
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_RECIPE, ["model.loss=liger"], check_files=False)
    assert "loss: liger needs the liger-kernel package" in err.value.report()


def _zero3_records(rank, world_size, kind, out):
    """Two ZeRO-3 steps on this rank's batches, whose lengths differ between ranks (so do their chunk counts)."""
    from tests.conftest import TINY_RECIPE as recipe_path

    recipe = load_recipe(recipe_path, check_files=False)
    torch.manual_seed(0)
    model = LLAVA.build(recipe.model, LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID}))
    model.kakehashi_loss = (kind, 7)
    generator = torch.Generator().manual_seed(10 + rank)
    batches = iter([random_batch(generator, 1, 40 + 19 * rank, 20) for _ in range(2)])
    stage = make_stage(train=["projector", "llm"], lr={"projector": 1e-3, "llm": 1e-3}, max_grad_norm=1e9,
                       zero_stage=3, global_batch_size=4, micro_batch_size=1, steps=1)
    metrics = MetricsLog(out) if rank == 0 else None
    train_stage(LLAVA, model, stage, batches, rank=rank, world_size=world_size,
                hooks=stage_hooks(stage, rank=rank, metrics=metrics))
    return [json.loads(line) for line in out.read_text().splitlines()] if rank == 0 else None


def test_chunked_loss_on_two_zero3_ranks_with_different_chunk_counts(tmp_path):
    """The partitioned head is gathered once per chunk call: a rank with fewer chunks pads with empty ones, so the
    ranks' all-gathers pair up (no hang) and the step equals the full-logits step."""
    from tests.ranks import run_on_ranks

    full = run_on_ranks(_zero3_records, "full", tmp_path / "full.jsonl")[0]
    chunked = run_on_ranks(_zero3_records, "chunked", tmp_path / "chunked.jsonl")[0]
    assert len(full) == len(chunked) == 1
    assert chunked[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-6)
    assert chunked[0]["grad_norm"] == pytest.approx(full[0]["grad_norm"], rel=1e-6)
