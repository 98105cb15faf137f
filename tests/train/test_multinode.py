"""Multi-node launch without Slurm: two torchrun agents (one process each) meeting in a c10d rendezvous on localhost.

What "the same losses" can mean: the loader splits the data by rank (rank r of W reads its own slice of every
source, and draws the mixture of micro-batch k from (seed, rank, k)), so 2 ranks x micro 8 read other samples than
1 rank x micro 8 x accumulation 2. Exactly equal is therefore: 2 agents x 1 process == 1 agent x 2 processes
(`--standalone`), the same world size reached two ways. Against one process the runs train on other samples of the
same set, so only the learning is alike.
"""

import os
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, kakehashi
from tests.processes import Watched, wait_all
from tests.train.conftest import losses, short_recipe, torchrun

pytestmark = pytest.mark.slow  # torchrun agents training together

STEPS = (2, 8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_agents(recipe, output):
    """Two torchrun agents, as on two nodes: --nnodes 2, one process each, c10d rendezvous on localhost."""
    endpoint = f"localhost:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-agents",
               "-m", "train", str(recipe), "--output", str(output), "--no-export"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = wait_all([Watched(command, cwd=REPO, env=env, merge_output=True) for _ in range(2)])
    return [agent.returncode for agent in done], [agent.stdout for agent in done]


def final_weights(run):
    return load_file(run / "stages" / "02-instruct" / "model.safetensors")


def test_two_agents_train_exactly_as_two_processes_on_one_agent(tmp_path):
    recipe = short_recipe(tmp_path, steps=STEPS)
    codes, outputs = two_agents(recipe, tmp_path / "agents")
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    standalone = torchrun(recipe, tmp_path / "standalone", "--no-export")
    assert standalone.returncode == 0, standalone.stderr[-3000:]

    got, want = losses(tmp_path / "agents"), losses(tmp_path / "standalone")
    assert len(want) == sum(STEPS)
    assert got == want  # bit for bit: the same ranks read the same data and reduce in the same order
    weights, expected = final_weights(tmp_path / "agents"), final_weights(tmp_path / "standalone")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    # one process (micro 8 x accumulation 2) trains on other samples of the same set: the same start, alike learning
    single = kakehashi("train", recipe, "--output", tmp_path / "single", "--no-export")
    assert single.returncode == 0, single.stderr[-3000:]
    alone = losses(tmp_path / "single")
    assert alone.keys() == want.keys()
    for stage in ("align", "instruct"):
        two = [loss for (s, _), loss in sorted(want.items()) if s == stage]
        one = [loss for (s, _), loss in sorted(alone.items()) if s == stage]
        assert abs(sum(two) / len(two) - sum(one) / len(one)) < 0.03 * sum(one) / len(one), (stage, two, one)
