import pytest
import torch

from train import distributed
from train.model import build_model, llava_config
from train.recipe import DataSource, Stage, load_recipe
from tests.conftest import TINY_RECIPE

IMAGE_TOKEN_ID = 4
VOCAB = 300


@pytest.fixture(scope="session")
def world():
    """A real (gloo) process group of one for in-process DeepSpeed engines."""
    rank, world_size = distributed.init_distributed()
    yield rank, world_size
    distributed.close()


@pytest.fixture
def tiny_model():
    """The tiny recipe's architecture with a small vocabulary, random init from a fixed seed."""
    recipe = load_recipe(TINY_RECIPE, check_files=False)
    config = llava_config(recipe.model, VOCAB, IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    return build_model(recipe.model, config)


def make_stage(**overrides) -> Stage:
    fields = dict(name="s", train=["projector"], lr={"projector": 1e-2}, steps=2, global_batch_size=4,
                  micro_batch_size=2, max_length=64, zero_stage=0, precision="fp32", warmup_ratio=0.0,
                  data=[DataSource(shards="unused.tar", task="caption")])
    fields.update(overrides)
    return Stage(**fields)


def random_batch(generator: torch.Generator, batch: int, length: int, targets_from: int, images: bool = True) -> dict:
    """A collated micro-batch: one 16-token image per sample at positions 1..16, targets from `targets_from` on."""
    input_ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    if images:
        input_ids[:, 1:17] = IMAGE_TOKEN_ID
    labels = input_ids.clone()
    labels[:, :targets_from] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator) if images else None,
        "num_target_tokens": int((labels[:, 1:] != -100).sum()),
    }
