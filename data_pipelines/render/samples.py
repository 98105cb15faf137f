"""Checks a raw shard sample and renders it: the part of loading shared by the loader and `data preview`."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from data_pipelines.image.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image
from data_pipelines.read.shards import RawSample
from data_pipelines.render.templates import IMAGE_PLACEHOLDER, Segment, render

TASK_FIELDS = {"caption": "caption", "vqa": "conversations"}  # task kind -> the JSON field its samples carry


class BadSample(Exception):
    """A sample to skip. `reason` is a short snake_case key for the stats; the message gives details.

    Reasons: truncated_shard, unreadable_shard, json_not_utf8, json_invalid, json_missing, image_without_json,
    duplicate_image_index (from shard_reader); json_no_known_fields, task_mismatch, empty_conversation,
    malformed_conversation, image_count_mismatch (here); not_an_image, undecodable_image, truncated_image,
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
    images: list[Image.Image]  # decoded RGB, in placeholder order


def sample_task(meta: dict) -> str | None:
    for task, field in TASK_FIELDS.items():
        if field in meta:
            return task
    return None


def prepare_sample(raw: RawSample, *, task: str | None, template: str, eos_token: str, tokenizer=None,
                   decode_images: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PreparedSample:
    """Render `raw` with `template`, check its images match its placeholders, decode them. Raises BadSample.

    `task` (caption | vqa) is what the source promises; None accepts either (as `data preview` does).
    """
    if raw.error is not None:
        raise BadSample(raw.error)
    kind = sample_task(raw.meta)
    if kind is None:
        raise BadSample("json_no_known_fields", "sample has neither 'caption' nor 'conversations'")
    if task is not None and kind != task:
        raise BadSample("task_mismatch", f"a {task} source sample needs a {TASK_FIELDS[task]!r} field")
    if kind == "vqa" and raw.meta["conversations"] in ([], None, ""):
        raise BadSample("empty_conversation", "conversations is empty")
    if kind == "caption" and not raw.images:
        raise BadSample("image_count_mismatch", "caption sample without an image")
    try:
        segments = render(raw.meta, template, eos_token, tokenizer, num_images=len(raw.images))
    except ValueError as err:
        raise BadSample("malformed_conversation", str(err)) from None
    placeholders = sum(segment.text.count(IMAGE_PLACEHOLDER) for segment in segments)
    if placeholders != len(raw.images):
        raise BadSample("image_count_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} for {len(raw.images)} image(s)")
    if any(IMAGE_PLACEHOLDER in segment.text for segment in segments if segment.is_target):
        raise BadSample("image_count_mismatch", f"{IMAGE_PLACEHOLDER} inside an answer")
    images = []
    if decode_images:
        for index, data in enumerate(raw.images):
            try:
                images.append(decode_image(data, max_image_pixels))
            except ImageError as err:
                raise BadSample(err.reason, f"image {index}: {err}") from None
    return PreparedSample(key=raw.key, shard=raw.shard, segments=segments, images=images)
