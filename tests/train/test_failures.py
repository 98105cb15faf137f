"""The pieces that survive damage, each on real parts: checkpoint checksums on real files, a full disk on a real
(size-limited) tmpfs. The whole runs (a full disk mid-save, damaged checkpoints): test_resume.py."""

import json

import pytest
import torch

from train import checkpoint
from train.errors import DiskFull, is_disk_full
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
