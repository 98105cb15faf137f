"""The embedded default dataset: coloured shapes with Japanese captions and VQA, generated offline from a seed."""

from __future__ import annotations

import io
import json
import os
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

from data_pipelines.read.shards import ShardWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "赤": (220, 30, 30),
    "青": (30, 60, 220),
    "緑": (30, 170, 60),
    "黄": (240, 210, 30),
    "紫": (140, 50, 170),
    "橙": (245, 140, 20),
}
SHAPES = ("円", "四角形", "三角形")
COLOUR_JITTER = 15

CAPTION_PATTERNS = ("白い背景に{c}色の{s}が描かれている。", "{c}色の{s}の画像です。", "{c}色の{s}があります。")
COLOUR_QUESTION, SHAPE_QUESTION = "この図形は何色ですか？", "この図形は何ですか？"
TEXT_ONLY_QA = (  # questions about colours and shapes that need no image
    ("赤と青を混ぜると何色になりますか？", "紫色です。"),
    ("赤と黄を混ぜると何色になりますか？", "橙色です。"),
    ("青と黄を混ぜると何色になりますか？", "緑色です。"),
    ("円には角がいくつありますか？", "円には角がありません。"),
    ("三角形には角がいくつありますか？", "三つあります。"),
    ("四角形には角がいくつありますか？", "四つあります。"),
    ("信号で「止まれ」を表すのは何色ですか？", "赤色です。"),
    ("空は晴れた日に何色に見えますか？", "青色です。"),
)
SOURCE = "synth-shapes"
DOCUMENT_OPENING = "図形を順に紹介します。"


def draw_shape(rng: random.Random, shape: str, colour: str, image_size: int = 64) -> Image.Image:
    """One shape, 35-80% of the image across, somewhere on a random light background."""
    background = tuple(rng.randint(215, 255) for _ in range(3))
    fill = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    image = Image.new("RGB", (image_size, image_size), background)
    size = round(image_size * rng.uniform(0.35, 0.8))
    left, top = rng.randint(0, image_size - size), rng.randint(0, image_size - size)
    paint(ImageDraw.Draw(image), shape, left, top, size, fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def paint(draw: ImageDraw.ImageDraw, shape: str, left: int, top: int, size: int, fill: tuple) -> None:
    box = (left, top, left + size - 1, top + size - 1)
    if shape == "円":
        draw.ellipse(box, fill=fill)
    elif shape == "四角形":
        draw.rectangle(box, fill=fill)
    elif shape == "三角形":
        draw.polygon([(left + size / 2, top), (box[2], box[3]), (left, box[3])], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def caption_sample(rng: random.Random, image_size: int) -> tuple[dict, list[tuple[str, bytes]]]:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    caption = rng.choice(CAPTION_PATTERNS).format(c=colour, s=shape)
    return {"caption": caption, "source": SOURCE}, [("png", png_bytes(draw_shape(rng, shape, colour, image_size)))]


# The detail set: a small shape (3-6 px) on a canvas of 2 to 4 tiles of 32 px, as wide as 4:1 or as tall as 1:4.
# Squashed to one 32 px view it covers about a pixel along the long side, a few percent of a patch; the tiles keep it
# whole (the tiny tiled recipe).
DETAIL_CANVASES = ((64, 32), (32, 64), (64, 64), (96, 32), (32, 96), (128, 32), (32, 128))
DETAIL_SHAPE_PX = (3, 6)


def draw_detail(rng: random.Random, shape: str, colour: str) -> Image.Image:
    """One small shape (DETAIL_SHAPE_PX across) anywhere on a light canvas drawn from DETAIL_CANVASES."""
    width, height = rng.choice(DETAIL_CANVASES)
    image = Image.new("RGB", (width, height), tuple(rng.randint(215, 255) for _ in range(3)))
    fill = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    size = rng.randint(*DETAIL_SHAPE_PX)
    paint(ImageDraw.Draw(image), shape, rng.randint(0, width - size), rng.randint(0, height - size), size, fill)
    return image


def detail_sample(rng: random.Random, image_size: int) -> tuple[dict, list[tuple[str, bytes]]]:
    """The VQA questions (vqa_sample) about a small shape on a wide, tall or large canvas (`image_size` unused)."""
    return vqa_sample(rng, image_size, draw=lambda shape, colour: draw_detail(rng, shape, colour))


def vqa_sample(rng: random.Random, image_size: int, draw=None) -> tuple[dict, list[tuple[str, bytes]]]:
    """Colour question, shape question, both in two turns, or (about 10%) a text-only question. `draw(shape,
    colour)` draws the image (default: draw_shape at image_size)."""
    kind = rng.random()
    if kind < 0.1:
        question, answer = rng.choice(TEXT_ONLY_QA)
        return {"conversations": _turns([(question, answer)]), "source": SOURCE}, []
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    colour_qa, shape_qa = (COLOUR_QUESTION, f"{colour}色です。"), (SHAPE_QUESTION, f"{shape}です。")
    if kind < 0.4:
        pairs = [colour_qa]
    elif kind < 0.7:
        pairs = [shape_qa]
    else:
        pairs = [colour_qa, shape_qa] if rng.random() < 0.5 else [shape_qa, colour_qa]
    pairs[0] = (f"<image>\n{pairs[0][0]}", pairs[0][1])
    image = draw(shape, colour) if draw else draw_shape(rng, shape, colour, image_size)
    return {"conversations": _turns(pairs), "source": SOURCE}, [("png", png_bytes(image))]


def document_sample(rng: random.Random, image_size: int) -> tuple[dict, list[tuple[str, bytes]]]:
    """An interleaved document: an opening sentence, then 2-4 shapes, each image followed by the sentence naming
    it (so the text after an image is predictable only from the image)."""
    items, images = [{"text": DOCUMENT_OPENING}], []
    for index in range(rng.randint(2, 4)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        images.append(("png", png_bytes(draw_shape(rng, shape, colour, image_size))))
        items += [{"image": index}, {"text": rng.choice(CAPTION_PATTERNS).format(c=colour, s=shape)}]
    return {"document": items, "source": SOURCE}, images


def preference_sample(rng: random.Random, image_size: int) -> tuple[dict, list[tuple[str, bytes]]]:
    """The colour question with two answers: chosen in a whole sentence ("この図形は赤色です。"), rejected as the VQA
    set teaches it ("赤色です。"): a style a preference stage can move a model toward, and measure (shapes-eval)."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    image = draw_shape(rng, shape, colour, image_size)
    meta = {"prompt": [{"role": "user", "content": f"<image>\n{COLOUR_QUESTION}"}],
            "chosen": preferred_colour_answer(colour), "rejected": f"{colour}色です。", "source": SOURCE}
    return meta, [("png", png_bytes(image))]


SENTENCE_OPENING = "この図形は"  # how the preferred colour answer opens (a piece of COLOUR_QUESTION)


def preferred_colour_answer(colour: str) -> str:
    return f"{SENTENCE_OPENING}{colour}色です。"  # every piece is in the tiny tokenizer's texts (synth_texts)


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    return [turn for q, a in pairs for turn in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def synthesize(out_dir: str | Path, samples: int = 2000, seed: int = 0, samples_per_shard: int = 500,
               image_size: int = 64, documents: int = 0, preferences: int = 0,
               details: int = 0) -> dict[str, list[str]]:
    """Write `samples` caption and `samples` VQA samples as captions-NNNNNN.tar / vqa-NNNNNN.tar plus index.json,
    `documents` interleaved documents as docs-NNNNNN.tar, `preferences` preference pairs as prefs-NNNNNN.tar and
    `details` VQA samples on small shapes (draw_detail) as detail-NNNNNN.tar (none of these by default: the set
    stays what it was).

    Byte-identical for the same arguments. index.json is written last, so its presence means the set is complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    written: dict[str, list[str]] = {}
    kinds = [("caption", "captions", caption_sample, samples), ("vqa", "vqa", vqa_sample, samples)]
    kinds += [("interleaved", "docs", document_sample, documents)] if documents else []
    kinds += [("preference", "prefs", preference_sample, preferences)] if preferences else []
    kinds += [("vqa", "detail", detail_sample, details)] if details else []
    for task, prefix, make, count in kinds:
        name = _kind_name(task, prefix)
        rng = random.Random(f"kakehashi-synth:{seed}:{name}")  # str seeds are hashed stably across processes
        with ShardWriter(out, prefix, samples_per_shard) as writer:
            for n in range(count):
                meta, images = make(rng, image_size)
                writer.write(f"{prefix}{n:06d}", meta, images)
        written[name] = writer.paths
        _remove_stale_shards(out, prefix, keep=len(writer.paths))
    index = {
        "source": SOURCE, "seed": seed, "image_size": image_size,
        "shards": [
            {"task": task, "path": Path(path).name, "samples": min(samples_per_shard, count - i * samples_per_shard)}
            for task, prefix, _, count in kinds for i, path in enumerate(written[_kind_name(task, prefix)])
        ],
    }
    tmp = out / f".index.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "index.json")
    return written


def _kind_name(task: str, prefix: str) -> str:
    """A kind's key in synthesize's result and its seed: its task, but "detail" for the small shapes (a vqa set of its
    own), so the older kinds keep their seeds and stay byte-identical."""
    return "detail" if prefix == "detail" else task


def _remove_stale_shards(out: Path, prefix: str, keep: int) -> None:
    """Delete shards of an earlier, larger run, so patterns over the folder see only this run."""
    for path in out.glob(f"{prefix}-*.tar"):
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d{{6}})\.tar", path.name)
        if match and int(match.group(1)) >= keep:
            path.unlink()


def synth_texts() -> list[str]:
    """Every text the synthetic set can contain (captions, questions, answers), for building a tokenizer."""
    texts = [pattern.format(c=c, s=s) for pattern in CAPTION_PATTERNS for c in COLOURS for s in SHAPES]
    texts += [COLOUR_QUESTION, SHAPE_QUESTION, f"<image>\n{COLOUR_QUESTION}", f"<image>\n{SHAPE_QUESTION}"]
    texts += [f"{c}色です。" for c in COLOURS] + [f"{s}です。" for s in SHAPES]
    texts += [text for pair in TEXT_ONLY_QA for text in pair]
    return texts  # not DOCUMENT_OPENING: builtin:tiny-ja is trained on these, and must stay the tokenizer it was
