"""Packed rows are the same computation as one sample per row: equal loss, no attention across samples."""

import pytest
import torch

from data_pipelines.batch.collate import collate
from data_pipelines.batch.pack import collate_packed
from data_pipelines.render.example import Example
from tests.train.conftest import IMAGE_TOKEN_ID, VOCAB
from train.models.llava import LlavaForTraining


def make_example(generator, key, text_tokens, image: bool, targets: int) -> Example:
    ids = [1] + ([IMAGE_TOKEN_ID] * 16 if image else []) + torch.randint(5, VOCAB, (text_tokens,),
                                                                         generator=generator).tolist()
    labels = [-100] * (len(ids) - targets) + ids[len(ids) - targets:]
    pixels = torch.randn(1, 3, 32, 32, generator=generator) if image else None
    return Example(key=key, source="s", input_ids=ids, labels=labels, pixel_values=pixels)


@pytest.fixture
def examples():
    generator = torch.Generator().manual_seed(0)
    shapes = [(10, True, 6), (25, True, 12), (7, False, 5), (30, True, 20), (3, True, 3)]
    return [make_example(generator, f"s{i}", *shape) for i, shape in enumerate(shapes)]


def loss(model, batch, packed: bool):
    extra = {"position_ids": batch["position_ids"]} if packed else {}
    with torch.no_grad():
        loss_sum, targets = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  pixel_values=batch["pixel_values"], **extra)
    assert int(targets) == batch["num_target_tokens"]
    return loss_sum / targets


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss_over_the_same_samples(tiny_model, examples, attention):
    tiny_model.set_attn_implementation(attention)
    model = LlavaForTraining(tiny_model.eval())
    unpacked = collate(examples, pad_token_id=0)
    packed = collate_packed([examples[:3], examples[3:]], pad_token_id=0)
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()
    assert packed["num_target_tokens"] == unpacked["num_target_tokens"]
    assert abs(loss(model, packed, True) - loss(model, unpacked, False)) < 1e-5


def test_changing_one_sample_does_not_change_another_samples_logits(tiny_model, examples):
    model = LlavaForTraining(tiny_model.eval())
    first, second = examples[1], examples[2]
    changed = Example(key="x", source="s", input_ids=first.input_ids[:1] + [IMAGE_TOKEN_ID] * 16 + [9] * 25,
                      labels=first.labels, pixel_values=torch.zeros_like(first.pixel_values))

    def second_logits(row, packed=True):
        batch = collate_packed([row], pad_token_id=0)
        with torch.no_grad():
            logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                  batch["position_ids"] if packed else None)
        return logits[0, len(row[0].input_ids):len(row[0].input_ids) + len(second.input_ids)]

    assert torch.allclose(second_logits([first, second]), second_logits([changed, second]), atol=1e-6)
    # the check can fail: one causal sequence over the row (no packing) lets the second sample see the first
    assert not torch.allclose(second_logits([first, second], False), second_logits([changed, second], False), atol=1e-3)
