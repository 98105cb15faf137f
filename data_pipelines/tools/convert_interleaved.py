"""`kakehashi data convert obelics|mmc4`: interleaved image-text documents -> `task: interleaved` shards.

A document sample is `KEY.json` {"document": [{"text": ...}, {"image": 0}, ...]} with its images as `KEY.0.jpg`,
`KEY.1.png`, ... in the order they appear (data_pipelines/render/samples.py: document_segments). Nothing is
downloaded: the column (OBELICS) or field (MMC4) named on the command line holds each image's local path, relative to
`--images`.
A document with a missing or undecodable image, no text, or a malformed row is skipped and counted by reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from data_pipelines.errors import UsageError
from data_pipelines.render.templates import IMAGE_PLACEHOLDER
from data_pipelines.tools.convert import (
    Record,
    Skip,
    add_output_options,
    checked_paths,
    image_entry,
    report_summary,
    sample_key,
    write_shards,
)


def document(items: list[tuple[str, object]], images_dir: Path, source: str | None) -> tuple[dict, list]:
    """[("text", str) | ("image", path)] in reading order -> (sample JSON, [(extension, bytes)]). Raises Skip."""
    parts, images = [], []
    for kind, value in items:
        if kind == "text":
            if IMAGE_PLACEHOLDER in value:
                raise Skip(f"{IMAGE_PLACEHOLDER} inside a text", "placeholder_in_text")
            parts.append({"text": value})
            continue
        if not isinstance(value, str) or not value:
            raise Skip("an image entry names no local path", "image_missing")
        file = images_dir / value
        if not file.is_file():
            raise Skip(f"image file missing: {file}", "image_missing")
        parts.append({"image": len(images)})
        images.append(image_entry(file.read_bytes()))
    if not any("text" in part for part in parts):
        raise Skip("document has no text", "no_text")
    return {"document": parts, **({"source": source} if source else {})}, images


# --------------------------------------------------------------------------------------------- OBELICS


def obelics_items(row: dict, texts_column: str, images_column: str) -> list[tuple[str, object]]:
    """OBELICS rows: `texts` and `images` lists of one length, exactly one of the two set at each position."""
    texts, images = row.get(texts_column), row.get(images_column)
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise Skip(f"{texts_column!r} and {images_column!r} are not lists of one length", "malformed_document")
    items = []
    for text, image in zip(texts, images):
        if (text is None) == (image is None):
            raise Skip("a position holds both a text and an image, or neither", "malformed_document")
        if image is not None:
            items.append(("image", image))
        elif isinstance(text, str) and text.strip():
            items.append(("text", text))
    return items


def table_rows(path: Path) -> Iterator[dict]:
    """Rows of a `datasets` folder (save_to_disk) or of parquet files (a file or a folder of them), streamed, as
    stored: an image cell stays its {"bytes", "path"} dict, never decoded (converters keep the original bytes)."""
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[next(iter(dataset))]
        for batch in dataset.with_format("arrow").iter(batch_size=256):  # arrow: the features' decoding is skipped
            yield from batch.to_pylist()
        return
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"{path} holds no parquet files and is not a datasets folder")
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def obelics_records(rows, args) -> Iterator[Record | tuple[str, Skip]]:
    for number, row in enumerate(rows):
        record_id = row.get(args.id_column, number) if isinstance(row, dict) else number
        try:
            meta, images = document(obelics_items(row, args.texts_column, args.images_column),
                                    Path(args.images), args.source)
            yield sample_key(record_id, number), meta, images
        except Skip as skip:
            yield str(record_id), skip


# ------------------------------------------------------------------------------------------------ MMC4


def mmc4_items(row: dict, image_field: str) -> list[tuple[str, object]]:
    """MMC4 rows: `text_list` (sentences) and `image_info` [{image_field, matched_text_index}]; each image goes
    before the sentence it was matched to (as OpenFlamingo reads MMC4), images of one sentence in their order."""
    texts, infos = row.get("text_list"), row.get("image_info") or []
    if not isinstance(texts, list) or not isinstance(infos, list):
        raise Skip("text_list or image_info is not a list", "malformed_document")
    before: dict[int, list] = {}
    for info in infos:
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(texts):
            raise Skip(f"matched_text_index {index!r} is not a sentence of text_list", "malformed_document")
        before.setdefault(index, []).append(info.get(image_field))
    items = []
    for index, text in enumerate(texts):
        items += [("image", path) for path in before.get(index, [])]
        if isinstance(text, str) and text.strip():
            items.append(("text", text))
    return items


def mmc4_records(path: Path, args) -> Iterator[Record | tuple[str, Skip]]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            record_id = f"line{number + 1}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise Skip("not a JSON object", "not_an_object") from None
                if not isinstance(row, dict):
                    raise Skip("not a JSON object", "not_an_object")
                record_id = row.get(args.id_field) or record_id
                meta, images = document(mmc4_items(row, args.image_field), Path(args.images), args.source)
                yield sample_key(record_id, number), meta, images
            except Skip as skip:
                yield str(record_id), skip


# ------------------------------------------------------------------------------------------------- CLI


def register(kinds) -> None:
    """Add `obelics` and `mmc4` to `data convert`'s kinds."""
    obelics = kinds.add_parser("obelics", help="OBELICS-style documents: parquet file(s) or a datasets folder with "
                                               "aligned `texts` and `images` lists (None where the other is)")
    obelics.add_argument("--texts-column", default="texts")
    obelics.add_argument("--images-column", default="images", help="the column of local image paths")
    obelics.add_argument("--id-column", default="id")
    mmc4 = kinds.add_parser("mmc4", help="MMC4-style JSONL: text_list + image_info with matched_text_index")
    mmc4.add_argument("--image-field", default="image_name", help="the image_info field holding the local path")
    mmc4.add_argument("--id-field", default="id", help="the row field used as the key (default: the line number)")
    for kind, parser in (("obelics", obelics), ("mmc4", mmc4)):
        parser.add_argument("--input", required=True, help="the parquet file or folder, datasets folder, or JSONL")
        parser.add_argument("--images", required=True, help="folder the image paths are relative to")
        add_output_options(parser, kind)
        parser.set_defaults(func=cmd_convert_documents)


def cmd_convert_documents(args: argparse.Namespace) -> int:
    source, out = checked_paths(args, images=True)
    records = (obelics_records(table_rows(source), args) if args.convert_kind == "obelics"
               else mmc4_records(source, args))
    summary = write_shards(records, out, args.name, args.samples_per_shard, int(args.shard_bytes))
    report_summary(summary, out, args.name, args.json)
    return 0
