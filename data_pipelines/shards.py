"""WebDataset tar shards: write them deterministically, find them by pattern, stream them back as raw samples.

A sample is the run of consecutive tar members sharing a key (member name up to the first dot of its basename):
`KEY.json` plus zero or more images, `KEY.png` for one or `KEY.0.png`, `KEY.1.jpg`, ... for several.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_remote(pattern: str) -> bool:
    return "://" in pattern or pattern.startswith("pipe:")


# ------------------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes samples into `OUT/<prefix>-000000.tar`, `-000001.tar`, ... with `samples_per_shard` samples each.

    Each shard is written under a hidden temporary name and renamed into place once complete, so a crash never
    leaves a half-written `.tar` under a final name. Tar headers are fixed (mtime 0, uid/gid 0, no user names),
    so the same samples always give byte-identical shards.
    """

    def __init__(self, out_dir: str | Path, prefix: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.paths: list[str] = []
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
        if self._tar is None:
            self._open_next()
        members = [(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
        for index, (ext, data) in enumerate(images):
            ext = ext.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                raise ValueError(f"image extension must be one of {IMAGE_EXTS}, got {ext!r}")
            suffix = ext if len(images) == 1 else f"{index}.{ext}"
            members.append((f"{key}.{suffix}", data))
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
        self._tar = self._file = self._tmp_path = None

    def _abort(self) -> None:
        if self._tar is not None:
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = self._file = self._tmp_path = None


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


# ------------------------------------------------------------------------------------------------------- reading


@dataclass
class RawSample:
    key: str
    shard: str
    meta: dict | None = None
    images: list[bytes] = field(default_factory=list)  # in index order
    image_exts: list[str] = field(default_factory=list)
    error: str | None = None  # why this sample cannot be used; None when it can


_IMAGE_MEMBER = re.compile(r"^(?:(\d+)\.)?(" + "|".join(IMAGE_EXTS) + r")$", re.IGNORECASE)


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records whether the archive's end-of-archive zero block was reached.

    tarfile silently stops at a header cut short or missing, so without this a shard truncated at a member
    boundary would look complete.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.reached_end_marker = True
            raise


def iter_raw_samples(shard_path: str) -> Iterator[RawSample]:
    """Stream one shard's samples. Never raises on bad data: problems come back as `RawSample.error`.

    A truncated shard yields the samples before the cut, then one RawSample with error "truncated shard".
    """
    try:
        stream = _open_shard(shard_path)
    except OSError:
        yield RawSample(key="", shard=shard_path, error="unreadable shard")
        return
    with stream:
        group: list[tuple[str, bytes]] = []  # (suffix, data) of the current key
        key = ""
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndAwareTarInfo)
            for member in tar:
                if not member.isfile():
                    continue
                member_key, suffix = _split_member_name(member.name)
                data = tar.extractfile(member).read()
                if member_key != key and group:
                    yield _assemble(key, shard_path, group)
                    group = []
                key = member_key
                group.append((suffix, data))
            truncated = not getattr(tar, "reached_end_marker", False)
        except (tarfile.TarError, EOFError, OSError):
            truncated = True
        if truncated:  # the sample being read at the cut may be incomplete: report it instead of using it
            yield RawSample(key=key, shard=shard_path, error="truncated shard")
        elif group:
            yield _assemble(key, shard_path, group)


def _open_shard(path: str) -> BinaryIO:
    if is_remote(path):
        import webdataset

        return webdataset.gopen(path, "rb")
    return open(path, "rb")


def _split_member_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix


def _assemble(key: str, shard: str, members: list[tuple[str, bytes]]) -> RawSample:
    sample = RawSample(key=key, shard=shard)
    indexed: dict[int, tuple[str, bytes]] = {}
    for suffix, data in members:
        if suffix.lower() == "json":
            try:
                sample.meta = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                sample.error = "bad json"
            continue
        match = _IMAGE_MEMBER.match(suffix)
        if match is None:
            continue  # members other than json and images are allowed and ignored
        index = int(match.group(1)) if match.group(1) is not None else 0
        if index in indexed:
            sample.error = sample.error or "duplicate image index"
        indexed[index] = (match.group(2).lower(), data)
    if sample.error is None and sample.meta is None:
        sample.error = "missing json"
    elif sample.error is None and not isinstance(sample.meta, dict):
        sample.error = "bad json"
    for index in sorted(indexed):
        ext, data = indexed[index]
        sample.image_exts.append(ext)
        sample.images.append(data)
    return sample
