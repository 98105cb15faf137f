"""`kakehashi data convert llamafactory-dpo|preference-table`: preference pairs -> `task: preference` shards (DPO/MPO).

A preference sample is `KEY.json` {"prompt": [{"role": "user", "content": "<image>\\n..."}, ...], "chosen": "...",
"rejected": "...", "source": ...} with its images as `KEY.png` or `KEY.0.jpg`, `KEY.1.png`, ... (original bytes). The
prompt alternates user/assistant turns from a user turn and ends on one; its `<image>` placeholders, one per image in
order, never appear in an answer. A pair that cannot be learnt from (identical or empty answers, a placeholder count
differing from the images, a missing or undecodable image, a malformed prompt) is skipped and counted by reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Iterator

from data_pipelines.errors import UsageError
from data_pipelines.render.templates import IMAGE_PLACEHOLDER
from data_pipelines.tools.convert import (
    ROLES,
    Record,
    Skip,
    add_output_options,
    checked_paths,
    image_entry,
    normalise_conversations,
    report_summary,
    sample_key,
    write_shards,
)
from data_pipelines.tools.convert_interleaved import table_rows


def answer_text(answer) -> str:
    """An answer given as a string or as one assistant turn ({from: gpt, value} or {role: assistant, content})."""
    if isinstance(answer, dict):
        speaker = answer.get("from", answer.get("role", "assistant"))
        if ROLES.get(str(speaker).lower()) != "assistant":
            raise Skip(f"an answer's speaker is {speaker!r}, not the assistant", "malformed_conversation")
        answer = answer.get("value", answer.get("content"))
    if answer is None or isinstance(answer, str) and not answer.strip():
        raise Skip("empty answer", "empty_answer")
    if not isinstance(answer, str):
        raise Skip("an answer is not a string", "malformed_conversation")
    if IMAGE_PLACEHOLDER in answer:  # an image is given with the question; a placeholder in a target is not one
        raise Skip(f"{IMAGE_PLACEHOLDER} inside an answer", "placeholder_in_answer")
    return answer


def preference_meta(prompt, chosen, rejected, images: int, source: str | None) -> dict:
    """The preference sample JSON for a prompt (LLaVA or role/content turns) and two answers. Raises Skip."""
    chosen, rejected = answer_text(chosen), answer_text(rejected)
    if chosen.strip() == rejected.strip():  # no preference to learn, and DPO's loss is constant on such a pair
        raise Skip("chosen and rejected are the same answer", "identical_answers")
    if not isinstance(prompt, list) or len(prompt) % 2 == 0:  # turns alternating from a user turn end on one: odd
        raise Skip("the prompt is not a list of turns ending with a user turn", "malformed_conversation")
    # with the chosen answer after it, a well-formed prompt is a conversation from user to assistant: that check
    # (roles alternating from the user, string contents) is normalise_conversations'
    turns = normalise_conversations(prompt + [{"role": "assistant", "content": chosen}])[:-1]
    placeholders = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != images:
        raise Skip(f"{placeholders} {IMAGE_PLACEHOLDER} for {images} image(s)", "image_count_mismatch")
    return {"prompt": turns, "chosen": chosen, "rejected": rejected, **({"source": source} if source else {})}


# ------------------------------------------------------------------------------------- LLaMA-Factory DPO


def file_image(images_dir: Path, path) -> tuple[str, bytes]:
    if not isinstance(path, str) or not path:
        raise Skip(f"image entry {path!r} is not a path", "image_missing")
    file = images_dir / path  # an absolute path stays itself
    if not file.is_file():
        raise Skip(f"image file missing: {file}", "image_missing")
    return image_entry(file.read_bytes())


def llamafactory_records(rows: list, images_dir: Path, source: str | None) -> Iterator[Record | tuple[str, Skip]]:
    """LLaMA-Factory's ranking (DPO) records, sharegpt style: `conversations` (from/value) or `messages`
    (role/content), `chosen` and `rejected` turns, `images` paths. Images are read after the text checks pass."""
    for number, row in enumerate(rows):
        record_id = row.get("id", number) if isinstance(row, dict) else number
        try:
            if not isinstance(row, dict):
                raise Skip("not a JSON object", "not_an_object")
            paths = row.get("images") or []
            paths = [paths] if isinstance(paths, str) else paths
            prompt = row["conversations"] if "conversations" in row else row.get("messages")
            meta = preference_meta(prompt, row.get("chosen"), row.get("rejected"), len(paths),
                                   source or row.get("source"))
            yield sample_key(record_id, number), meta, [file_image(images_dir, path) for path in paths]
        except Skip as skip:
            yield str(record_id), skip


def read_json_list(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not a JSON file: {err}") from None
    if not isinstance(rows, list):
        raise UsageError(f"{path} must hold a JSON list of records")
    return rows


# ------------------------------------------------------------------------------------- preference tables


def cell_image(item) -> tuple[str, bytes]:
    """A table's image cell: a `datasets` Image {"bytes", "path"} (the path read when no bytes) or raw bytes."""
    data = item.get("bytes") if isinstance(item, dict) else item
    if data is None and isinstance(item, dict) and isinstance(item.get("path"), str):
        if not Path(item["path"]).is_file():
            raise Skip(f"image file missing: {item['path']}", "image_missing")
        data = Path(item["path"]).read_bytes()
    if not isinstance(data, bytes):
        raise Skip("image cell holds no bytes", "image_missing")
    return image_entry(data)


def table_records(rows: Iterator[dict], args: argparse.Namespace) -> Iterator[Record | tuple[str, Skip]]:
    """RLAIF-V / VLFeedback / MMPR-shaped rows: an image (or a list of them), a question, chosen and rejected. The
    question becomes one user turn, the images' placeholders before it unless it places them itself."""
    for number, row in enumerate(rows):
        record_id = row.get(args.id_column)
        record_id = number if record_id in (None, "") else record_id
        try:
            question, cell = row[args.question_column], row[args.image_column]
            if not isinstance(question, str):
                raise Skip("the question is not a string", "malformed_conversation")
            if cell is None:
                raise Skip("no image", "image_missing")
            cells = cell if isinstance(cell, list) else [cell]
            if IMAGE_PLACEHOLDER not in question:
                question = f"{IMAGE_PLACEHOLDER}\n" * len(cells) + question
            meta = preference_meta([{"role": "user", "content": question}], row[args.chosen_column],
                                   row[args.rejected_column], len(cells), args.source)
            yield sample_key(record_id, number), meta, [cell_image(item) for item in cells]
        except Skip as skip:
            yield str(record_id), skip


def checked_rows(path: Path, args: argparse.Namespace) -> Iterator[dict]:
    """The table's rows, once its first row shows every named column is there (a wrong name is a usage error,
    not every row skipped)."""
    rows = table_rows(path)
    first = next(rows, None)
    if first is None:
        return iter(())
    columns = (args.image_column, args.question_column, args.chosen_column, args.rejected_column)
    missing = [column for column in columns if column not in first]
    if missing:
        raise UsageError(f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(first)})")
    return itertools.chain([first], rows)


# ------------------------------------------------------------------------------------------------- CLI


def register(kinds) -> None:
    """Add `llamafactory-dpo` and `preference-table` to `data convert`'s kinds."""
    dpo = kinds.add_parser("llamafactory-dpo", help="LLaMA-Factory ranking JSON: conversations (from/value) or "
                                                    "messages (role/content), chosen, rejected, images")
    dpo.add_argument("--input", required=True, help="the JSON file (a list of records)")
    dpo.add_argument("--images", help="folder image paths are relative to (default: the input's folder)")
    table = kinds.add_parser("preference-table", help="parquet file(s) or a datasets folder with an image, a "
                                                      "question, chosen and rejected (RLAIF-V, VLFeedback, MMPR)")
    table.add_argument("--input", required=True, help="a parquet file, a folder of them, or a datasets folder")
    table.add_argument("--image-column", default="image", help="Image feature, {bytes, path} or bytes (or a list)")
    table.add_argument("--question-column", default="question")
    table.add_argument("--chosen-column", default="chosen")
    table.add_argument("--rejected-column", default="rejected")
    table.add_argument("--id-column", default="id", help="the key (default: the row number where it is absent)")
    for kind, parser in (("llamafactory-dpo", dpo), ("preference-table", table)):
        add_output_options(parser, kind)
        parser.set_defaults(func=cmd_convert_preference)


def cmd_convert_preference(args: argparse.Namespace) -> int:
    source, out = checked_paths(args, images=True)
    if args.convert_kind == "llamafactory-dpo":
        rows = read_json_list(source)
        images_dir = Path(args.images) if args.images else source.parent
        records, total = llamafactory_records(rows, images_dir, args.source), len(rows)
    else:
        records, total = table_records(checked_rows(source, args), args), None
    summary = write_shards(records, out, args.name, args.samples_per_shard, int(args.shard_bytes), total)
    report_summary(summary, out, args.name, args.json)
    return 0
