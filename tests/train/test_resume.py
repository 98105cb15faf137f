"""Reliability through the real command: kill -9 and resume, torn checkpoints, non-finite steps, safe loading."""

import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kakehashi
from tests.train.conftest import losses, short_recipe, torchrun
from train.checkpoint import manifest

pytestmark = pytest.mark.slow  # whole trainings, killed and resumed

STEPS = (4, 10)  # stage 2 checkpoints every 2 steps


def final_weights(run):
    return load_file(run / "stages" / "02-instruct" / "model.safetensors")


def assert_same_run(run, reference):
    got, want = losses(run), losses(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    weights, expected = final_weights(run), final_weights(reference)
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in expected)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return short_recipe(tmp_path_factory.mktemp("recipe"), steps=STEPS, save_every=2)


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = kakehashi("train", recipe, "--output", run, "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_kill9_then_resume_equals_the_uninterrupted_run(recipe, uninterrupted, tmp_path):
    run = tmp_path / "run"
    killed = kakehashi("train", recipe, "--output", run, "--no-export",
                       env={"KAKEHASHI_FAULT_KILL": "after_step:instruct:7"})
    assert killed.returncode == -9
    assert (run / "checkpoints" / "02-instruct" / "latest").read_text().strip() == "step-0000006"
    resumed = kakehashi("train", recipe, "--output", run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 1/2 align: already complete" in resumed.stderr  # a log line; stdout holds the result only
    assert "resumed from" in resumed.stderr and "at step 6" in resumed.stderr
    assert_same_run(run, uninterrupted)


def test_torn_checkpoint_is_skipped_and_the_previous_one_used(recipe, uninterrupted, tmp_path):
    run = tmp_path / "run"
    killed = kakehashi("train", recipe, "--output", run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "in_save:instruct:6"})
    assert killed.returncode == -9
    checkpoints = run / "checkpoints" / "02-instruct"
    assert (checkpoints / ".tmp-step-0000006").is_dir() and not (checkpoints / "step-0000006").exists()
    resumed = kakehashi("train", recipe, "--output", run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping torn checkpoint" in resumed.stderr
    assert "at step 4" in resumed.stderr
    assert_same_run(run, uninterrupted)


@pytest.fixture(scope="module")
def killed_at_7(recipe, tmp_path_factory):
    """A run killed after step 7 of stage 2: complete checkpoints at steps 4 and 6."""
    run = tmp_path_factory.mktemp("killed") / "run"
    killed = kakehashi("train", recipe, "--output", run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "after_step:instruct:7"})
    assert killed.returncode == -9
    return run


def flip_a_byte(file):
    """One byte in the middle of the file changed (here: the file holding the AdamW moments, ZeRO-0's model
    states on one rank); torch's zip reader would load it without complaint."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_a_byte, truncate], ids=["byte-changed", "truncated"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(recipe, uninterrupted, killed_at_7, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(killed_at_7, run)
    newest = run / "checkpoints" / "02-instruct" / "step-0000006"
    damage(newest / "mp_rank_00_model_states.pt")
    named = kakehashi("train", recipe, "--output", run, "--no-export", "--resume", newest)
    assert named.returncode == 2  # named explicitly, a damaged checkpoint is refused: one line, no traceback
    assert "damaged checkpoint (mp_rank_00_model_states.pt" in named.stderr and "Traceback" not in named.stderr

    resumed = kakehashi("train", recipe, "--output", run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping damaged checkpoint {newest} (mp_rank_00_model_states.pt" in resumed.stderr
    assert "at step 4" in resumed.stderr
    assert_same_run(run, uninterrupted)


def size_of(directory):
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_a_checkpoint_that_fills_the_disk_leaves_the_previous_one_and_the_rerun_resumes(recipe, uninterrupted,
                                                                                      tmp_path, small_disk):
    """checkpoints/ on a tmpfs with room for stage 1's checkpoint and two of stage 2's, and half of a third: the
    third (step 6) fills it mid-write. After the space is freed (the tmpfs grown) the same command resumes."""
    align = size_of(uninterrupted / "checkpoints" / "01-align" / "step-0000002")
    instruct = size_of(uninterrupted / "checkpoints" / "02-instruct" / "step-0000006")
    run = tmp_path / "run"
    disk = small_disk(run / "checkpoints", align + 2 * instruct + instruct // 2)
    full = kakehashi("train", recipe, "--output", run, "--no-export", "--force")  # --force: run/ holds the mount
    assert full.returncode == 5, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kakehashi: error: no space left on device writing checkpoint {disk}/02-instruct/"
                           f".tmp-step-0000006 (") and "free of" in last
    assert "the previous checkpoint step-0000004 and `latest` are untouched" in last and "Traceback" not in full.stderr
    checkpoints = disk / "02-instruct"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    assert (checkpoints / "latest").read_text().strip() == "step-0000004"

    subprocess.run(["mount", "-o", f"remount,size={64 << 20}", str(disk)], check=True)  # space freed
    resumed = kakehashi("train", recipe, "--output", run, "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stderr and "skipping" not in resumed.stderr
    assert_same_run(run, uninterrupted)


def test_only_the_last_k_checkpoints_are_kept(uninterrupted):
    kept = sorted(p.name for p in (uninterrupted / "checkpoints" / "02-instruct").glob("step-*"))
    assert kept == ["step-0000006", "step-0000008"]  # keep_last 2; no checkpoint at the final step (the stage is)


def test_two_ranks_zero2_kill9_resume(tmp_path_factory):
    recipe = short_recipe(tmp_path_factory.mktemp("r2"), steps=(2, 6), save_every=2)
    reference, run = tmp_path_factory.mktemp("ref2") / "run", tmp_path_factory.mktemp("kill2") / "run"
    assert torchrun(recipe, reference, "--no-export").returncode == 0
    killed = torchrun(recipe, run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "after_step:instruct:5"})
    assert killed.returncode != 0
    result = torchrun(recipe, run, "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in result.stderr
    assert_same_run(run, reference)


def test_nan_on_one_rank_skips_the_step_everywhere(tmp_path):
    recipe = short_recipe(tmp_path, steps=(2, 5))
    run = tmp_path / "run"
    result = torchrun(recipe, run, "--no-export", env={"KAKEHASHI_FAULT_NAN": "1:3"})
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [(r["stage"], r["step"]) for r in records if r["skipped"]]
    assert skipped == [("instruct", 3)]  # align has only 2 steps
    summary = json.loads((run / "stages" / "02-instruct" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in final_weights(run).values())


def test_skipped_step_leaves_parameters_unchanged(tmp_path):
    """Stage 2 with steps 1-2 then a NaN at 3 ends with exactly the weights of a 2-step stage 2."""
    constant_lr = {"warmup_ratio": 0.0, "min_lr_ratio": 1.0}  # so steps 1-2 see the same lr in both runs
    recipe = short_recipe(tmp_path, steps=(2, 3), stage_fields=constant_lr)
    (tmp_path / "b").mkdir()
    two_steps = short_recipe(tmp_path / "b", steps=(2, 2), stage_fields=constant_lr)
    a, b = tmp_path / "a-run", tmp_path / "b-run"
    assert kakehashi("train", recipe, "--output", a, "--no-export", env={"KAKEHASHI_FAULT_NAN": "0:3"}).returncode == 0
    assert kakehashi("train", two_steps, "--output", b, "--no-export").returncode == 0
    weights, expected = final_weights(a), final_weights(b)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_too_many_nonfinite_steps_stop_without_a_checkpoint(tmp_path):
    recipe = short_recipe(tmp_path, steps=(2, 8), save_every=1, max_nonfinite_steps=2)
    run = tmp_path / "run"
    result = kakehashi("train", recipe, "--output", run, "--no-export", env={"KAKEHASHI_FAULT_NAN": "0:4,5,6"})
    assert result.returncode == 3
    assert "2 optimizer steps in a row had a non-finite loss or gradient" in result.stderr
    assert "Traceback" not in result.stderr
    kept = sorted(p.name for p in (run / "checkpoints" / "02-instruct").glob("step-*"))
    assert kept == ["step-0000002", "step-0000003"]  # nothing after the first bad step
    assert not (run / "stages" / "02-instruct").exists()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_a_checkpoint_with_a_malicious_pickle_is_refused_and_runs_nothing(recipe, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "stages" / "02-instruct")
    checkpoint = run / "checkpoints" / "02-instruct" / "step-0000008"
    marker = tmp_path / "pwned"
    os.environ["PWNED_MARKER"] = str(marker)
    for state_file in checkpoint.glob("kakehashi-rank*.pt"):
        state_file.write_bytes(pickle.dumps(Payload()))
    complete = json.loads((checkpoint / "COMPLETE").read_text())
    complete["files"] = manifest(checkpoint)  # sizes and checksums forged too: the allowlist must still refuse it
    (checkpoint / "COMPLETE").write_text(json.dumps(complete))
    result = kakehashi("train", recipe, "--output", run, "--no-export", "--resume", checkpoint)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_resume_never_refuses_a_used_output_without_force(recipe, uninterrupted):
    result = kakehashi("train", recipe, "--output", uninterrupted, "--resume", "never")
    assert result.returncode == 2 and "--force" in result.stderr
    assert (uninterrupted / "stages" / "02-instruct" / "summary.json").is_file()


def test_a_two_rank_zero2_checkpoint_resumes_on_one_rank(tmp_path_factory):
    """Through the commands; the optimizer state carried both ways: test_zero3_elastic.py."""
    constant_lr = {"warmup_ratio": 0.0, "min_lr_ratio": 1.0}
    base = tmp_path_factory.mktemp("elastic")
    recipe = short_recipe(base, steps=(2, 6), save_every=2, stage_fields=constant_lr)
    (base / "ref").mkdir()
    four_steps = short_recipe(base / "ref", steps=(2, 4), stage_fields=constant_lr)
    reference, run = base / "ref-run", base / "run"
    assert torchrun(four_steps, reference, "--no-export").returncode == 0
    killed = torchrun(recipe, run, "--no-export", env={"KAKEHASHI_FAULT_KILL": "after_step:instruct:5"})
    assert killed.returncode != 0

    # one rank, stage 2 cut to 4 steps: nothing left to train, so its final weights are the checkpoint's
    cut = kakehashi("train", recipe, "--output", run, "--no-export", "--force", "--set", "stages.1.steps=4")
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "saved on 2 ranks; resuming on 1" in cut.stderr
    weights, expected = final_weights(run), final_weights(reference)
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6, rtol=0) for k in expected)

    shutil.rmtree(run / "stages" / "02-instruct")  # now finish the full 6 steps on one rank
    full = kakehashi("train", recipe, "--output", run, "--no-export", "--force")
    assert full.returncode == 0, full.stderr[-3000:]
    after = [loss for (stage, step), loss in losses(run).items() if stage == "instruct" and step > 4]
    assert len(after) == 2 and all(loss == loss and loss < 10 for loss in after)


def test_wandb_offline_one_run_per_stage_continued_after_a_kill(tmp_path):
    recipe = short_recipe(tmp_path, steps=(2, 6), save_every=2, wandb={"project": "kakehashi-test"})
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    killed = kakehashi("train", recipe, "--output", run, "--no-export", env={**env, "KAKEHASHI_FAULT_KILL": "after_step:instruct:5"})
    assert killed.returncode == -9
    ids = json.loads((run / "wandb.json").read_text())
    assert set(ids) == {"align", "instruct"} and ids["align"] != ids["instruct"]
    assert kakehashi("train", recipe, "--output", run, "--no-export", env=env).returncode == 0
    assert json.loads((run / "wandb.json").read_text()) == ids  # the resumed stage kept its run
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert sum(name.endswith(ids["instruct"]) for name in offline_runs) == 2  # the same run id, before and after
    assert sum(name.endswith(ids["align"]) for name in offline_runs) == 1
