"""Reading a benchmark's rows from the files a user has: a `datasets` save_to_disk directory, parquet (a file or a
folder of them), or jsonl whose image fields name image files (relative to the jsonl file).

Nothing is downloaded. A row that lacks a field, or an image that is missing or unreadable, is a BenchmarkDataError
(exit 2) naming the file, the row and the field: nothing is skipped.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.errors import UsageError


class BenchmarkDataError(UsageError):
    """A benchmark file that does not hold what its benchmark's schema says."""


@dataclass
class Rows:
    """The rows of one benchmark file, and where they came from (for error messages and relative image paths)."""

    file: Path                  # the file (or save_to_disk directory) the rows were read from
    rows: list[dict[str, Any]]  # one dict per row, as the file holds it
    columns: list[str]


def read_rows(path: Path | str, split: str) -> Rows:
    """All rows of the benchmark at `path`. A DatasetDict saved to disk (or a folder of `SPLIT-*.parquet` files)
    gives its `split`; a single split is taken whatever its name."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkDataError(f"{path}: no such file or directory")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _from_disk(path, split)
    if path.is_dir():
        files = sorted(path.glob("**/*.parquet")) or sorted(path.glob("*.jsonl"))
        chosen = [f for f in files if f.name.startswith(split)] or files
        if not chosen:
            raise BenchmarkDataError(f"{path}: no save_to_disk dataset, parquet or jsonl file in this folder")
        parts = [read_rows(f, split) for f in chosen]
        return Rows(chosen[0], [row for part in parts for row in part.rows], parts[0].columns)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return Rows(path, table.to_pylist(), table.column_names)
    if path.suffix in (".jsonl", ".json"):
        return _from_jsonl(path)
    raise BenchmarkDataError(f"{path}: not a save_to_disk directory, .parquet or .jsonl file")


def _from_disk(path: Path, split: str) -> Rows:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded and len(loaded) != 1:
            raise BenchmarkDataError(f"{path}: no split {split!r} (it has {', '.join(loaded)})")
        loaded = loaded[split] if split in loaded else next(iter(loaded.values()))
    for name, feature in loaded.features.items():  # keep image bytes as stored; decoded when generation needs them
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(name, datasets.Image(decode=False))
    return Rows(path, list(loaded), list(loaded.column_names))


def _from_jsonl(path: Path) -> Rows:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(f"{path}: line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise BenchmarkDataError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Rows(path, rows, columns)


# ---------------------------------------------------------------------------------------------- fields


def field(rows: Rows, index: int, name: str, kind: type | tuple[type, ...] | None = None, optional: bool = False):
    """Row `index`'s field `name`, checked: missing (or null unless `optional`) or of the wrong type is an error."""
    row = rows.rows[index]
    if name not in row:
        raise BenchmarkDataError(f"{rows.file}: row {index}: missing field {name!r} (columns: "
                                 f"{', '.join(rows.columns) or 'none'})")
    value = row[name]
    if value is None and optional:
        return None
    if value is None or (kind is not None and not isinstance(value, kind)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind or ())
        raise BenchmarkDataError(f"{rows.file}: row {index}: field {name!r} is {type(value).__name__}, expected "
                                 f"{expected or 'a value'}")
    return value


def require_columns(rows: Rows, names: list[str]) -> None:
    """Every column of the schema is there (checked once, before any row is read)."""
    missing = [n for n in names if n not in rows.columns]
    if rows.rows and missing:
        raise BenchmarkDataError(f"{rows.file}: missing field {missing[0]!r} (columns: {', '.join(rows.columns)})")


@dataclass
class ImageRef:
    """One image of a benchmark row, opened when generation needs it: bytes (parquet, save_to_disk), a path
    (relative to the benchmark file's folder unless absolute), or an already decoded PIL image."""

    value: Any
    where: str       # "FILE: row N: field NAME", for errors
    base_dir: Path   # what a relative path is relative to

    def check(self) -> ImageRef:
        """Raise BenchmarkDataError now if the image is missing (an absent file, no bytes)."""
        from PIL import Image

        if isinstance(self.value, Image.Image):
            return self
        data, path = self._source()
        if data is None and path is None:
            raise BenchmarkDataError(f"{self.where}: no image (neither bytes nor a path)")
        if data is None and not path.is_file():
            raise BenchmarkDataError(f"{self.where}: image file {path} does not exist")
        return self

    def load(self):
        """The image as RGB (PIL)."""
        from PIL import Image, UnidentifiedImageError

        if isinstance(self.value, Image.Image):
            return self.value.convert("RGB")
        data, path = self._source()
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as opened:
                return opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise BenchmarkDataError(f"{self.where}: unreadable image ({err})") from None

    def _source(self) -> tuple[bytes | None, Path | None]:
        value = self.value
        if isinstance(value, dict):  # datasets' Image feature undecoded, and parquet written by datasets
            data, path = value.get("bytes") or None, value.get("path") or None
            return data, (None if data is not None or path is None else self._resolve(path))
        if isinstance(value, (bytes, bytearray)):
            return bytes(value) or None, None
        if isinstance(value, str) and value:
            return None, self._resolve(value)
        return None, None

    def _resolve(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.base_dir / path


def image(rows: Rows, index: int, name: str, optional: bool = False) -> ImageRef | None:
    value = field(rows, index, name, optional=optional)
    if value is None:
        return None
    base = rows.file.parent if rows.file.is_file() else rows.file
    return ImageRef(value, f"{rows.file}: row {index}: field {name!r}", base).check()

