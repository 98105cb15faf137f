"""FLOP accounting of the tiny model against a hand computation from its architecture."""

import pytest
import torch

from data_pipelines.batch.collate import collate
from data_pipelines.render.example import Example
from tests.train.conftest import IMAGE_TOKEN_ID, VOCAB, make_stage
from train import flops
from train.models.llava import LLAVA
from train.stages import plan_stage


def hand_parameter_counts():
    """The tiny recipe's architecture, written out: SigLIP d=64 f=128 2 layers patch 8 (+ pooling head), projector
    64->128->128, Llama D=128 F=384 2 layers vocab 300 untied. Embedding tables are left out (lookups)."""
    d, f, p = 64, 128, 8
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731 - weight + bias
    vision_layer = 4 * linear(d, d) + 2 * 2 * d + linear(d, f) + linear(f, d)
    head = d + linear(d, 3 * d) + linear(d, d) + 2 * d + linear(d, f) + linear(f, d)
    vision = 3 * p * p * d + d + 2 * vision_layer + 2 * d + head
    projector = linear(64, 128) + linear(128, 128)
    D, F = 128, 384
    llm = 2 * (4 * D * D + 3 * D * F + 2 * D) + D + VOCAB * D
    return vision, projector, llm


def batch():
    """Two samples of 40 and 30 tokens, one 16-token image each (16 patches of 8 px in a 32 px image)."""
    examples = [Example(key=f"k{n}", source="s", input_ids=[1] + [IMAGE_TOKEN_ID] * 16 + [7] * (n - 17),
                        labels=[-100] * 17 + [7] * (n - 17), pixel_values=torch.zeros(1, 3, 32, 32))
                for n in (40, 30)]
    return collate(examples, pad_token_id=0)


@pytest.mark.parametrize("train,factors", [
    (["projector"], (1, 3, 2)),                      # frozen vision upstream; gradients pass through the frozen LLM
    (["projector", "llm"], (1, 3, 3)),
    (["vision_encoder", "projector", "llm"], (3, 3, 3)),
])
def test_step_flops_match_a_hand_computation(tiny_model, train, factors):
    lr = {component: 1e-3 for component in train}
    plan = plan_stage(LLAVA, tiny_model, make_stage(train=train, lr=lr)).flops
    counts = flops.batch_counts(batch(), IMAGE_TOKEN_ID, LLAVA.vision_length(tiny_model.config))
    assert counts == {"vision_encoder": (32, 2 * 16**2), "projector": (32, 0), "llm": (70, 40**2 + 30**2)}
    vision, projector, llm = hand_parameter_counts()
    f_vision, f_projector, f_llm = factors
    expected = (f_vision * (2 * vision * 32 + 2 * 4 * 64 * 2 * 16**2)        # 2 layers, d=64, 2 images of 16 patches
                + f_projector * 2 * projector * 32                          # 32 image tokens
                + f_llm * (2 * llm * 70 + 2 * 4 * 128 * (40**2 + 30**2)))  # 2 layers, d=128, per sample
    assert plan.step_flops(counts) == expected


def test_a_projector_of_its_own_width_counts_with_it():
    """projector.hidden_size 256 (twice the LLM's 128, as the released Asagi 8B / 14B): 64->256->128."""
    from tests.conftest import TINY_RECIPE
    from train.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, ["model.projector.hidden_size=256"], check_files=False)
    model = LLAVA.build(recipe.model, LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID}))
    plan = plan_stage(LLAVA, model, make_stage()).flops  # trains the projector
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    assert plan.per_token["projector"] == 3 * 2 * (linear(64, 256) + linear(256, 128))


def test_peak_flops_comes_from_the_table_or_the_override(monkeypatch):
    monkeypatch.delenv(flops.PEAK_TFLOPS_ENV, raising=False)
    assert flops.peak_flops(torch.device("cpu")) is None  # unknown: MFU is not reported rather than guessed
    monkeypatch.setenv(flops.PEAK_TFLOPS_ENV, "2.5")
    assert flops.peak_flops(torch.device("cpu")) == 2.5e12
    assert flops.PEAK_TFLOPS["H100"] == flops.PEAK_TFLOPS["H200"] == 989.0
