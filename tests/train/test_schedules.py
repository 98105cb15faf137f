"""Learning-rate schedules (stage `schedule`: cosine, wsd, constant): the recipe's checks, the multipliers, and the
rates a real DeepSpeed engine logs to metrics.jsonl."""

import json
import math

import pytest
import torch
import yaml

from tests.conftest import TINY_RECIPE
from tests.train.conftest import make_stage, random_batch
from train.engine import train_stage
from train.errors import RecipeError
from train.hooks import stage_hooks
from train.models.llava import LLAVA
from train.recipe import SCHEDULES, parse_recipe
from train.reporting import MetricsLog
from train.stages import lr_multiplier, warmup_cosine, wsd_phases


def test_cosine_stays_the_default_and_is_todays_function():
    stage = make_stage(steps=40, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert stage.schedule == "cosine"
    assert [lr_multiplier(stage)(s) for s in range(41)] == [warmup_cosine(stage)(s) for s in range(41)]


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_wsd_warms_up_holds_and_decays_at_the_recipes_steps(decay):
    stage = make_stage(steps=20, schedule="wsd", warmup_ratio=0.1, decay_ratio=0.25, decay=decay, min_lr_ratio=0.1)
    assert wsd_phases(stage) == (2, 15)
    f = lr_multiplier(stage)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert all(f(s) == 1.0 for s in range(2, 15))
    decaying = [f(s) for s in range(14, 20)]  # the last of 20 steps has index 19
    assert decaying[0] == 1.0 and all(a > b for a, b in zip(decaying, decaying[1:]))
    assert decaying[-1] == pytest.approx(0.1)
    shape = (1 - 0.4) if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 0.4))  # 2 of the 5 decay steps done
    assert f(16) == pytest.approx(0.1 + 0.9 * shape)


def test_constant_holds_after_the_warmup():
    f = lr_multiplier(make_stage(steps=10, schedule="constant", warmup_ratio=0.2))
    assert [f(s) for s in range(10)] == [0.5, 1.0] + [1.0] * 8


@pytest.mark.parametrize("fields, problem", [
    ({"schedule": "linear"}, "schedule: unknown schedule 'linear'; known: " + ", ".join(SCHEDULES)),
    ({"schedule": "wsd"}, "decay_ratio is missing"),
    ({"schedule": "wsd", "decay_ratio": 0.5, "decay": "step"}, "decay: unknown decay 'step'"),
    ({"schedule": "wsd", "decay_ratio": 0.9, "warmup_ratio": 0.2}, "warmup_ratio 0.2 + decay_ratio 0.9 is more than 1"),
    ({"decay_ratio": 0.2}, "decay_ratio is set but schedule is cosine"),
    ({"schedule": "constant", "decay": "cosine"}, "decay is set but schedule is constant"),
    ({"schedule": "cosine", "decay": "linear", "decay_ratio": None}, None),  # a resolved recipe spells defaults out
])
def test_the_recipe_names_a_bad_schedule(fields, problem):
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["stages"][0].update(fields)
    if problem is None:
        assert parse_recipe(yaml.safe_dump(recipe), check_files=False).stages[0].schedule == "cosine"
        return
    with pytest.raises(RecipeError) as error:
        parse_recipe(yaml.safe_dump(recipe), check_files=False)
    assert problem in str(error.value) and "stages.0" in str(error.value)


def test_a_wsd_stage_logs_warmup_flat_and_decay(world, tiny_model, tmp_path):
    """Ten optimizer steps on a real engine: warmup 2 steps, decay over the last 3, lr 1e-2 to 1e-3."""
    rank, world_size = world
    generator = torch.Generator().manual_seed(3)
    stage = make_stage(steps=10, schedule="wsd", warmup_ratio=0.2, decay_ratio=0.3, min_lr_ratio=0.1,
                       zero_stage=2)
    batches = iter([random_batch(generator, 2, 40, 20) for _ in range(20)])
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    train_stage(LLAVA, tiny_model, stage, batches, rank=rank, world_size=world_size,
                hooks=stage_hooks(stage, rank=rank, metrics=metrics))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    lrs = [r["lr"] for r in records]  # the rate each step trained with
    assert lrs[:2] == pytest.approx([5e-3, 1e-2])                 # warmup: steps 1-2
    assert lrs[2:7] == pytest.approx([1e-2] * 5)                  # stable: steps 3-7
    assert lrs[7:] == pytest.approx([7e-3, 4e-3, 1e-3])           # linear decay: steps 8-10, the last at the floor

