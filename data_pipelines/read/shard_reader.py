"""Stream a WebDataset tar shard back as raw samples, from its start or from a byte offset, never raising on bad data.

A sample is the run of consecutive tar members sharing a key (member name up to the first dot of its basename):
`KEY.json` plus zero or more images, `KEY.png` for one or `KEY.0.png`, `KEY.1.jpg`, ... for several. Each sample
carries its index in the shard and the byte offsets where it starts and where the next one starts, so a reader
can resume mid-shard by seeking (local files) or by skipping members unread (remote streams).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_IMAGE_MEMBER = re.compile(r"^(?:(\d+)\.)?(" + "|".join(IMAGE_EXTS) + r")$", re.IGNORECASE)


def is_remote(pattern: str) -> bool:
    return "://" in pattern or pattern.startswith("pipe:")


@dataclass
class RawSample:
    key: str
    shard: str
    meta: dict | None = None
    images: list[bytes] = field(default_factory=list)  # in index order
    image_exts: list[str] = field(default_factory=list)
    error: str | None = None  # bad-sample reason when it cannot be used; None when it can
    index: int = 0  # position in the shard (0-based, counting bad samples too)
    offset: int = 0  # byte offset of its first tar header
    end_offset: int = 0  # byte offset where the next sample starts; -1 after "truncated_shard" (nothing follows)


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


def iter_raw_samples(shard_path: str, start_index: int = 0, start_offset: int = 0,
                     keep: Callable[[int], bool] | None = None) -> Iterator[RawSample]:
    """Stream one shard's samples from sample `start_index`, which begins at byte `start_offset`.

    Local shards are seeked to the offset; remote ones are read from the start, skipping earlier members without
    reading their data. Samples whose index fails `keep` are passed over the same way (nothing yielded). A
    truncated shard yields the samples before the cut, then one RawSample with error "truncated_shard".
    """
    seek = start_offset if not is_remote(shard_path) else 0
    try:
        stream = _open_shard(shard_path, seek)
    except OSError:
        yield RawSample(key="", shard=shard_path, error="unreadable_shard", index=start_index, offset=start_offset,
                        end_offset=-1)
        return
    index = start_index if seek else 0  # index of the sample being grouped
    with stream:
        group: list[tuple[str, bytes | None]] = []  # (suffix, data) of the current key; data None when skipped
        key, group_offset, end = "", seek, seek
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndAwareTarInfo)
            for member in tar:
                if not member.isfile():
                    continue
                member_key, suffix = _split_member_name(member.name)
                if member_key != key and group:
                    if _wanted(index, start_index, keep):
                        yield _assemble(key, shard_path, group, index, group_offset, seek + member.offset)
                    index, group, group_offset = index + 1, [], seek + member.offset
                if not group:
                    group_offset = seek + member.offset
                wanted = _wanted(index, start_index, keep)
                data = tar.extractfile(member).read() if wanted else None  # unread data is skipped by tarfile
                key = member_key
                group.append((suffix, data))
                end = seek + member.offset_data + -(-member.size // 512) * 512
            truncated = not getattr(tar, "reached_end_marker", False)
        except (tarfile.TarError, EOFError, OSError):
            truncated = True
        if truncated:  # the sample being read at the cut may be incomplete: report it instead of using it
            if _wanted(index, start_index, keep):
                yield RawSample(key=key, shard=shard_path, error="truncated_shard", index=index, offset=group_offset,
                                end_offset=-1)
        elif group and _wanted(index, start_index, keep):
            yield _assemble(key, shard_path, group, index, group_offset, end)


def _wanted(index: int, start_index: int, keep: Callable[[int], bool] | None) -> bool:
    return index >= start_index and (keep is None or keep(index))


def _open_shard(path: str, offset: int) -> BinaryIO:
    if is_remote(path):
        import webdataset

        return webdataset.gopen(path, "rb")
    file = open(path, "rb")
    if offset:
        file.seek(offset)
    return file


def _split_member_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix


def _assemble(key: str, shard: str, members: list[tuple[str, bytes]], index: int, offset: int,
              end_offset: int) -> RawSample:
    sample = RawSample(key=key, shard=shard, index=index, offset=offset, end_offset=end_offset)
    indexed: dict[int, tuple[str, bytes]] = {}
    for suffix, data in members:
        if suffix.lower() == "json":
            try:
                sample.meta = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError:
                sample.error = "json_not_utf8"
            except json.JSONDecodeError:
                sample.error = "json_invalid"
            continue
        match = _IMAGE_MEMBER.match(suffix)
        if match is None:
            continue  # members other than json and images are allowed and ignored
        index_in_sample = int(match.group(1)) if match.group(1) is not None else 0
        if index_in_sample in indexed:
            sample.error = sample.error or "duplicate_image_index"
        indexed[index_in_sample] = (match.group(2).lower(), data)
    if sample.error is None and sample.meta is None:
        sample.error = "image_without_json" if indexed else "json_missing"
    elif sample.error is None and not isinstance(sample.meta, dict):
        sample.error = "json_invalid"
    for position in sorted(indexed):
        ext, data = indexed[position]
        sample.image_exts.append(ext)
        sample.images.append(data)
    return sample
