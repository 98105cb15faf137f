"""Checks a raw shard sample and renders it: the part of loading shared by the loader and `data preview`."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from data_pipelines.image.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image
from data_pipelines.read.shards import RawSample
from data_pipelines.render.templates import IMAGE_PLACEHOLDER, Segment, merge_segments, render

# task kind -> the JSON field its samples carry; the one list of tasks (recipe, loader and tools import it)
TASK_FIELDS = {"caption": "caption", "vqa": "conversations", "interleaved": "document", "preference": "chosen"}
TASKS = tuple(TASK_FIELDS)


class BadSample(Exception):
    """A sample to skip. `reason` is a short snake_case key for the stats; the message gives details.

    Reasons: truncated_shard, unreadable_shard, json_not_utf8, json_invalid, json_missing, image_without_json,
    duplicate_image_index (from shard_reader); json_no_known_fields, task_mismatch, empty_conversation,
    malformed_conversation, image_count_mismatch, malformed_document, empty_document, identical_answers,
    empty_answer (here);
    not_an_image, undecodable_image, truncated_image,
    image_too_large (images); unusable_image (dynamic resolution refuses it, batches); too_long (tokenize: even
    the image tokens and one target do not fit).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason.replace("_", " "))
        self.reason = reason

    def describe(self) -> str:
        """"reason: detail", or just the reason when there is no detail."""
        detail = str(self)
        return self.reason if detail == self.reason.replace("_", " ") else f"{self.reason}: {detail}"


@dataclass
class PreparedSample:
    key: str
    shard: str
    segments: list[Segment]
    images: list[Image.Image]  # decoded RGB, in placeholder order (empty when not decoded)
    num_images: int = 0  # images the rendered text holds (a document may leave some of the sample's out)
    rejected: list[Segment] | None = None  # a preference pair's rejected answer (`segments`: the chosen one)


def sample_task(meta: dict) -> str | None:
    for task, field in TASK_FIELDS.items():
        if field in meta:
            return task
    return None


def prepare_sample(raw: RawSample, *, task: str | None, template: str, eos_token: str, tokenizer=None,
                   decode_images: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   max_images: int | None = None) -> PreparedSample:
    """Render `raw` with `template`, check its images match its placeholders, decode them. Raises BadSample.

    `task` (one of TASKS) is what the source promises; None accepts any (as `data preview` does).
    `max_images`: a document keeps its first max_images images (the text around the others stays); None: all.
    """
    if raw.error is not None:
        raise BadSample(raw.error)
    kind = sample_task(raw.meta)
    if kind is None:
        raise BadSample("json_no_known_fields", f"sample has none of the fields {', '.join(TASK_FIELDS.values())}")
    if task is not None and kind != task:
        raise BadSample("task_mismatch", f"a {task} source sample needs a {TASK_FIELDS[task]!r} field")
    if kind == "vqa" and raw.meta["conversations"] in ([], None, ""):
        raise BadSample("empty_conversation", "conversations is empty")
    if kind == "caption" and not raw.images:
        raise BadSample("image_count_mismatch", "caption sample without an image")
    images = raw.images
    rejected = None
    if kind == "interleaved":
        segments, kept = document_segments(raw.meta["document"], len(raw.images), eos_token, max_images)
        images = raw.images[:kept]
    elif kind == "preference":
        segments, rejected = pair_segments(raw.meta, template, eos_token, tokenizer, len(raw.images))
    else:
        try:
            segments = render(raw.meta, template, eos_token, tokenizer, num_images=len(raw.images))
        except ValueError as err:
            raise BadSample("malformed_conversation", str(err)) from None
    placeholders = sum(segment.text.count(IMAGE_PLACEHOLDER) for segment in segments)
    if placeholders != len(images):
        raise BadSample("image_count_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} for {len(images)} image(s)")
    if any(IMAGE_PLACEHOLDER in segment.text for segment in segments if segment.is_target):
        raise BadSample("image_count_mismatch", f"{IMAGE_PLACEHOLDER} inside an answer")
    decoded = []
    if decode_images:
        for index, data in enumerate(images):
            try:
                decoded.append(decode_image(data, max_image_pixels))
            except ImageError as err:
                raise BadSample(err.reason, f"image {index}: {err}") from None
    return PreparedSample(key=raw.key, shard=raw.shard, segments=segments, images=decoded,
                          num_images=len(images), rejected=rejected)


def pair_segments(meta: dict, template: str, eos_token: str, tokenizer,
                  num_images: int) -> tuple[list[Segment], list[Segment]]:
    """(chosen, rejected) segments of a preference sample {"prompt": [turns ending on a user turn], "chosen": str,
    "rejected": str}: the prompt rendered with each answer as its last turn, the last answer alone the target (an
    earlier answered turn is context, as the prompt is in TRL). Raises BadSample."""
    answers = [meta.get("chosen"), meta.get("rejected")]
    if not all(isinstance(answer, str) for answer in answers):
        raise BadSample("malformed_conversation", "chosen and rejected must be strings")
    if not all(answer.strip() for answer in answers):
        raise BadSample("empty_answer", "chosen or rejected is empty")
    if answers[0].strip() == answers[1].strip():
        raise BadSample("identical_answers", "chosen and rejected are the same answer")
    if any(IMAGE_PLACEHOLDER in answer for answer in answers):
        raise BadSample("image_count_mismatch", f"{IMAGE_PLACEHOLDER} inside an answer")
    prompt = meta.get("prompt")
    last = prompt[-1] if isinstance(prompt, list) and prompt else None
    if not isinstance(last, dict) or last.get("role") != "user":
        raise BadSample("malformed_conversation", "prompt must be a list of turns ending with a user turn")
    rendered = []
    for answer in answers:
        try:
            segments = render({"conversations": [*prompt, {"role": "assistant", "content": answer}]}, template,
                              eos_token, tokenizer, num_images=num_images)
        except ValueError as err:
            raise BadSample("malformed_conversation", str(err)) from None
        last = max(i for i, segment in enumerate(segments) if segment.is_target)
        rendered.append(merge_segments([Segment(seg.text, i == last) for i, seg in enumerate(segments)]))
    return rendered[0], rendered[1]


def document_segments(document, num_images: int, eos_token: str,
                      max_images: int | None = None) -> tuple[list[Segment], int]:
    """(segments, images kept) of an interleaved document: a list of {"text": str} and {"image": i} items, the
    images numbered 0, 1, ... in order (KEY.0.png, KEY.1.jpg, ...). Every text is a target, so the loss is on all
    of it (no prompt template); each image is its placeholder, and the "\n" between items, never targets; the
    document ends with eos (a target). Images past `max_images` are left out, the text around them kept.
    Raises BadSample: malformed_document, empty_document, image_count_mismatch."""
    if not isinstance(document, list) or not document:
        raise BadSample("empty_document", "document is not a non-empty list")
    segments, seen, kept = [], 0, 0
    for position, item in enumerate(document):
        keys = set(item) if isinstance(item, dict) else set()
        if keys == {"text"} and isinstance(item["text"], str) and item["text"]:
            if IMAGE_PLACEHOLDER in item["text"]:
                raise BadSample("malformed_document", f"item {position}: {IMAGE_PLACEHOLDER} inside a text")
            segments.append(Segment(item["text"], True))
        elif keys == {"image"} and item["image"] == seen and not isinstance(item["image"], bool):
            seen += 1
            if max_images is not None and seen > max_images:
                continue
            segments.append(Segment(IMAGE_PLACEHOLDER, False))
            kept += 1
        elif keys == {"image"} and isinstance(item["image"], int):
            raise BadSample("image_count_mismatch", f"item {position}: image {item['image']}, expected {seen}")
        else:
            raise BadSample("malformed_document", f"item {position} is not {{'text': non-empty str}} or "
                                                  "{'image': index}")
    if seen != num_images:
        raise BadSample("image_count_mismatch", f"document names {seen} image(s), the sample has {num_images}")
    if not any(segment.is_target for segment in segments):
        raise BadSample("empty_document", "document has no text")
    joined = [piece for i, segment in enumerate(segments)
              for piece in ([Segment("\n", False)] if i else []) + [segment]]
    return merge_segments(joined + [Segment(eos_token, True)]), kept
