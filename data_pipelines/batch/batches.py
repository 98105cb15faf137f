"""Worker side of the loader: one logical worker's micro-batches, built whole from its own slice of every source.

Logical worker w of W on rank r makes micro-batches w, w+W, w+2W, ... of that rank; its source streams read
slot r*W + w of every source (see streams). Micro-batch k draws its sources by weight from a RNG seeded by
(seed, rank, k), so the batch sequence depends only on the arguments, never on worker timing. Each batch carries
the worker's state after it, which is what MixtureLoader.state_dict saves.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image

from data_pipelines.batch.collate import collate, collate_pairs
from data_pipelines.batch.pack import collate_packed, first_fit_decreasing
from data_pipelines.errors import TooManyBadSamples  # raised here; still importable from here
from data_pipelines.image.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image
from data_pipelines.image.pixels import ResizeMode, load_pixels, stack_pixels
from data_pipelines.read.shard_reader import RawSample
from data_pipelines.read.streams import SourceStream, StreamState, UnitPlan, seeded_rng
from data_pipelines.render.example import Example
from data_pipelines.render.samples import BadSample, prepare_sample
from data_pipelines.render.tokenize import encode

logger = logging.getLogger("data_pipelines.batch.loader")
MIN_SAMPLES_FOR_BAD_LIMIT = 100  # judge the bad share only once it means something


@dataclass
class WorkerConfig:
    """Everything a worker needs; picklable apart from what the caller passes (tokenizer, image_transform)."""

    names: list[str]
    tasks: list[str]
    weights: list[float]
    shards: list[list[str]]
    tokenizer: object
    template: str
    tokens_per_image: int | None  # None with `patchify`: the count then depends on each image
    max_length: int
    micro_batch_size: int
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1; 1 when the DataLoader runs in-process)
    shuffle_buffer: int
    pad_token_id: int
    image_size: int | None = None
    resize_mode: ResizeMode = "squash"
    image_transform: Callable[[list[Image.Image]], torch.Tensor] | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    bad_sample_limit: float = 0.01
    packing: bool = False  # rows hold several examples up to max_length tokens (see pack.py)
    patchify: Callable | None = None  # patches.DynamicResolutionPatches (Qwen2-VL): no image_size, no transform
    image_start_end: tuple[str, str] | None = None  # special tokens around each image's tokens
    max_images_per_sample: int | None = None  # documents keep their first N images (None: all)


@dataclass
class WorkerState:
    next_batch: int  # rank-local index of the worker's next micro-batch
    streams: list[dict]  # StreamState per source, as dicts
    samples: int = 0  # good samples this worker read (put into batches, or waiting in the packing buffer)
    bad: dict[str, int] = field(default_factory=dict)  # reason -> count, of samples this worker read
    pending: list[dict] = field(default_factory=list)  # packing buffer: {"source", "stream" (before the read), "age"}

    def to_dict(self) -> dict:
        return dict(vars(self))  # WorkerBatches.state() builds every list and dict in it afresh: no deep copy


@dataclass
class Pending:
    """An example read for packing that has not fit into a row yet. `stream` is its source's StreamState just
    before it was read: the buffer is saved as these few integers and rebuilt by reading again on resume."""

    example: Example
    source: int
    stream: dict
    age: int = 0  # micro-batches it has waited; past MAX_WAIT it is placed first

    def to_dict(self) -> dict:
        return {"source": self.source, "stream": dict(self.stream), "age": self.age}


MAX_WAIT = 4


def bad_share_message(bad: dict[str, int], good: int, limit: float) -> str:
    read = good + sum(bad.values())
    reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(bad.items()))
    return (f"{sum(bad.values())} of {read} samples read were bad ({sum(bad.values()) / max(read, 1):.1%}, "
            f"limit {limit:.1%}): {reasons}")


def over_bad_limit(bad: dict[str, int], good: int, limit: float) -> bool:
    read = good + sum(bad.values())
    return read >= MIN_SAMPLES_FOR_BAD_LIMIT and sum(bad.values()) > limit * read


class WorkerBatches:
    """Endless iterator of logical worker `worker`'s collated micro-batches (see the module docstring)."""

    def __init__(self, config: WorkerConfig, worker: int, state: dict | None = None):
        self.config, self.worker = config, worker
        slots = config.world_size * config.num_workers
        slot = config.rank * config.num_workers + worker
        state = WorkerState(**state) if state else WorkerState(next_batch=worker, streams=[{}] * len(config.names))
        self.next_batch, self.samples, self.bad = state.next_batch, state.samples, Counter(state.bad)
        self.streams = [
            SourceStream(UnitPlan(shards, seed=config.seed, source_index=index, num_slots=slots), slot,
                         config.shuffle_buffer, StreamState(**stream_state) if stream_state else None)
            for index, (shards, stream_state) in enumerate(zip(config.shards, state.streams))
        ]
        self.units_at_good = [stream.units_read for stream in self.streams]
        self.bad_log: list[str] = []
        self.pending = self.reread_pending(state.pending)

    def state(self) -> WorkerState:
        return WorkerState(next_batch=self.next_batch, streams=[s.state_dict() for s in self.streams],
                           samples=self.samples, bad=dict(self.bad), pending=[p.to_dict() for p in self.pending])

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        config = self.config
        rng = seeded_rng(config.seed, "mixture", config.rank, self.next_batch)
        if config.packing:
            batch = self.next_packed_batch(rng)
        else:
            picks = rng.choices(range(len(config.names)), weights=config.weights, k=config.micro_batch_size)
            examples = [self.next_example(pick) for pick in picks]
            pairs = any(example.rejected is not None for example in examples)  # a preference stage's sources
            batch = (collate_pairs if pairs else collate)(examples, config.pad_token_id)
        self.next_batch += config.num_workers
        batch.update(_worker=self.worker, _state=self.state().to_dict(), _bad_log=self.bad_log)
        self.bad_log = []
        return batch

    def next_packed_batch(self, rng) -> dict:
        """Fill micro_batch_size rows of max_length tokens by first-fit decreasing over a buffer holding about
        twice the rows' capacity; what does not fit waits for the next micro-batch."""
        config = self.config
        capacity = config.micro_batch_size * config.max_length
        while (len(self.pending) < config.micro_batch_size
               or sum(len(p.example.input_ids) for p in self.pending) < 2 * capacity):
            source = rng.choices(range(len(config.names)), weights=config.weights)[0]
            before = self.streams[source].state_dict()
            self.pending.append(Pending(self.next_example(source), source, before))
        rows = first_fit_decreasing([len(p.example.input_ids) for p in self.pending], config.micro_batch_size,
                                    config.max_length, priority=[p.age >= MAX_WAIT for p in self.pending])
        batch = collate_packed([[self.pending[i].example for i in row] for row in rows], config.pad_token_id)
        used = {i for row in rows for i in row}
        self.pending = [Pending(p.example, p.source, p.stream, p.age + 1)
                        for i, p in enumerate(self.pending) if i not in used]
        return batch

    def reread_pending(self, saved: list[dict]) -> list[Pending]:
        """Rebuild the packing buffer from its saved stream positions: per source, read forward once from the
        earliest position and keep the examples that start at a saved one (bad samples met were counted before)."""
        rebuilt: dict[int, Pending] = {}
        config = self.config
        slot = config.rank * config.num_workers + self.worker
        for source in sorted({p["source"] for p in saved}):
            wanted = [(i, p) for i, p in enumerate(saved) if p["source"] == source]
            plan = self.streams[source].plan
            stream = SourceStream(plan, slot, config.shuffle_buffer, StreamState(**wanted[0][1]["stream"]))
            for index, p in wanted:
                while stream.state_dict() != p["stream"]:
                    # units_read runs a block ahead (a block of a small source spans many units), as in next_example
                    if stream.units_read > plan.units_per_epoch * 2 + stream.block_size + int(p["stream"]["unit"]):
                        raise RuntimeError(f"loader state: a buffered sample of source {config.names[source]!r} "
                                           "was not found again; are the shards the ones the state was saved with?")
                    next(stream)
                while True:
                    try:
                        example = self.build_example(next(stream), source)
                        break
                    except BadSample:
                        continue  # counted when it was first read
                rebuilt[index] = Pending(example, source, p["stream"], p["age"])
        return [rebuilt[i] for i in range(len(saved))]

    def next_example(self, source: int) -> Example:
        """The source's next usable example; bad ones on the way are counted and logged."""
        stream = self.streams[source]
        while True:
            raw = next(stream)
            try:
                example = self.build_example(raw, source)
            except BadSample as bad:
                self.bad[bad.reason] += 1
                self.bad_log.append(f"shard={raw.shard} key={raw.key} {bad.describe()}")
                if over_bad_limit(self.bad, self.samples, self.config.bad_sample_limit):
                    limit = self.config.bad_sample_limit
                    raise TooManyBadSamples(bad_share_message(self.bad, self.samples, limit)) from None
                if stream.units_read - self.units_at_good[source] > stream.plan.units_per_epoch + stream.block_size:
                    raise RuntimeError(f"source {self.config.names[source]!r} gave rank {self.config.rank} worker "
                                       f"{self.worker} no usable sample in a whole epoch") from None
                continue
            self.samples += 1
            self.units_at_good[source] = stream.units_read
            return example

    def build_example(self, raw: RawSample, source: int) -> Example:
        return build_example(self.config, raw, source)


def build_example(config: WorkerConfig, raw: RawSample, source: int) -> Example:
    """Check, render, tokenize and decode one raw sample of source `source` as every loader does (training and
    periodic eval alike). Raises BadSample."""
    document = config.tasks[source] == "interleaved"
    prepared = prepare_sample(raw, task=config.tasks[source], template=config.template,
                              eos_token=config.tokenizer.eos_token, tokenizer=config.tokenizer,
                              decode_images=config.patchify is not None, max_image_pixels=config.max_image_pixels,
                              max_images=config.max_images_per_sample)
    tokens_per_image, patches, grid = config.tokens_per_image, None, None
    if config.patchify is not None and prepared.images:  # dynamic resolution: measure each image first
        try:
            patches, grid = config.patchify(prepared.images)
        except ValueError as err:  # e.g. smart_resize refuses an aspect ratio over 200
            raise BadSample("unusable_image", str(err)) from None
        tokens_per_image = config.patchify.tokens(grid)
    encoded = encode(prepared.segments, config.tokenizer, tokens_per_image=tokens_per_image,
                     max_length=config.max_length, image_start_end=config.image_start_end,
                     cut_between_segments=document)
    if encoded is None:
        raise BadSample("too_long", f"no target token fits in {config.max_length} tokens")
    rejected = None
    if prepared.rejected is not None:
        other = encode(prepared.rejected, config.tokenizer, tokens_per_image=tokens_per_image,
                       max_length=config.max_length, image_start_end=config.image_start_end)
        if other is None or other.num_images != encoded.num_images:  # a cut must leave both rows the same images
            raise BadSample("too_long", f"the pair's answers do not both fit in {config.max_length} tokens")
        rejected = (other.input_ids, other.labels)
    if config.patchify is not None:  # pixel rows per image vary: keep those of the images the text kept
        kept = sum(config.patchify.rows(grid)[: encoded.num_images]) if encoded.num_images else 0
        layout = {config.patchify.layout_key: grid[: encoded.num_images] if kept else None}
        return Example(key=raw.key, source=config.names[source], source_id=source, input_ids=encoded.input_ids,
                       labels=encoded.labels, pixel_values=patches[:kept] if kept else None, rejected=rejected,
                       **layout)
    images = raw.images[: encoded.num_images]  # truncation (or max_images_per_sample) drops whole trailing images
    pixel_values = None  # [n_images, 3, H, W]: uint8 at image_size, or whatever image_transform returns
    try:
        if images and config.image_size is not None:
            pixel_values = stack_pixels([load_pixels(data, config.image_size, config.resize_mode,
                                                     config.max_image_pixels) for data in images])
        elif images:
            pixel_values = config.image_transform([decode_image(data, config.max_image_pixels)
                                                   for data in images])
    except ImageError as err:
        raise BadSample(err.reason, str(err)) from None
    return Example(key=raw.key, source=config.names[source], source_id=source, input_ids=encoded.input_ids,
                   labels=encoded.labels, pixel_values=pixel_values, rejected=rejected)
