import hashlib
import io
import os
import re
import tarfile

import pytest

from data_pipelines.read.shards import ShardWriter, expand_shard_patterns, iter_raw_samples

SAMPLES = [
    ("a0", {"caption": "赤色の円"}, [("png", b"png-a0")]),
    ("a1", {"conversations": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい"}]}, []),
    ("a2", {"caption": "x", "source": "t"}, [("png", b"img-0"), ("jpg", b"img-1"), ("webp", b"img-2")]),
    ("a3", {"caption": "y"}, [("jpeg", b"png-a3")]),
    ("a4", {"caption": "z"}, [("png", b"png-a4")]),
]


def write(out, samples=SAMPLES, per_shard=2):
    with ShardWriter(out, "part", per_shard) as writer:
        for key, meta, images in samples:
            writer.write(key, meta, images)
    return writer.paths


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    """A tar written member by member, bypassing ShardWriter's naming."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def read_all(paths):
    return [sample for path in paths for sample in iter_raw_samples(path)]


def test_round_trip_keeps_meta_and_image_order(tmp_path):
    paths = write(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    samples = read_all(paths)
    assert [s.key for s in samples] == [key for key, _, _ in SAMPLES]
    for sample, (_, meta, images) in zip(samples, SAMPLES):
        assert sample.error is None
        assert sample.meta == meta
        assert sample.images == [data for _, data in images]
        assert sample.image_exts == [ext for ext, _ in images]
    with tarfile.open(paths[1]) as tar:  # one image: KEY.ext; several: KEY.N.ext
        assert tar.getnames() == ["a2.json", "a2.0.png", "a2.1.jpg", "a2.2.webp", "a3.json", "a3.jpeg"]


def test_indexed_images_are_ordered_by_index_not_by_member_order(tmp_path):
    path = write_tar(tmp_path / "x.tar", [("k.json", b'{"caption": "c"}'), ("k.10.png", b"ten"), ("k.2.png", b"two"),
                                          ("k.0.png", b"zero")])
    (sample,) = iter_raw_samples(path)
    assert sample.images == [b"zero", b"two", b"ten"]


def test_identical_samples_give_identical_bytes_and_no_temp_files(tmp_path):
    first, second = write(tmp_path / "a"), write(tmp_path / "b")
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in second]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"part-00000{i}.tar" for i in range(3)]


def test_failed_write_leaves_only_finished_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "part", 2) as writer:
            for key, meta, images in SAMPLES[:3]:
                writer.write(key, meta, images)
            raise RuntimeError("crash mid-shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.tar"]


def test_truncated_shard_yields_good_samples_then_one_error_at_every_cut(tmp_path):
    (path,) = write(tmp_path, per_shard=len(SAMPLES))
    data = open(path, "rb").read()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    end_of_members = members[-1].offset_data + -(-members[-1].size // 512) * 512
    cut_file = tmp_path / "cut.tar"
    for cut in range(0, end_of_members + 1, 128):
        cut_file.write_bytes(data[:cut])
        samples = list(iter_raw_samples(str(cut_file)))  # must never raise
        good, last = samples[:-1], samples[-1]
        assert last.error == "truncated_shard", cut
        assert all(s.error is None for s in good)
        assert [s.key for s in good] == [key for key, _, _ in SAMPLES[: len(good)]]
        assert [s.images for s in good] == [[d for _, d in images] for _, _, images in SAMPLES[: len(good)]]
    cut_file.write_bytes(data[: len(data) // 2])
    assert 0 < len(list(iter_raw_samples(str(cut_file)))) - 1 < len(SAMPLES)


def test_bad_and_missing_json_are_reported_per_sample(tmp_path):
    path = write_tar(tmp_path / "bad.tar", [("k1.json", b"{not json"), ("k2.png", b"img"), ("k3.json", b'{"caption": "ok"}'),
                                            ("k4.json", b"[1, 2]")])
    samples = list(iter_raw_samples(path))
    assert [(s.key, s.error) for s in samples] == [("k1", "json_invalid"), ("k2", "image_without_json"), ("k3", None),
                                                    ("k4", "json_invalid")]


def test_expand_patterns_braces_globs_order_and_dedup(tmp_path):
    for i in range(4):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "other-000000.tar").write_bytes(b"")
    expanded = expand_shard_patterns([f"{tmp_path}/other-*.tar", f"{tmp_path}/s-{{000001..000003}}.tar",
                                      f"{tmp_path}/s-*.tar"])
    names = [p.rsplit("/", 1)[1] for p in expanded]
    assert names == ["other-000000.tar", "s-000001.tar", "s-000002.tar", "s-000003.tar", "s-000000.tar"]
    assert expand_shard_patterns(["pipe:curl -s http://x/{0..1}.tar"]) == ["pipe:curl -s http://x/0.tar",
                                                                          "pipe:curl -s http://x/1.tar"]


@pytest.mark.parametrize("pattern", ["nothing-*.tar", "s-{000000..000009}.tar", "missing.tar"])
def test_expand_patterns_missing_raises_naming_the_pattern(tmp_path, pattern):
    (tmp_path / "s-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        expand_shard_patterns([f"{tmp_path}/{pattern}"])


def test_reading_from_any_sample_offset_gives_the_rest_and_keep_filters(tmp_path):
    (path,) = write(tmp_path, per_shard=len(SAMPLES))
    full = list(iter_raw_samples(path))
    assert [s.index for s in full] == list(range(len(SAMPLES)))
    for sample in full:
        rest = list(iter_raw_samples(path, sample.index + 1, sample.end_offset))
        expected = full[sample.index + 1:]
        assert [(s.key, s.index, s.images) for s in rest] == [(s.key, s.index, s.images) for s in expected]
    assert [s.key for s in iter_raw_samples(path, keep=lambda i: i % 2 == 1)] == ["a1", "a3"]
    assert [s.key for s in iter_raw_samples(path, start_index=3)] == ["a3", "a4"]  # by count when no offset


def test_writer_splits_by_bytes_and_records_the_manifest(tmp_path):
    big = [(f"b{i}", {"caption": "c"}, [("png", bytes([i]) * 3000)]) for i in range(5)]
    with ShardWriter(tmp_path, "big", 100, max_shard_bytes=10000) as writer:
        for key, meta, images in big:
            writer.write(key, meta, images)
    assert [entry["samples"] for entry in writer.manifest] == [2, 2, 1]
    for entry, path in zip(writer.manifest, writer.paths):
        assert entry["bytes"] == os.path.getsize(path) and entry["name"] == os.path.basename(path)
        assert entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert [s.key for s in read_all(writer.paths)] == [f"b{i}" for i in range(5)]
