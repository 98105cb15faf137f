"""Multi-node launch without Slurm: two torchrun agents (one process each) meeting in a c10d rendezvous on localhost.

What "the same losses" can mean: the loader splits the data by rank (rank r of W reads its own slice of every
source, and draws the mixture of micro-batch k from (seed, rank, k)), so 2 ranks x micro 8 read other samples than
1 rank x micro 8 x accumulation 2. Exactly equal is therefore: 2 agents x 1 process == 1 agent x 2 processes
(`--standalone`), the same world size reached two ways. Against one process the runs train on other samples of the
same set, so only the learning is alike.
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, kakehashi
from tests.processes import Watched, run_watched, wait_all
from tests.train.conftest import losses, short_recipe, torchrun
from train import ports
from train.errors import EXIT_STALLED

pytestmark = pytest.mark.slow  # torchrun agents training together

STEPS = (2, 8)


def free_port() -> int:
    """The agents' c10d endpoint: told to both agents before the first binds it, so not bind(0)'s (train/ports.py)."""
    port = ports.stable_free_port(os.getpid())
    assert port is not None, "no free port below the ephemeral range"
    return port


def two_agents(recipe, output, envs=({}, {})):
    """Two torchrun agents, as on two nodes: --nnodes 2, one process each, c10d rendezvous on localhost; `envs`:
    what each agent's environment adds."""
    endpoint = f"localhost:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-agents",
               "-m", "train", str(recipe), "--output", str(output), "--no-export"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = wait_all([Watched(command, cwd=REPO, env={**env, **extra}, merge_output=True) for extra in envs])
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


# ---------------------------------------------------------------------------------------------- a lost rank

WATCHDOG_S = 45  # a step of the tiny recipe takes well under a second (seconds on a loaded machine, a checkpoint
# save or the first step's loader start included); the stage set-up is not watched
COLLECTIVE_TIMEOUT_S = 45  # the longest a rank waits on its peer in a healthy run: rank 0 writing the stage
# directory (a few MB); the data is synthesized before the launch (lost_rank_recipe)


def launch(recipe, output, *args, env=None):
    """The documented launcher: `python -m train.launch --standalone --nproc_per_node 2 -m train ...`."""
    command = [sys.executable, "-m", "train.launch", "--standalone", "--nproc_per_node", "2",
               "-m", "train", str(recipe), "--output", str(output), *map(str, args)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return run_watched(command, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def lost_rank_recipe(tmp_path_factory):
    """The short recipe with its data already synthesized: no rank waits on rank 0 writing it."""
    from train.recipe import load_recipe
    from train.run import synthesize_missing_data

    recipe = short_recipe(tmp_path_factory.mktemp("lost"), steps=STEPS, save_every=2,
                          stage_fields={"watchdog_s": WATCHDOG_S})
    synthesize_missing_data(load_recipe(recipe, check_files=False))
    return recipe


@pytest.fixture(scope="module")
def uninterrupted(lost_rank_recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = torchrun(lost_rank_recipe, run, "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def assert_same_losses_and_weights(run, reference):
    got, want = losses(run), losses(reference)
    assert got.keys() == want.keys()
    assert all(got[key] == pytest.approx(want[key], abs=1e-6) for key in want), (got, want)
    weights, expected = final_weights(run), final_weights(reference)
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in expected)


def test_a_stopped_rank_ends_the_job_through_the_watchdog_and_the_rerun_resumes(lost_rank_recipe, uninterrupted,
                                                                                tmp_path):
    """Rank 1 SIGSTOPs itself after step 5 of stage 2 (it hangs, it does not die); rank 0 waits for it in the next
    collective until its watchdog fires: stacks in the log, the stall recorded, exit 6 from the launcher too."""
    run = tmp_path / "run"
    stalled = launch(lost_rank_recipe, run, "--no-export", env={"KAKEHASHI_FAULT_STOP": "1:instruct:5"})
    assert stalled.returncode == EXIT_STALLED, stalled.stderr[-3000:]
    assert "stage instruct: no optimizer step completed in" in stalled.stderr
    assert "Thread 0x" in stalled.stderr and "File " in stalled.stderr  # faulthandler's stacks of every thread
    assert "train.launch: the workers stalled or lost a rank" in stalled.stderr
    record = json.loads((run / "stalls" / "rank00000.json").read_text())
    assert (record["stage"], record["step"], record["phase"]) == ("instruct", 5, "the Checkpoints hook after step 5")
    assert WATCHDOG_S <= record["seconds"] < WATCHDOG_S + 60  # polled every second; generous on a loaded machine
    assert (run / "checkpoints" / "02-instruct" / "latest").read_text().strip() == "step-0000004"

    resumed = launch(lost_rank_recipe, run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stderr
    assert_same_losses_and_weights(run, uninterrupted)


def test_a_killed_worker_of_one_agent_ends_the_whole_job_and_the_rerun_resumes(lost_rank_recipe, uninterrupted,
                                                                               tmp_path):
    """Two agents (as two nodes); the second one's worker is killed with kill -9 after step 5 of stage 2. The
    first one's worker finds its peer gone in the next collective and exits 6, naming it; both agents end."""
    run = tmp_path / "agents"
    codes, outputs = two_agents(lost_rank_recipe, run, envs=({}, {"KAKEHASHI_FAULT_KILL": "after_step:instruct:5"}))
    assert all(code != 0 for code in codes), codes
    survivor = outputs[0]
    assert "collective all_reduce called from train/hooks.py:" in survivor, survivor[-3000:]
    assert "(stage instruct, after step 5, in the Checkpoints hook after step 5)" in survivor
    assert "another rank is lost or stuck" in survivor

    codes, outputs = two_agents(lost_rank_recipe, run)
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert any("at step 4" in output for output in outputs)
    assert_same_losses_and_weights(run, uninterrupted)


def test_with_the_watchdog_off_a_stopped_rank_ends_the_job_at_the_collective_timeout(lost_rank_recipe, tmp_path):
    """The recipe's collective_timeout_s reaches the process group: rank 0's all-reduce gives up on the stopped rank
    after it, and the run ends with exit 6 and one line naming the collective and where the stage was."""
    run = tmp_path / "run"
    stalled = launch(lost_rank_recipe, run, "--no-export", "--set", "stages.1.watchdog_s=0", "--set",
                     f"collective_timeout_s={COLLECTIVE_TIMEOUT_S}", env={"KAKEHASHI_FAULT_STOP": "1:instruct:5"})
    assert stalled.returncode == EXIT_STALLED, stalled.stderr[-3000:]
    line = next(line for line in stalled.stderr.splitlines() if "kakehashi: error: rank 0: collective" in line)
    assert "kakehashi: error: rank 0: collective all_reduce called from train/hooks.py:" in line
    assert "(stage instruct, after step 5, in the Checkpoints hook after step 5)" in line
    assert f"Timed out waiting {COLLECTIVE_TIMEOUT_S * 1000}ms" in line
    assert not (run / "stalls").exists()  # the watchdog was off: the collective timeout ended it
