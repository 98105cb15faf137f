"""`kakehashi submit` and preemption on a real one-node Slurm cluster (.ci/slurm-up starts it; skipped without sbatch).

The job is slurm/train.sbatch as submit renders it: one torchrun agent (train.launch) with 2 processes. Preemption
is what `#SBATCH --signal=USR1@N` does at the time limit: SIGUSR1 to the job's steps (`scancel --signal=USR1`).
The dry-run, validation and outside-Slurm tests need no cluster.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, kakehashi
from tests.train.conftest import losses, short_recipe, torchrun

STEPS = (2, 200)  # stage 2 long enough (about 20 s) to be signalled mid-stage
# Waits poll the job (or process) and end as soon as what they wait for happens, or fail as soon as it no longer
# can: a failed job state, a job or process that ended first. WAIT_BOUND only stops a wait that nothing decides; it
# is generous so that a loaded machine (2 cores shared with other tests) is not a failure. A traceback in the log
# decides nothing: when Slurm requeues a job it cancels the step, and on a loaded machine torchrun then prints
# ChildFailedError for a worker still exiting; the job's state and the run's files are what the tests check.
WAIT_BOUND = 900  # seconds
POLL = 0.5  # seconds between looks
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (sbatch not found); .ci/slurm-up installs and starts a one-node cluster")
    if os.geteuid() == 0:  # idempotent, and quick when the cluster is up already
        up = subprocess.run([str(REPO / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(state in ("idle", "mixed") for state in nodes):
        pytest.skip(f"no idle Slurm node (sinfo: {nodes}); run .ci/slurm-up as root")


def job_field(job: str, name: str) -> str:
    """A field of `scontrol show job`; '' when scontrol did not answer (a busy slurmctld: the next poll asks again)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    if "Invalid job id" in shown.stderr:  # finished more than MinJobAge ago, or never submitted
        raise AssertionError(f"slurmctld does not know job {job}: {shown.stderr.strip()}")
    match = re.search(rf"\b{name}=(\S+)", shown.stdout)
    return match.group(1) if match else ""


def log_tail(log, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else f"(no log at {log})"


def wait_for(predicate, what: str, failed=lambda: None, log=None):
    """Poll `predicate` until it returns a true value, and return that. `failed()` returns why waiting on is
    pointless (then fail at once), else None. Fails after WAIT_BOUND s only when neither has decided."""
    deadline = time.monotonic() + WAIT_BOUND
    while True:
        value = predicate()
        if value:
            return value
        problem = failed()
        if problem is None and time.monotonic() > deadline:
            problem = f"not within {WAIT_BOUND} s, and nothing failed"
        if problem:
            tail = f"\nlog tail:\n{log_tail(log)}" if log is not None else ""
            raise AssertionError(f"gave up waiting for {what}: {problem}{tail}")
        time.sleep(POLL)


def job_failed(job: str, log, *, completed_is_failure: bool = True):
    """A `failed` check for wait_for: the job reached a failed state (or, unless waited for, COMPLETED)."""
    def check() -> str | None:
        state = job_field(job, "JobState")
        if state in FAILED_STATES or (completed_is_failure and state == "COMPLETED"):
            return f"job {job} is {state} (reason {job_field(job, 'Reason') or '?'})"
        return None
    return check


def submit(recipe, output, *args) -> str:
    result = kakehashi("submit", recipe, "--output", output, "--nproc-per-node", 2, "--cpus-per-node", 2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    job = result.stdout.strip()
    assert job.isdigit(), result.stdout
    return job


def wait_until_finished(job: str, log) -> str:
    return wait_for(lambda: job_field(job, "JobState") == "COMPLETED" and "COMPLETED", f"job {job} to complete",
                    job_failed(job, log, completed_is_failure=False), log)


def final_weights(run):
    return load_file(run / "stages" / "02-instruct" / "model.safetensors")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return short_recipe(tmp_path_factory.mktemp("slurm-recipe"), steps=STEPS, samples=200)


@pytest.fixture(scope="module")
def uninterrupted(cluster, recipe, tmp_path_factory):
    """The recipe trained to the end as a Slurm job with 2 processes, with its export."""
    base = tmp_path_factory.mktemp("slurm-uninterrupted")
    run = base / "run"
    job = submit(recipe, run)
    log = base / "slurm-logs" / f"run-{job}.out"
    wait_until_finished(job, log)
    return run, job, log


@pytest.mark.slurm
@pytest.mark.slow
def test_a_submitted_job_trains_every_stage_on_two_processes_and_exports(uninterrupted):
    run, job, log = uninterrupted
    text = log.read_text()
    assert "1 node(s) x 2 process(es)" in text
    assert job_field(job, "Restarts") == "0"
    assert (run / "stages" / "02-instruct" / "summary.json").is_file()
    assert (run / "export" / "config.json").is_file() and (run / "export" / "model.safetensors").is_file()
    assert sorted({stage for stage, _ in losses(run)}) == ["align", "instruct"]
    assert len(losses(run)) == sum(STEPS)
    summary = json.loads((run / "stages" / "02-instruct" / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["samples"] for r in records if r["stage"] == "instruct" and "kind" not in r]
    assert summary["samples"] == sum(logged[-STEPS[1]:])  # both ranks' samples, as every step logged them
    assert summary["samples"] > STEPS[1] * 16  # 16 packed rows a step (the global batch) hold more samples


@pytest.mark.slurm
@pytest.mark.slow
def test_sigusr1_mid_stage_checkpoints_requeues_and_resumes_to_the_same_losses(uninterrupted, recipe, tmp_path):
    reference, _, _ = uninterrupted
    run = tmp_path / "run"
    job = submit(recipe, run)
    log = tmp_path / "slurm-logs" / f"run-{job}.out"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and '"stage": "instruct", "step": 5,' in metrics.read_text(),
             f"job {job}'s stage 2 to reach step 5", job_failed(job, log), log)
    # what `#SBATCH --signal=USR1@N` does before the time limit: USR1 to every step of the job (not the batch shell)
    signalled = subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr

    wait_for(lambda: job_field(job, "Restarts") == "1", f"job {job} to be requeued", job_failed(job, log), log)
    wait_until_finished(job, log)
    text = log.read_text()
    stopped = re.findall(r"stage instruct: stopped at step (\d+) on request; checkpoint saved", text)
    assert len(stopped) == 2 and len(set(stopped)) == 1, text[-4000:]  # both ranks, at the same step
    step = int(stopped[0])
    assert 5 <= step < STEPS[1]
    assert f"requeueing Slurm job {job}" in text
    assert f"resumed from {run / 'checkpoints' / '02-instruct' / f'step-{step:07d}'} at step {step}" in text
    assert "stage 1/2 align: already complete" in text
    assert (run / "export" / "config.json").is_file()

    got, want = losses(run), losses(reference)
    assert got.keys() == want.keys()
    after = [key for key in want if key[0] == "instruct" and key[1] > step]
    assert len(after) == STEPS[1] - step
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    weights, expected = final_weights(run), final_weights(reference)
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in expected)


def test_dry_run_renders_a_script_for_the_callers_python_without_submitting(recipe, tmp_path):
    result = kakehashi("submit", recipe, "--nodes", 2, "--gpus-per-node", 4, "--time", "2:00:00", "--partition", "gpu",
                       "--account", "lab", "--sbatch=--qos=high", "--set", "stages.0.micro_batch_size=2",
                       "--set", "stages.1.micro_batch_size=2", "--output", tmp_path / "run", "--dry-run")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=2:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", f"PYTHON={sys.executable}", "NPROC_PER_NODE=4"):
        assert line in script.splitlines(), line
    assert f"{recipe} --output {tmp_path / 'run'} --set stages.0.micro_batch_size=2" in script  # 16 / (2 x 8 ranks)
    assert not re.search(r"@[A-Z_]+@", script)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_cpu_only_nodes_run_one_process_each(recipe, tmp_path):
    result = kakehashi("submit", recipe, "--output", tmp_path / "run", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "NPROC_PER_NODE=1" in result.stdout.splitlines()
    assert "gpus-per-node" not in result.stdout


def test_a_bad_recipe_never_reaches_the_queue(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nseed: x\n")
    result = kakehashi("submit", bad, "--output", tmp_path / "run")
    assert result.returncode == 2
    assert "problem(s)" in result.stderr and "seed" in result.stderr


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused(recipe, tmp_path):
    result = kakehashi("submit", recipe, "--nodes", 3, "--output", tmp_path / "run")  # 16 / (8 x 3)
    assert result.returncode == 2
    assert "global_batch_size 16 is not a multiple of micro_batch_size x ranks = 8 x 3" in result.stderr
    assert not (tmp_path / "slurm-logs").exists()


@pytest.mark.slow
def test_outside_slurm_sigterm_to_the_agent_reaches_the_workers_which_save_and_exit_143(tmp_path):
    """train.launch passes the signal on: only the agent is signalled here, as `kill` or a scheduler would do."""
    recipe = short_recipe(tmp_path, steps=STEPS, samples=200)
    run, log = tmp_path / "run", tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a Slurm job: no requeue
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "train.launch", "--standalone", "--nproc_per_node", "2",
               "-m", "train", str(recipe), "--output", str(run), "--no-export"]
    with log.open("w") as out:
        agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        metrics = run / "metrics.jsonl"

        def agent_failed() -> str | None:
            return f"the agent exited {agent.returncode}" if agent.poll() is not None else None

        try:
            wait_for(lambda: metrics.is_file() and '"stage": "instruct", "step": 5,' in metrics.read_text(),
                     "stage 2 to reach step 5", agent_failed, log)
            agent.send_signal(signal.SIGTERM)
            wait_for(lambda: agent.poll() is not None, "the agent to exit after SIGTERM", log=log)
            assert agent.returncode == 143, log_tail(log)
        finally:
            agent.kill()
    text = log.read_text()
    stopped = re.findall(r"stage instruct: stopped at step (\d+) on request; checkpoint saved", text)
    assert len(stopped) == 2 and len(set(stopped)) == 1, text[-4000:]
    step = int(stopped[0])
    assert (run / "checkpoints" / "02-instruct" / f"step-{step:07d}" / "COMPLETE").is_file()
    assert "requeued" not in text

    resumed = torchrun(recipe, run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr
    assert len([key for key in losses(run) if key[0] == "instruct"]) == STEPS[1]
