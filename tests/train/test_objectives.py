"""Preference objectives (train/objectives.py): the losses against hand computations, and a whole DPO / MPO loss
and its gradients against TRL's own DPOTrainer on the same model and the same batch."""

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.conftest import TINY_RECIPE
from train.models import model_config
from train.models.llava import LLAVA
from train.objectives import PairCounts, pair_loss, preference_losses, quality_losses
from train.recipe import MpoWeights, PreferenceSpec, load_recipe
from train.run import build_processor

# two pairs: policy and reference log-probabilities, and the answers' token counts
CHOSEN, REJECTED = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
REF_CHOSEN, REF_REJECTED = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -4.0])
TOKENS_CHOSEN, TOKENS_REJECTED = torch.tensor([2.0, 5.0]), torch.tensor([4.0, 1.0])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_each_preference_loss_is_its_formula_by_hand(loss, smoothing):
    beta = 0.5
    got = preference_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta, loss=loss,
                            label_smoothing=smoothing, chosen_tokens=TOKENS_CHOSEN, rejected_tokens=TOKENS_REJECTED)
    # pair 0: chosen ratio 0.5, rejected ratio -1.0 -> margin 1.5; pair 1: -1.0 and -0.5 -> margin -0.5
    margins = [1.5, -0.5]
    if loss == "sigmoid":
        expected = [-(1 - smoothing) * log_sigmoid(beta * m) - smoothing * log_sigmoid(-beta * m) for m in margins]
    elif loss == "hinge":
        expected = [max(0.0, 1 - beta * m) for m in margins]
    else:  # per-token ratios: pair 0: 0.5/2 - (-1.0)/4 = 0.5; pair 1: -1.0/5 - (-0.5)/1 = 0.3
        expected = [(0.5 - 1 / (2 * beta)) ** 2, (0.3 - 1 / (2 * beta)) ** 2]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_the_quality_loss_judges_each_answer_against_the_reference_on_its_own():
    got = quality_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    expected = [-log_sigmoid(0.5 * 0.5) - log_sigmoid(-0.5 * -1.0), -log_sigmoid(0.5 * -1.0) - log_sigmoid(-0.5 * -0.5)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_the_policy_at_the_reference_scores_log_2_whatever_the_answers():
    same = preference_losses(CHOSEN, REJECTED, CHOSEN, REJECTED, beta=0.1)
    assert same.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-7)


# ------------------------------------------------------------------------------------------------ against TRL


def shape_image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    image.paste(colour, (16, 16, 48, 48))
    return image


def trl_examples() -> list[dict]:
    def turn(role, text, image=False):
        return [{"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}]

    return [{"images": [shape_image((220, 30, 30))], "prompt": turn("user", "この図形は何色ですか？", image=True),
             "chosen": turn("assistant", "この図形は赤色です。"), "rejected": turn("assistant", "赤色です。")},
            {"images": [shape_image((30, 60, 220))], "prompt": turn("user", "この図形は何ですか？", image=True),
             "chosen": turn("assistant", "四角形です。"), "rejected": turn("assistant", "円です。")}]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    recipe = load_recipe(TINY_RECIPE, check_files=False)
    processor = build_processor(recipe, tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    model = LLAVA.build(recipe.model, model_config(recipe.model, processor.tokenizer))
    return model, processor


@pytest.fixture
def trainer_state_undone():
    """accelerate's state, made by the Trainer, undone afterwards: with a process group alive in this process (the
    session's `world`), it writes RANK and the like into os.environ, and a `kakehashi` subprocess of a later test
    that inherits RANK without MASTER_ADDR would take DeepSpeed's MPI discovery path and fail."""
    before = dict(os.environ)
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(before)


@pytest.mark.parametrize("objective", ["dpo", "mpo"])
def test_the_loss_and_its_gradients_equal_trls_dpo_trainer_on_the_same_model_and_batch(objective, tiny_llava,
                                                                                      tmp_path, trainer_state_undone):
    """TRL's DPOTrainer (sigmoid; MPO as loss_type [sigmoid, bco_pair, sft] with InternVL's weights) on one batch of
    two pairs, against ours on the batch TRL collated: the rows TRL builds ([chosen..., rejected...]), the images
    once per pair (TRL repeats them), our forward with pair_images and our pair_loss. Loss and every gradient 1e-5."""
    trl = pytest.importorskip("trl")
    base, processor = tiny_llava
    weights = MpoWeights()
    spec = PreferenceSpec(beta=0.1)
    types, loss_weights = (["sigmoid"], [1.0]) if objective == "dpo" else \
        (["sigmoid", "bco_pair", "sft"], [weights.preference, weights.quality, weights.generation])
    config = trl.DPOConfig(output_dir=str(tmp_path), beta=spec.beta, loss_type=types, loss_weights=loss_weights,
                           per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                           max_length=None, remove_unused_columns=False)
    import datasets

    theirs = copy.deepcopy(base).train()
    trainer = trl.DPOTrainer(model=theirs, ref_model=copy.deepcopy(base).eval(), args=config,
                             train_dataset=datasets.Dataset.from_list(trl_examples()), processing_class=processor)
    batch = trainer.data_collator(trl_examples())
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()

    ours = copy.deepcopy(base).train()
    pairs = batch["input_ids"].shape[0] // 2
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
              "pixel_values": batch["pixel_values"][:pairs], "pair_images": True}
    with torch.no_grad():
        ref, _ = LLAVA.training_module(copy.deepcopy(base).eval())(**inputs)
    logps, tokens = LLAVA.training_module(ours)(**inputs)
    chosen_targets = float((inputs["labels"][:pairs, 1:] != -100).sum())
    stage = SimpleNamespace(objective=objective, preference=spec)
    loss, _ = pair_loss(SimpleNamespace(stage=stage), logps, tokens, ref, PairCounts(pairs, chosen_targets))
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    theirs_grads = dict(theirs.named_parameters())
    compared = []
    for name, param in ours.named_parameters():
        other = theirs_grads[name].grad
        assert (param.grad is None) == (other is None), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, other, rtol=1e-5, atol=1e-7, msg=name)
            compared.append(name)
    # every parameter the forward uses: all but SigLIP's pooling head and post-layernorm (feature_layer -1 reads
    # the last hidden state before them)
    unused = [n for n, _ in ours.named_parameters() if n not in compared]
    assert unused and all(".head." in n or "post_layernorm" in n for n in unused), unused
    assert any(n.startswith("model.vision_tower.") for n in compared)
