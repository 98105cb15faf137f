"""`kakehashi data convert llava|jsonl|hf|coco` (and `obelics|mmc4`: tools/convert_interleaved.py;
`llamafactory-dpo|preference-table`: tools/convert_preference.py): other formats -> `OUT/<name>-NNNNNN.tar` shards
plus `OUT/index.json`.

Images keep their original bytes when they decode (modes and EXIF rotation are handled when read, so nothing is
re-encoded); formats a shard cannot name are stored as PNG. A record that cannot become a sample (missing or
undecodable image, `<image>` count differing from its images, unusable text) is skipped, with its id and reason
printed on stderr; a summary line counts kept and skipped, and the skipped by reason (also in `index.json`).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from data_pipelines.errors import UsageError
from data_pipelines.image.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, load_upright_rgb, open_image
from data_pipelines.output import result, result_json
from data_pipelines.read.shards import ShardWriter, write_manifest
from data_pipelines.render.templates import IMAGE_PLACEHOLDER, conversation_turns

EXT_BY_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Skip(Exception):
    """A record that cannot be converted; the message is printed, `reason` (a snake_case key) is counted."""

    def __init__(self, message: str, reason: str = "unusable_record"):
        super().__init__(message)
        self.reason = reason


Record = tuple[str, dict, list[tuple[str, bytes]]]  # (key, sample JSON, [(extension, original bytes)])


def image_entry(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, bytes]:
    """(extension, bytes) to store: the original bytes when they decode, PNG for formats shards do not name."""
    try:
        opened = open_image(data, max_pixels)
        fmt = opened.format
        image = load_upright_rgb(opened)  # decodes every pixel: a file that does not is skipped here, not in training
    except ImageError as err:
        raise Skip(f"{err.reason}: {err}", err.reason) from None
    if fmt in EXT_BY_FORMAT:
        return EXT_BY_FORMAT[fmt], data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def normalise_conversations(turns) -> list[dict]:
    """LLaVA (`from`/`value`) or role/content turns -> role/content, checked to alternate user/assistant."""
    if not isinstance(turns, list) or not turns:
        raise Skip("empty conversation", "empty_conversation")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise Skip("conversation turn is not an object", "malformed_conversation")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise Skip(f"unknown speaker {turn.get('from', turn.get('role'))!r}", "malformed_conversation")
        out.append({"role": role, "content": turn.get("value", turn.get("content"))})
    try:
        conversation_turns(out)
    except ValueError as err:
        raise Skip(f"malformed conversation: {err}", "malformed_conversation") from None
    return out


def build_meta(record: dict, images: list, source: str | None) -> dict:
    """Sample JSON for a record with `caption` or `conversations`; checks the `<image>` count."""
    if "conversations" in record:
        meta = {"conversations": normalise_conversations(record["conversations"])}
        placeholders = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in meta["conversations"])
        if placeholders != len(images):
            raise Skip(f"{placeholders} {IMAGE_PLACEHOLDER} for {len(images)} image(s)", "image_count_mismatch")
    elif isinstance(record.get("caption"), str) and record["caption"]:
        if len(images) != 1:
            raise Skip(f"a caption needs exactly one image, got {len(images)}", "image_count_mismatch")
        meta = {"caption": record["caption"]}
    else:
        raise Skip("no caption or conversations", "no_text")
    if source:
        meta["source"] = source
    return meta


def sample_key(record_id, number: int) -> str:
    """A tar-safe key: the record's id with dots and slashes replaced, else its number."""
    return re.sub(r"[^\w\-]", "_", str(record_id)) if record_id not in (None, "") else f"{number:09d}"


def write_shards(records: Iterable[Record | tuple[str, Skip]], out: Path, name: str, samples_per_shard: int,
                 max_shard_bytes: int | None, total: int | None = None) -> dict:
    """Write records to shards with a progress bar; skips are printed. Returns the summary counts."""
    from tqdm import tqdm

    kept, reasons = 0, Counter()
    with ShardWriter(out, name, samples_per_shard, max_shard_bytes) as writer:
        for record in tqdm(records, total=total, unit="rec", file=sys.stderr, disable=None):
            if isinstance(record[1], Skip):
                reasons[record[1].reason] += 1
                print(f"skipped {record[0]}: {record[1]}", file=sys.stderr)
                continue
            writer.write(*record)
            kept += 1
    skipped = sum(reasons.values())
    write_manifest(out, writer.manifest, name=name, kept=kept, skipped=skipped, skipped_by_reason=dict(reasons))
    return {"kept": kept, "skipped": skipped, "skipped_by_reason": dict(sorted(reasons.items())),
            "shards": len(writer.paths)}


# ------------------------------------------------------------------------------------------------- sources


def file_records(rows: Iterable[dict], images_dir: Path, source: str | None) -> Iterator[Record | tuple[str, Skip]]:
    """LLaVA / JSONL rows: `image` is a path (relative to images_dir) or a list of paths, or absent."""
    for number, row in enumerate(rows):
        record_id = row.get("id", number) if isinstance(row, dict) else number
        try:
            if not isinstance(row, dict):
                raise Skip("not a JSON object", "not_an_object")
            paths = row.get("image") or []
            paths = [paths] if isinstance(paths, str) else paths
            images = []
            for path in paths:
                file = images_dir / path
                if not file.is_file():
                    raise Skip(f"image file missing: {file}", "image_missing")
                images.append(image_entry(file.read_bytes()))
            yield sample_key(record_id, number), build_meta(row, images, source or row.get("source")), images
        except Skip as skip:
            yield str(record_id), skip


def jsonl_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield f"line {number + 1}"  # file_records skips it as "not a JSON object"


def hf_records(path: str, image_column: str, text_column: str, conversations_column: str, id_column: str,
               source: str | None) -> Iterator[Record | tuple[str, Skip]]:
    """A `datasets` folder (save_to_disk) or local parquet/arrow files, streamed, images as stored bytes."""
    import datasets

    local = Path(path)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(local))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[next(iter(dataset))]
    else:
        files = sorted(str(p) for p in (local.glob("*") if local.is_dir() else [local])
                       if p.suffix in (".parquet", ".arrow"))
        kind = "parquet" if files and files[0].endswith(".parquet") else "arrow"
        dataset = datasets.load_dataset(kind, data_files=files, split="train", streaming=True)
    if image_column in (dataset.features or {}):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # keep the original bytes
    for number, row in enumerate(dataset):
        record_id = row.get(id_column, number)
        try:
            cell = row.get(image_column)
            cells = cell if isinstance(cell, list) else [cell] if cell is not None else []
            images = []
            for item in cells:
                data = item.get("bytes") if isinstance(item, dict) else item
                if data is None and isinstance(item, dict) and item.get("path"):
                    data = Path(item["path"]).read_bytes()
                if not isinstance(data, bytes):
                    raise Skip("image cell holds no bytes", "image_missing")
                images.append(image_entry(data))
            text = {"conversations": row[conversations_column]} if row.get(conversations_column) is not None \
                else {"caption": row.get(text_column)}
            yield sample_key(record_id, number), build_meta(text, images, source), images
        except Skip as skip:
            yield str(record_id), skip


def coco_records(document: dict, images_dir: Path, source: str | None) -> Iterator[Record | tuple[str, Skip]]:
    """COCO-style caption JSON (STAIR Captions, YJ Captions): `images` [{id, file_name}] and `annotations`
    [{id, image_id, caption}] -> one caption sample per annotation (key IMAGEID_ANNOTATIONID), as LLaVA-style
    pretraining reads such sets: an image with five captions is five samples, each seen once per epoch. Annotations
    are read in (image_id, id) order, so an image's file is read once for all its captions."""
    files = {image.get("id"): image.get("file_name") for image in document.get("images") or []
             if isinstance(image, dict)}
    annotations = [a for a in document.get("annotations") or [] if isinstance(a, dict)]
    annotations.sort(key=lambda a: (str(a.get("image_id")), str(a.get("id"))))
    cached: tuple[object, tuple[str, bytes] | Skip] = (None, Skip(""))
    for number, annotation in enumerate(annotations):
        image_id = annotation.get("image_id")
        record_id = f"{image_id}_{annotation.get('id', number)}"
        try:
            caption = annotation.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise Skip("empty caption", "empty_caption")
            if image_id not in files or not files[image_id]:
                raise Skip(f"image_id {image_id!r} is not in `images`", "unknown_image_id")
            if cached[0] != image_id:
                cached = (image_id, _coco_image(images_dir / files[image_id]))
            if isinstance(cached[1], Skip):
                raise cached[1]
            meta = {"caption": caption.strip(), **({"source": source} if source else {})}
            yield sample_key(record_id, number), meta, [cached[1]]
        except Skip as skip:
            yield record_id, skip


def _coco_image(file: Path) -> tuple[str, bytes] | Skip:
    if not file.is_file():
        return Skip(f"image file missing: {file}", "image_missing")
    try:
        return image_entry(file.read_bytes())
    except Skip as skip:
        return skip


def read_coco(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not a JSON file: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list) \
            or not isinstance(document.get("images"), list):
        raise UsageError(f"{path} is not COCO-style caption JSON: it needs `images` and `annotations` lists")
    return document


# ---------------------------------------------------------------------------------------------------- CLI


def register(commands):
    """Add `convert llava|jsonl|hf|coco` to the `data` group's subparsers; returns the kinds' subparsers (where
    data_pipelines/tools/commands.py adds convert_interleaved's and convert_preference's)."""
    convert = commands.add_parser("convert", help="convert LLaVA JSON, JSONL, a HF dataset, COCO captions, "
                                                  "interleaved documents or preference pairs into shards")
    kinds = convert.add_subparsers(dest="convert_kind", required=True, parser_class=type(convert),
                                   metavar="{llava,jsonl,hf,coco,obelics,mmc4,llamafactory-dpo,preference-table}")
    for kind, help_text in (("llava", "LLaVA JSON: id, image (path or list), conversations (from/value)"),
                            ("jsonl", "one JSON object per line: image path(s) + caption or conversations"),
                            ("hf", "a datasets folder (save_to_disk) or local parquet/arrow files"),
                            ("coco", "COCO-style caption JSON (images + annotations): one caption sample per "
                                     "annotation")):
        parser = kinds.add_parser(kind, help=help_text)
        parser.add_argument("--input", required=True, help="the JSON/JSONL file, or the dataset folder or file")
        if kind != "hf":
            parser.add_argument("--images", help="folder image paths are relative to (default: the input's folder)")
        else:
            parser.add_argument("--image-column", default="image")
            parser.add_argument("--text-column", default="caption", help="caption column")
            parser.add_argument("--conversations-column", default="conversations")
            parser.add_argument("--id-column", default="id")
        add_output_options(parser, kind)
        parser.set_defaults(func=cmd_convert)
    return kinds


def add_output_options(parser: argparse.ArgumentParser, kind: str) -> None:
    """The options every converter shares: where and how its shards are written."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default=kind, help="shard name prefix (default: the kind)")
    parser.add_argument("--source", help="`source` to record in each sample")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--shard-bytes", type=float, default=1e9, help="target shard size in bytes (1e9)")
    parser.add_argument("--json", action="store_true", help='print {"out", "name", "kept", "skipped", '
                                                            '"skipped_by_reason", "shards"}')


def checked_paths(args: argparse.Namespace, images: bool = False) -> tuple[Path, Path]:
    """(input, out) of a converter, refused in one line: an input that does not exist, with `images` an --images
    that is not a folder (when given), an out that already holds this name's shards (nothing written is replaced)."""
    source, out = Path(args.input), Path(args.out)
    if not source.exists():
        raise UsageError(f"input {source} does not exist")
    if images and getattr(args, "images", None) and not Path(args.images).is_dir():
        raise UsageError(f"--images {args.images} is not a folder")
    if out.is_dir() and any(out.glob(f"{args.name}-*.tar")):
        raise UsageError(f"{out} already holds {args.name}-*.tar shards")
    return source, out


def cmd_convert(args: argparse.Namespace) -> int:
    source, out = checked_paths(args)
    records, total = input_records(args, source)
    summary = write_shards(records, out, args.name, args.samples_per_shard, int(args.shard_bytes), total)
    report_summary(summary, out, args.name, args.json)
    return 0


def input_records(args: argparse.Namespace, source: Path) -> tuple[Iterator, int | None]:
    """(records, their count when known up front) of the input `convert KIND` names."""
    if args.convert_kind == "hf":
        return hf_records(str(source), args.image_column, args.text_column, args.conversations_column,
                          args.id_column, args.source), None
    images_dir = Path(args.images) if args.images else source.parent
    if args.convert_kind == "coco":
        document = read_coco(source)
        return coco_records(document, images_dir, args.source), len(document["annotations"])
    if args.convert_kind == "jsonl":
        return file_records(jsonl_rows(source), images_dir, args.source), None
    try:
        rows = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{source} is not a JSON file: {err}") from None
    if not isinstance(rows, list):
        raise UsageError(f"{source} must hold a JSON list of records")
    return file_records(rows, images_dir, args.source), len(rows)


def report_summary(summary: dict, out: Path, name: str, as_json: bool = False) -> None:
    """The summary line as the result, or with `as_json` the counts as the one JSON result and the line on stderr."""
    reasons = ", ".join(f"{reason}={count}" for reason, count in summary["skipped_by_reason"].items())
    line = (f"converted: kept {summary['kept']}, skipped {summary['skipped']}, "
            f"{summary['shards']} shard(s) in {out}/{name}-*.tar" + (f" (skipped: {reasons})" if reasons else ""))
    if as_json:
        result_json({"out": str(out), "name": name, **summary})
        print(line, file=sys.stderr)
    else:
        result(line)
