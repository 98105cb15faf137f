"""The pieces that end hangs and survive damage, each on real parts: checkpoint checksums on real files, a full disk
on a real (size-limited) tmpfs, the stall watchdog in a real process, a collective that times out on a real 2-rank
gloo group. The whole runs (a stopped rank, a killed agent, a full disk mid-save, damaged checkpoints):
test_resume.py and test_multinode.py."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.ranks import run_on_ranks
from train import checkpoint
from train.errors import EXIT_STALLED, DiskFull, is_disk_full
from train.rundir import atomic_write_dir


def fake_checkpoint(path):
    """A directory with checkpoint-like files and a COMPLETE that lists them, as save() writes it."""
    path.mkdir(parents=True)
    torch.save({"w": torch.arange(10_000.0)}, path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"step": 4}, path / "kakehashi-rank00000.pt")
    files = checkpoint.manifest(path)
    (path / checkpoint.COMPLETE).write_text(json.dumps({"step": 4, "world_size": 1, "files": files}))
    return path


def test_complete_lists_every_file_with_size_and_checksum(tmp_path):
    path = fake_checkpoint(tmp_path / "step-0000004")
    files = json.loads((path / checkpoint.COMPLETE).read_text())["files"]
    assert sorted(files) == ["kakehashi-rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for name, (size, digest) in files.items():
        assert size == (path / name).stat().st_size and digest == checkpoint.file_checksum(path / name)
    assert checkpoint.damage(path) is None


def test_a_changed_byte_or_a_truncated_file_is_damage_and_resume_takes_the_previous_checkpoint(tmp_path):
    older, newer = fake_checkpoint(tmp_path / "step-0000002"), fake_checkpoint(tmp_path / "step-0000004")
    optim = newer / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x01
    optim.write_bytes(bytes(data))
    assert checkpoint.damage(newer) == "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its checksum"
    assert checkpoint.newest_intact(tmp_path) == older
    state = older / "kakehashi-rank00000.pt"
    state.write_bytes(state.read_bytes()[:-7])
    assert "kakehashi-rank00000.pt has" in checkpoint.damage(older)
    assert checkpoint.newest_intact(tmp_path) is None


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path):
    path = fake_checkpoint(tmp_path / "step-0000002")
    (path / checkpoint.COMPLETE).write_text(json.dumps({"step": 2, "world_size": 1}))
    assert checkpoint.damage(path) is None


def test_a_full_disk_is_recognised_from_every_writer_and_a_stage_write_leaves_nothing(tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", 256 * 1024)
    big = torch.zeros(200_000)  # 800 kB: more than the disk holds
    for write in (lambda: torch.save({"w": big}, disk / "a.pt"),  # torch's zip writer: no errno, 'unexpected pos'
                  lambda: (disk / "b.bin").write_bytes(bytes(800_000))):
        with pytest.raises(Exception) as caught:
            write()
        assert is_disk_full(caught.value, disk), caught.value
        for leftover in disk.iterdir():
            leftover.unlink()
    assert not is_disk_full(RuntimeError("unexpected pos 1 vs 2 [inline_container.cc]"), tmp_path)  # space left

    with pytest.raises(DiskFull) as caught:
        atomic_write_dir(disk / "01-align", lambda tmp: torch.save({"w": big}, tmp / "model.pt"))
    message = str(caught.value)
    assert f"no space left on device writing {disk / '01-align'}" in message and "free of 256.0 KiB" in message
    assert list(disk.iterdir()) == []  # the temporary directory is gone, nothing half-written stays


WATCHED = """
import logging, sys, time
from pathlib import Path
from train import watchdog

logging.basicConfig(level=logging.INFO)
watchdog.start(Path(sys.argv[1]), 3)
watchdog.arm("instruct", int(sys.argv[2]), 7)
for step in range(8, 18):  # steps that complete keep it quiet
    time.sleep(0.05)
    watchdog.step_done(step)
watchdog.phase("a test's stuck call")

def stuck_in_a_collective():
    time.sleep(float(sys.argv[3]))

stuck_in_a_collective()
print("finished")
"""


def watched(tmp_path, watchdog_s, stuck_s):
    return subprocess.run([sys.executable, "-c", WATCHED, str(tmp_path / "stalls"), str(watchdog_s), str(stuck_s)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_watchdog_dumps_every_threads_stack_records_the_step_and_exits_6(tmp_path):
    result = watched(tmp_path, watchdog_s=2, stuck_s=600)
    assert result.returncode == EXIT_STALLED, result.stderr[-2000:]
    assert "stage instruct: no optimizer step completed in" in result.stderr
    assert "last completed step 17, then in a test's stuck call" in result.stderr
    assert "stuck_in_a_collective" in result.stderr and "kakehashi-watchdog" not in result.stdout
    assert "Current thread" in result.stderr or "Thread 0x" in result.stderr  # faulthandler's dump
    record = json.loads((tmp_path / "stalls" / "rank00003.json").read_text())
    assert (record["stage"], record["step"], record["phase"], record["rank"]) == ("instruct", 17, "a test's stuck call", 3)
    assert record["seconds"] >= 2


def test_the_watchdog_stays_quiet_while_steps_complete_and_when_off(tmp_path):
    assert watched(tmp_path, watchdog_s=60, stuck_s=1).stdout.strip() == "finished"
    assert watched(tmp_path, watchdog_s=0, stuck_s=3).stdout.strip() == "finished"  # 0 = off
    assert not (tmp_path / "stalls").exists()


def _collective_with_a_silent_peer(rank, world_size):
    from datetime import timedelta

    from train import distributed

    group = torch.distributed.new_group(timeout=timedelta(seconds=3))
    if rank == 1:  # never joins the all-reduce; waits (on the default group) until rank 0 has given up on it
        torch.distributed.barrier()
        return None
    try:
        torch.distributed.all_reduce(torch.ones(1), group=group)
        outcome = "no error", ""
    except RuntimeError as err:
        outcome = distributed.failed_collective(err), str(err)
    torch.distributed.barrier()
    return outcome


def test_a_collective_that_times_out_raises_and_is_named_with_its_caller():
    (named, message), _ = run_on_ranks(_collective_with_a_silent_peer)
    assert "Timed out" in message
    assert named.startswith("all_reduce called from tests/train/test_failures.py:")
    assert named.endswith("(_collective_with_a_silent_peer)")
    assert checkpoint.distributed.failed_collective(ValueError("not a collective")) is None
