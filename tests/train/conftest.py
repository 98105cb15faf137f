import os
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO, TINY_RECIPE
from tests.processes import run_watched
from train import distributed
from train.models.llava import LLAVA
from train.recipe import DataSource, Stage, load_recipe

IMAGE_TOKEN_ID = 4
VOCAB = 300


@pytest.fixture(scope="session")
def world():
    """A real (gloo) process group of one for in-process DeepSpeed engines.

    init_distributed writes RANK, MASTER_PORT, ... into os.environ; they are taken out again once the group exists
    (but LOCAL_RANK), or every `kakehashi` / torchrun subprocess a later test starts would inherit them and try to
    bind this group's port (EADDRINUSE).
    """
    before = dict(os.environ)
    rank, world_size = distributed.init_distributed()
    for key in set(os.environ) - set(before) - {"LOCAL_RANK"}:  # DeepSpeed's engine reads LOCAL_RANK at initialize
        del os.environ[key]
    yield rank, world_size
    distributed.close()


@pytest.fixture
def tiny_model():
    """The tiny recipe's architecture with a small vocabulary, random init from a fixed seed."""
    recipe = load_recipe(TINY_RECIPE, check_files=False)
    config = LLAVA.config(recipe.model, VOCAB, {"image": IMAGE_TOKEN_ID})
    torch.manual_seed(0)
    return LLAVA.build(recipe.model, config)


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


def short_recipe(tmp_path, *, zero_stage: int = 2, steps=(4, 6), save_every: int = 0, samples: int = 200,
                 stage_fields: dict | None = None, source=TINY_RECIPE, **top):
    """The tiny recipe (or another tiny `source`), shortened, on a small synthetic set under tmp_path, both stages
    on `zero_stage`."""
    recipe = yaml.safe_load(source.read_text())
    data = tmp_path / "shapes"
    recipe["synthesize"].update(out=str(data), samples=samples)
    recipe.update(top)
    for stage, n in zip(recipe["stages"], steps):
        stage.update(steps=n, zero_stage=zero_stage, save_every=save_every, **(stage_fields or {}))
        for source in stage["data"]:
            source["shards"] = source["shards"].replace("data/tiny-shapes", str(data))
    path = tmp_path / f"zero{zero_stage}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def with_eval(recipe_path, *, eval_every=2, eval_samples=8, eval_generate=2, stage=1, **stage_fields):
    """Turn periodic eval on in one stage of a short recipe, on the first samples of that stage's own sources."""
    recipe = yaml.safe_load(recipe_path.read_text())
    target = recipe["stages"][stage]
    target.update(eval_every=eval_every, eval_samples=eval_samples, eval_generate=eval_generate, **stage_fields,
                  eval_data=[{"shards": s["shards"], "task": s["task"]} for s in target["data"]])
    recipe_path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return recipe_path


def losses(run) -> dict:
    """(stage, step) -> loss from metrics.jsonl; a step logged twice (before a kill, after resume) keeps the last."""
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["stage"], r["step"]): r["loss"] for r in records if r.get("kind") != "eval"}  # train records only


def torchrun(recipe, output, *args, env=None, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "train", str(recipe), "--output", str(output), *map(str, args)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return run_watched(command, cwd=REPO, env=env)
