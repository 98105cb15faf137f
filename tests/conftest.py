import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny" / "asagi-2stage.yaml"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one intra-op thread in this process and every command it starts: `make test` runs two workers on 2 cores, each
# training with loader workers beside it, and torch's extra OpenMP threads spin while they wait for a core (a
# 66 s training took 14 min beside another so); each test compares runs made with the same count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# What a launcher (torchrun) sets. The in-process group of tests/train/conftest.py's `world` leaves LOCAL_RANK in this
# process's environment (DeepSpeed's engine reads it); a command started from here must not inherit it, or the
# Trainer inside `bench train --baseline trainer` takes itself for a torchrun worker and looks for MASTER_ADDR.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def kakehashi(*args, cwd=None, env=None):
    """Run the real console entry point in a fresh process; returns the CompletedProcess (waited on while it makes
    progress: tests/processes.py)."""
    from tests.processes import run_watched

    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return run_watched([sys.executable, "-m", "train.cli", *map(str, args)], cwd=cwd or REPO,
                       env={**inherited, **(env or {})})


@pytest.fixture
def tiny_recipe_text():
    return TINY_RECIPE.read_text(encoding="utf-8")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped on machines without it (CI's), so the suite passes without a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not the keyword: tests/gpu/ also holds CPU tests
            item.add_marker(skip)
