"""`kakehashi data synth-bench --task NAME --out DIR`: a small benchmark-shaped set from the synthetic shapes, in the
benchmark's published schema, so every benchmark task runs end to end without the real files (nothing is
downloaded).

Questions are about the drawn shape's colour and kind, in each benchmark's own form: JA-VG-VQA-500's images with
several qas, JA-VLM-Bench-in-the-Wild's image / question / answer, Heron-Bench's categories, contexts and per-model
reference answers, JMMMU's lettered options over <image 1>, JDocQA's four answer types over page images. Written as
a `datasets` save_to_disk DatasetDict (the default; what `load_dataset(...).save_to_disk(DIR)` gives), as parquet
files named like the hub's, or as jsonl with PNG files beside it. The same rows for the same arguments.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from PIL import Image

from data_pipelines.synthetic.synth import COLOUR_QUESTION, COLOURS, SHAPE_QUESTION, SHAPES, draw_shape, png_bytes

BENCH_TASKS = ("ja-vg-vqa-500", "ja-vlm-bench-in-the-wild", "japanese-heron-bench", "jmmmu", "jdocqa")
SPLITS = {"japanese-heron-bench": "train"}  # the split eval-mm reads; the others read test
FORMATS = ("disk", "parquet", "jsonl")
CORNERS = {"円": "0", "三角形": "3", "四角形": "4"}
HERON_REFERENCE_MODEL = "gpt-4-0125-preview"
JMMMU_SUBJECTS = ("Design", "Accounting", "Math", "Pharmacy", "Computer_Science")  # one per eval-mm domain


def _shape(rng: random.Random, image_size: int):
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return colour, shape, draw_shape(rng, shape, colour, image_size)


def vg_vqa_rows(rng, samples, image_size) -> list[dict]:
    rows = []
    for n in range(samples):
        colour, shape, image = _shape(rng, image_size)
        qas = [{"qa_id": 2 * n, "question": COLOUR_QUESTION, "answer": f"{colour}色です。"},
               {"qa_id": 2 * n + 1, "question": SHAPE_QUESTION, "answer": f"{shape}です。"}]
        rows.append({"image_id": n, "image": image, "qas": qas})
    return rows


def vlm_bench_rows(rng, samples, image_size) -> list[dict]:
    rows = []
    for n in range(samples):
        colour, shape, image = _shape(rng, image_size)
        question, answer = (COLOUR_QUESTION, f"{colour}色です。") if n % 2 == 0 else (SHAPE_QUESTION, f"{shape}です。")
        rows.append({"page_url": "", "image_url": "", "image": image, "question": question, "answer": answer})
    return rows


def heron_rows(rng, samples, image_size) -> list[dict]:
    rows = []
    for n in range(samples):
        colour, shape, image = _shape(rng, image_size)
        category = ("conv", "detail", "complex")[n % 3]
        text, reference = {
            "conv": (COLOUR_QUESTION, f"{colour}色です。"),
            "detail": ("この画像を詳しく説明してください。", f"白い背景に{colour}色の{shape}が描かれています。"),
            "complex": ("この図形の角はいくつですか？", f"{shape}なので、角は{CORNERS[shape]}つです。"),
        }[category]
        rows.append({"question_id": n, "image_category": "synthetic", "image": image, "category": category,
                     "context": f"白い背景に{colour}色の{shape}が描かれている。", "text": text,
                     "answer": {HERON_REFERENCE_MODEL: reference, "claude-3-opus-20240229": reference}})
    return rows


def jmmmu_rows(rng, samples, image_size) -> list[dict]:
    rows = []
    for n in range(samples):
        colour, shape, image = _shape(rng, image_size)
        subject = JMMMU_SUBJECTS[n % len(JMMMU_SUBJECTS)]
        if n % 3 == 2:  # an open question, as some of JMMMU's are
            question, options, answer, kind = "<image 1>この図形の角はいくつですか？", "[]", CORNERS[shape], "open"
        else:
            choices = rng.sample([c for c in COLOURS if c != colour], 3) + [colour]
            rng.shuffle(choices)
            options = str([f"{c}色" for c in choices])
            question, answer, kind = "<image 1>この図形は何色ですか？", "ABCD"[choices.index(colour)], "multiple-choice"
        row = {"id": f"test_{subject}_{n + 1}", "question": question, "options": options, "explanation": "",
               "image_1": image, **{f"image_{i}": None for i in range(2, 8)}, "answer": answer,
               "question_type": kind, "subfield": subject}
        rows.append(row)
    return rows


def jdocqa_rows(rng, samples, image_size) -> list[dict]:
    rows = []
    for n in range(samples):
        colour, shape, image = _shape(rng, image_size)
        answer_type = n % 4
        asked = rng.choice(list(COLOURS))
        question, answer = [
            (f"この図形は{asked}色ですか？", "はい" if asked == colour else "いいえ"),
            (COLOUR_QUESTION, f"{colour}色です"),
            ("この図形の角はいくつですか？", CORNERS[shape]),
            ("この図形について説明してください。", f"白い背景に{colour}色の{shape}が描かれています"),
        ][answer_type]
        rows.append({"question_id": n, "question": question, "answer": answer, "answer_type": answer_type,
                     "image_0": image, "image_1": None, "image_2": None, "image_3": None})
    return rows


ROWS = {"ja-vg-vqa-500": vg_vqa_rows, "ja-vlm-bench-in-the-wild": vlm_bench_rows,
        "japanese-heron-bench": heron_rows, "jmmmu": jmmmu_rows, "jdocqa": jdocqa_rows}


def features(task: str):
    """The `datasets` features of a task's published schema (images as Image, nested records as lists / structs)."""
    from datasets import Features, Image, Value

    text, number = Value("string"), Value("int64")
    return Features({
        "ja-vg-vqa-500": lambda: {"image_id": number, "image": Image(),
                                  "qas": [{"qa_id": number, "question": text, "answer": text}]},
        "ja-vlm-bench-in-the-wild": lambda: {"page_url": text, "image_url": text, "image": Image(), "question": text,
                                             "answer": text},
        "japanese-heron-bench": lambda: {"question_id": number, "image_category": text, "image": Image(),
                                         "category": text, "context": text, "text": text,
                                         "answer": {HERON_REFERENCE_MODEL: text, "claude-3-opus-20240229": text}},
        "jmmmu": lambda: {"id": text, "question": text, "options": text, "explanation": text,
                          **{f"image_{i}": Image() for i in range(1, 8)}, "answer": text, "question_type": text,
                          "subfield": text},
        "jdocqa": lambda: {"question_id": number, "question": text, "answer": text, "answer_type": number,
                           **{f"image_{i}": Image() for i in range(4)}},
    }[task]())


def synth_bench(task: str, out: Path | str, samples: int = 12, seed: int = 0, image_size: int = 64,
                fmt: str = "disk") -> dict:
    """Write the task's synthetic set into `out` (replacing it) and say what was written."""
    out = Path(out)
    rng = random.Random(f"kakehashi-synth-bench:{task}:{seed}")  # not the training sets' seeds: fresh shapes
    rows = ROWS[task](rng, samples, image_size)
    split = SPLITS.get(task, "test")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if fmt == "jsonl":
        path = _write_jsonl(rows, out, split)
    else:
        from datasets import Dataset, DatasetDict

        dataset = Dataset.from_list(rows, features=features(task))
        if fmt == "parquet":
            path = out / f"{split}-00000-of-00001.parquet"
            dataset.to_parquet(str(path))
        else:
            path = out
            DatasetDict({split: dataset}).save_to_disk(str(out))
    questions = sum(len(r["qas"]) for r in rows) if task == "ja-vg-vqa-500" else len(rows)
    return {"task": task, "out": str(out), "path": str(path), "format": fmt, "split": split, "rows": len(rows),
            "questions": questions}


def _write_jsonl(rows: list[dict], out: Path, split: str) -> Path:
    """One JSON object per row; each image a PNG under images/, named by a path relative to the jsonl file."""
    (out / "images").mkdir()
    lines = []
    for number, row in enumerate(rows):
        record = {}
        for key, value in row.items():
            if isinstance(value, Image.Image):
                name = f"images/{number:06d}-{key}.png"
                (out / name).write_bytes(png_bytes(value))
                value = name
            record[key] = value
        lines.append(json.dumps(record, ensure_ascii=False))
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
