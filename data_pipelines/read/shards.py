"""WebDataset tar shards: write them deterministically with a manifest, find them by pattern (reading: shard_reader).

A sample is the run of consecutive tar members sharing a key (member name up to the first dot of its basename):
`KEY.json` plus zero or more images, `KEY.png` for one or `KEY.0.png`, `KEY.1.jpg`, ... for several.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

import braceexpand

from data_pipelines.read.shard_reader import IMAGE_EXTS, RawSample, is_remote, iter_raw_samples  # noqa: F401 (re-exported)

MANIFEST = "index.json"


# ------------------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes samples into `OUT/<prefix>-000000.tar`, `-000001.tar`, ... with `samples_per_shard` samples each,
    or fewer where a shard would pass `max_shard_bytes` (a sample is never split; one sample may exceed it).

    Each shard is written under a hidden temporary name and renamed into place once complete, so a crash never
    leaves a half-written `.tar` under a final name. Tar headers are fixed (mtime 0, uid/gid 0, no user names),
    so the same samples always give byte-identical shards.
    """

    def __init__(self, out_dir: str | Path, prefix: str, samples_per_shard: int, max_shard_bytes: int | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.paths: list[str] = []
        self.manifest: list[dict] = []  # per finished shard: name, samples, bytes, sha256
        self._tar: tarfile.TarFile | None = None
        self._file: BinaryIO | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed run keeps only the shards it finished
            self._abort()

    def write(self, key: str, meta: dict, images: list[tuple[str, bytes]]) -> None:
        """Add one sample: its JSON `meta` and `images` as (extension without dot, raw bytes) in order."""
        if not key or "." in Path(key).name:
            raise ValueError(f"sample key must be non-empty and contain no dot: {key!r}")
        members = [(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
        for index, (ext, data) in enumerate(images):
            ext = ext.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                raise ValueError(f"image extension must be one of {IMAGE_EXTS}, got {ext!r}")
            suffix = ext if len(images) == 1 else f"{index}.{ext}"
            members.append((f"{key}.{suffix}", data))
        size = sum(512 + -(-len(data) // 512) * 512 for _, data in members)  # tar headers + padded data
        if self._tar is not None and self.max_shard_bytes and self._file.tell() + size > self.max_shard_bytes:
            self._finish_shard()
        if self._tar is None:
            self._open_next()
        for name, data in members:
            self._tar.addfile(_fixed_tarinfo(name, len(data)), io.BytesIO(data))
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()

    def _open_next(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        final = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tmp_path = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.close()
        final = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        os.replace(self._tmp_path, final)
        self.paths.append(str(final))
        self.manifest.append({"name": final.name, "samples": self._in_shard, "bytes": final.stat().st_size,
                              "sha256": file_sha256(final)})
        self._tar = self._file = self._tmp_path = None

    def _abort(self) -> None:
        if self._tar is not None:
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = self._file = self._tmp_path = None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out_dir: str | Path, shards: list[dict], **extra) -> Path:
    """`OUT/index.json`: {**extra, "shards": [{name, samples, bytes, sha256}, ...]}, replaced atomically, so epoch
    sizes are known without opening a tar."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**extra, "shards": shards}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fixed_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# ------------------------------------------------------------------------------------------------------ patterns


def expand_shard_patterns(patterns: list[str]) -> list[str]:
    """Shard paths for brace patterns (`shard-{000000..000003}.tar`) and globs, in pattern order, deduplicated.

    Remote patterns (URLs, `pipe:` commands) are brace-expanded but not checked. A local pattern that matches
    nothing, or an explicitly listed local path that does not exist, raises FileNotFoundError naming the pattern.
    """
    seen: dict[str, None] = {}
    for pattern in patterns:
        matches: list[str] = []
        for expanded in braceexpand.braceexpand(pattern):
            if is_remote(expanded):
                matches.append(expanded)
            elif glob.has_magic(expanded):
                matches.extend(path for path in glob.glob(expanded) if os.path.isfile(path))
            elif os.path.isfile(expanded):
                matches.append(expanded)
            else:
                origin = "" if expanded == pattern else f" (from pattern {pattern!r})"
                raise FileNotFoundError(f"no shard {expanded!r}{origin}")
        if not matches:
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        seen.update(dict.fromkeys(sorted(matches)))
    return list(seen)

