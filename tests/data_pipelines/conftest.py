"""Shared fixtures: the tiny tokenizer, a small synthetic shard set, and helpers to build real image bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.synthetic.synth import synthesize
from data_pipelines.synthetic.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-ja"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """60 caption + 60 VQA samples in 3 shards each."""
    out = tmp_path_factory.mktemp("shapes")
    synthesize(out, samples=60, seed=0, samples_per_shard=20, image_size=32)
    return out


def png(colour=(200, 30, 30), size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def make_png():
    return png


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """[n, 3, 16, 16] in [0, 1]: the smallest real image transform."""
    arrays = [np.asarray(image.resize((16, 16)), dtype=np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@pytest.fixture
def image_transform():
    return to_tensor
