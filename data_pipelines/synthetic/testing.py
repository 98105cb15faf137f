"""Real shards with every kind of bad sample, for tests here and end to end (`kakehashi train` must survive them).

`write_bad_shards(out, good=...)` writes `out/bad-000000.tar` (good VQA samples with one bad sample of each
per-sample kind in between) and `out/bad-000001.tar` (good samples, then a tar cut mid-member) and returns their
paths and the exact bad counts one full pass over them gives.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

QUESTION, ANSWER = "この図形は何色ですか？", "赤色です。"


def conversation(question: str = QUESTION, answer: str = ANSWER, images: int = 1) -> dict:
    return {"conversations": [{"role": "user", "content": "<image>\n" * images + question},
                              {"role": "assistant", "content": answer}]}


def png_bytes(size: tuple[int, int] = (16, 16), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def huge_png_header(width: int = 10_000, height: int = 10_000) -> bytes:
    """A PNG claiming width x height pixels in a few bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    """A PNG whose header is fine but whose compressed pixel data is garbage."""
    data = bytearray(png_bytes((32, 32)))
    start = data.index(b"IDAT") + 4
    data[start:start + 20] = b"\xff" * 20
    return bytes(data)


def _raw_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_bad_shards(out: str | Path, good: int = 20, max_length: int = 64, tokens_per_image: int = 4
                     ) -> tuple[list[str], dict[str, int]]:
    """Two VQA shards under `out` (see the module docstring); returns (paths, {reason: count} for one pass).

    `max_length` and `tokens_per_image` must be the loader's: the too_long sample has more image tokens than
    fit. Good samples are keys good000000...; the bad ones are named after their reason.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    many_images = max_length // tokens_per_image + 1
    per_sample_bad = [  # (key, json bytes or None, [(member suffix, bytes)], reason)
        ("undecodable", conversation(), [("png", corrupt_png())], "undecodable_image"),
        ("truncatedimage", conversation(), [("jpg", jpeg_bytes()[:400])], "truncated_image"),
        ("notimage", conversation(), [("png", b"plain text, not an image")], "not_an_image"),
        ("notutf8", b'{"conversations": "\xff\xfe"}', [], "json_not_utf8"),
        ("notjson", b"{not json", [], "json_invalid"),
        ("nofields", {"source": "nothing to learn"}, [], "json_no_known_fields"),
        ("emptyconv", {"conversations": []}, [], "empty_conversation"),
        ("mismatch", conversation(images=2), [("png", png_bytes())], "image_count_mismatch"),
        ("imageonly", None, [("png", png_bytes())], "image_without_json"),
        ("bomb", conversation(), [("png", huge_png_header())], "image_too_large"),
        ("toolong", conversation(images=many_images), [(f"{i}.png", png_bytes()) for i in range(many_images)],
         "too_long"),
    ]
    first = out / "bad-000000.tar"
    with tarfile.open(first, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(max(good, len(per_sample_bad))):  # interleaved, so a small shuffle block meets them early
            if i < good:
                _write_good(tar, f"good{i:06d}", i)
            if i < len(per_sample_bad):
                key, meta, images, _ = per_sample_bad[i]
                _write_raw_sample(tar, key, meta, images)
    second = out / "bad-000001.tar"
    with tarfile.open(second, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(good, good + max(good // 2, 1)):
            _write_good(tar, f"good{i:06d}", i)
        _write_good(tar, "cut", 1)
    with tarfile.open(second) as tar:
        last = tar.getmembers()[-1]
    with open(second, "r+b") as file:  # cut in the middle of the last image's bytes
        file.truncate(last.offset_data + last.size // 2)
    expected = {reason: 1 for *_, reason in per_sample_bad}
    expected["truncated_shard"] = 1
    return [str(first), str(second)], expected


def _write_raw_sample(tar: tarfile.TarFile, key: str, meta: dict | bytes | None,
                      images: list[tuple[str, bytes]]) -> None:
    if meta is not None:
        _raw_tar_member(tar, f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    for suffix, data in images:
        _raw_tar_member(tar, f"{key}.{suffix}", data)


def _write_good(tar: tarfile.TarFile, key: str, index: int) -> None:
    """Odd indices carry a JPEG, even ones a PNG."""
    image = jpeg_bytes(seed=index) if index % 2 else png_bytes(colour=(index * 7 % 256, 30, 30))
    _write_raw_sample(tar, key, conversation(), [("jpg" if index % 2 else "png", image)])
