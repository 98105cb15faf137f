"""Weighted mixture of endless, deterministic, rank-sharded shard streams -> collated micro-batches."""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from PIL import Image

from data_pipelines.collate import collate
from data_pipelines.example import Example
from data_pipelines.samples import BadSample, prepare_sample
from data_pipelines.shards import RawSample, expand_shard_patterns, iter_raw_samples
from data_pipelines.templates import template_format
from data_pipelines.tokenize import encode, image_token_id

logger = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    shards: list[str]  # patterns: paths, globs, brace ranges
    weight: float  # relative share of micro-batch samples
    task: Literal["caption", "vqa"]
    name: str


def seeded_rng(*parts) -> random.Random:
    """A RNG seeded from `parts` the same way in every process (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def buffered_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle of a stream: hold `size` items, emit a random one as each new item arrives."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class MixtureLoader:
    """Iterating yields collated micro-batches forever (see collate.collate for the dict).

    Each source is an endless stream: epoch e visits the source's shards in an order shuffled by
    (seed, source, e), samples in shard order through a seeded shuffle buffer, and sample i of the epoch goes to
    rank i % world_size, so ranks never share a sample within an epoch. Each micro-batch slot draws its source
    by weight from a RNG seeded by (seed, rank). Same arguments => same batches.
    Bad samples are skipped, logged and counted in `stats`.
    """

    def __init__(self, sources: list[SourceSpec], *, tokenizer,
                 image_transform: Callable[[list[Image.Image]], torch.Tensor], template: str, tokens_per_image: int,
                 max_length: int, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        for source in sources:
            if source.task not in ("caption", "vqa"):
                raise ValueError(f"source {source.name!r}: task must be 'caption' or 'vqa', got {source.task!r}")
            if not source.weight > 0:
                raise ValueError(f"source {source.name!r}: weight must be > 0, got {source.weight}")
        if min(tokens_per_image, max_length, micro_batch_size, shuffle_buffer) < 1:
            raise ValueError("tokens_per_image, max_length, micro_batch_size and shuffle_buffer must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        template_format(template)  # fail now on an unknown template, not at the first sample
        self.sources = sources
        self.shards = [expand_shard_patterns(source.shards) for source in sources]
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.template = template
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        image_token_id(tokenizer, "<image>")  # fail now if the tokenizer lacks it
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad  # right padding is masked out of the loss and attention, so eos serves as well
        self._ok = 0
        self._bad: Counter[str] = Counter()

    @property
    def stats(self) -> dict:
        return {"samples": self._ok, "bad": dict(self._bad)}

    def __iter__(self) -> Iterator[dict]:
        self._ok, self._bad = 0, Counter()
        streams = [self.examples(index) for index in range(len(self.sources))]
        weights = [source.weight for source in self.sources]
        mixture_rng = seeded_rng(self.seed, "mixture", self.rank)
        while True:
            picks = mixture_rng.choices(range(len(streams)), weights=weights, k=self.micro_batch_size)
            yield collate([next(streams[pick]) for pick in picks], self.pad_token_id)

    def raw_samples(self, source_index: int, epoch: int) -> Iterator[RawSample]:
        """This rank's share of one epoch of the source's raw samples."""
        shards = list(self.shards[source_index])
        seeded_rng(self.seed, "shards", source_index, epoch).shuffle(shards)
        samples = (sample for shard in shards for sample in iter_raw_samples(shard))
        rng = seeded_rng(self.seed, "buffer", source_index, epoch)
        for i, sample in enumerate(buffered_shuffle(samples, self.shuffle_buffer, rng)):
            if i % self.world_size == self.rank:
                yield sample

    def examples(self, source_index: int) -> Iterator[Example]:
        """The source's usable examples for this rank, epoch after epoch, forever."""
        source = self.sources[source_index]
        for epoch in itertools.count():
            found = False
            for raw in self.raw_samples(source_index, epoch):
                example = self._example(raw, source)
                if example is not None:
                    found = True
                    self._ok += 1
                    yield example
            if not found:  # looping again would spin forever
                raise RuntimeError(f"source {source.name!r} gave rank {self.rank} no usable sample in epoch {epoch}")

    def _example(self, raw: RawSample, source: SourceSpec) -> Example | None:
        try:
            prepared = prepare_sample(raw, task=source.task, template=self.template,
                                      eos_token=self.tokenizer.eos_token, tokenizer=self.tokenizer)
            encoded = encode(prepared.segments, self.tokenizer, tokens_per_image=self.tokens_per_image,
                             max_length=self.max_length)
            if encoded is None:
                raise BadSample("too_long", f"does not fit in {self.max_length} tokens")
        except BadSample as bad:
            self._bad[bad.reason] += 1
            logger.warning("skipping bad sample: shard=%s key=%s %s", raw.shard, raw.key, bad.describe())
            return None
        # truncation may drop whole trailing images: keep the pixels of the images still in the tokens
        images = prepared.images[: encoded.num_images]
        pixel_values = self.image_transform(images) if images else None  # [n_images, 3, H, W]
        return Example(key=raw.key, source=source.name, input_ids=encoded.input_ids, labels=encoded.labels,
                       pixel_values=pixel_values)
