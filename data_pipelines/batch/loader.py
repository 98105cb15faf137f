"""MixtureLoader: a weighted mixture of endless, deterministic, rank- and worker-split shard streams ->
collated micro-batches, resumable exactly at any micro-batch boundary.

Worker processes (torch DataLoader over an IterableDataset) each build whole micro-batches from their own slice
of the data (batches.WorkerBatches); the DataLoader hands them out round-robin, so micro-batch k of a rank always
comes from logical worker k mod W whatever the timing. Each batch carries its worker's state after it; the
loader keeps the state of the last batch it returned per worker, which is exactly "what comes next".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.batch.batches import WorkerBatches, WorkerConfig, bad_share_message, build_example, over_bad_limit
from data_pipelines.batch.workers import worker_context
from data_pipelines.errors import TooManyBadSamples
from data_pipelines.image.images import DEFAULT_MAX_IMAGE_PIXELS
from data_pipelines.image.pixels import RESIZE_MODES, ResizeMode
from data_pipelines.read.shards import expand_shard_patterns
from data_pipelines.render.samples import TASKS
from data_pipelines.render.templates import template_format
from data_pipelines.render.tokenize import image_token_id, pad_token_id

logger = logging.getLogger(__name__)
STATE_VERSION = 1

__all__ = ["MixtureLoader", "SourceSpec", "TooManyBadSamples"]


@dataclass
class SourceSpec:
    shards: list[str]  # patterns: paths, globs, brace ranges, pipe:/http(s) URLs
    weight: float  # relative share of micro-batch samples
    task: str  # one of samples.TASKS
    name: str


class _RankBatches(IterableDataset):
    """The DataLoader's dataset: physical worker p runs logical worker (p + first_batch) mod W, so that after a
    resume at batch `first_batch` the round-robin order continues where it stopped."""

    def __init__(self, config: WorkerConfig, states: list[dict | None], first_batch: int):
        self.config, self.states, self.first_batch = config, states, first_batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first_batch) % self.config.num_workers
        batches = WorkerBatches(self.config, worker, self.states[worker])
        try:
            yield from batches
        except TooManyBadSamples as err:  # hand the one-line message over instead of a worker traceback
            yield {"_error": str(err), "_worker": worker, "_state": batches.state().to_dict(),
                   "_bad_log": batches.bad_log}


def _as_is(batch: dict) -> dict:
    return batch


class MixtureLoader:
    """`next()` yields collated micro-batches forever (see collate.collate for the dict; pixel_values is uint8
    [N, 3, image_size, image_size] stored channels last with `image_size` (collate.model_inputs normalises it to
    NCHW floats), else what `image_transform` returns).

    Same arguments => same batches, whatever the workers' timing. `num_workers` worker processes (0: in this
    process) run max(num_workers, 1) logical workers; setting the attribute to 0 after construction runs the same
    logical workers in-process (same batches; handy for debugging). Bad samples are skipped, logged with shard and
    key, and counted in `stats`; past `bad_sample_limit` (share of samples read, judged from 100 on) `next()`
    raises TooManyBadSamples. With `packing`, each of the micro_batch_size rows holds several examples up to
    max_length tokens, with position_ids restarting per example (pack.py). `state_dict()` / `load_state_dict()`
    resume exactly at a micro-batch boundary
    (same rank, world_size, num_workers, sources and seed).
    """

    def __init__(self, sources: list[SourceSpec], *, tokenizer,
                 image_transform: Callable[[list[Image.Image]], torch.Tensor] | None = None, template: str,
                 tokens_per_image: int | None, max_length: int, micro_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 256, num_workers: int = 2, image_size: int | None = None,
                 image_mean: tuple[float, ...] | None = None, image_std: tuple[float, ...] | None = None,
                 resize_mode: ResizeMode = "squash", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 bad_sample_limit: float = 0.01, prefetch_factor: int = 2, packing: bool = False,
                 patchify: Callable | None = None, image_start_end: tuple[str, str] | None = None,
                 max_images_per_sample: int | None = None):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        for source in sources:
            if source.task not in TASKS:
                raise ValueError(f"source {source.name!r}: task must be one of {', '.join(TASKS)}, "
                                 f"got {source.task!r}")
            if not source.weight > 0:
                raise ValueError(f"source {source.name!r}: weight must be > 0, got {source.weight}")
        if (tokens_per_image is None) != (patchify is not None):
            raise ValueError("give tokens_per_image (fixed image size) or patchify (dynamic resolution), not both")
        if min(tokens_per_image or 1, max_length, micro_batch_size, shuffle_buffer) < 1:
            raise ValueError("tokens_per_image, max_length, micro_batch_size and shuffle_buffer must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if (image_size is not None) + (image_transform is not None) + (patchify is not None) != 1:
            raise ValueError("give exactly one of image_size (uint8 pixels), image_transform and patchify")
        if resize_mode not in RESIZE_MODES or num_workers < 0 or not 0 <= bad_sample_limit <= 1:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, num_workers >= 0, 0 <= bad_sample_limit <= 1")
        template_format(template)  # fail now on an unknown template, not at the first sample
        for token in ("<image>", *(image_start_end or ())):
            image_token_id(tokenizer, token)  # fail now if the tokenizer lacks it
        pad = pad_token_id(tokenizer)
        self.sources = sources
        self.image_mean, self.image_std = image_mean, image_std  # for the caller's `pixels.normalize`
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.config = WorkerConfig(
            names=[s.name for s in sources], tasks=[s.task for s in sources], weights=[s.weight for s in sources],
            shards=[expand_shard_patterns(s.shards) for s in sources],  # a missing local shard fails here
            tokenizer=tokenizer, template=template, tokens_per_image=tokens_per_image, max_length=max_length,
            micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size,
            num_workers=max(num_workers, 1), shuffle_buffer=shuffle_buffer, pad_token_id=pad,
            image_size=image_size, resize_mode=resize_mode, image_transform=image_transform,
            max_image_pixels=max_image_pixels, bad_sample_limit=bad_sample_limit, packing=packing, patchify=patchify,
            image_start_end=tuple(image_start_end) if image_start_end else None,
            max_images_per_sample=max_images_per_sample)
        self._worker_states: list[dict | None] = [None] * self.config.num_workers
        self._batches_returned = 0
        self._iterator: Iterator[dict] | None = None

    # ------------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            dataset = _RankBatches(self.config, list(self._worker_states), self._batches_returned)
            if self.num_workers == 0:  # the same logical workers, taking turns in this process
                first = self._batches_returned
                runs = [WorkerBatches(self.config, (first + i) % self.config.num_workers,
                                      self._worker_states[(first + i) % self.config.num_workers])
                        for i in range(self.config.num_workers)]
                self._iterator = (next(run) for run in itertools.cycle(runs))
            else:
                self._iterator = iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is,
                                                 num_workers=self.num_workers, persistent_workers=True,
                                                 prefetch_factor=self.prefetch_factor,
                                                 multiprocessing_context=worker_context(),
                                                 pin_memory=torch.cuda.is_available()))  # async host-to-GPU copies
        batch = next(self._iterator)
        self._worker_states[batch.pop("_worker")] = batch.pop("_state")
        for line in batch.pop("_bad_log"):
            logger.warning("skipping bad sample: %s", line)
        if "_error" in batch:
            self.close()
            raise TooManyBadSamples(batch["_error"])
        self._batches_returned += 1
        stats = self.stats
        if over_bad_limit(stats["bad"], stats["samples"], self.config.bad_sample_limit):
            self.close()
            raise TooManyBadSamples(bad_share_message(stats["bad"], stats["samples"], self.config.bad_sample_limit))
        return batch

    def build_example(self, raw, source: int):
        """One raw sample of source index `source` -> the Example this loader's batches would hold (BadSample if
        unusable): the per-sample path of training, for callers that pick their own samples (periodic eval)."""
        return build_example(self.config, raw, source)

    def close(self) -> None:
        """Stop the worker processes (joined here, not left to the garbage collector, so that none is still running
        when the next stage starts its own); the next `next()` starts them again from the current state."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator: joins its workers
        if shutdown is not None:
            shutdown()

    @property
    def stats(self) -> dict:
        """{"samples": good samples in returned batches, "bad": {reason: count}} over every worker so far."""
        bad: Counter[str] = Counter()
        samples = 0
        for state in self._worker_states:
            if state:
                samples += state["samples"]
                bad.update(state["bad"])
        return {"samples": samples, "bad": dict(bad)}

    # ---------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """JSON-serialisable position: after `load_state_dict(this)`, the next batch is the one that would have
        come next. Per worker: next batch index, per source the stream state (unit, sample, byte offset, shuffle
        block, taken) and the counts. RNGs are derived from (seed, ...) so no RNG state needs saving."""
        config = self.config
        return {
            "version": STATE_VERSION, "seed": config.seed, "rank": config.rank, "world_size": config.world_size,
            "num_workers": config.num_workers, "sources": list(config.names), "shards": self._shards_fingerprint(),
            "packing": config.packing, "batches": self._batches_returned,
            "workers": [dict(s) if s else None for s in self._worker_states],
        }

    def _shards_fingerprint(self) -> str:
        """Hash of every source's expanded shard list: resuming over other shards would not be exact."""
        return hashlib.sha256(json.dumps(self.config.shards).encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`. Valid before or during iteration (running workers are restarted)."""
        config = self.config
        mine = {"version": STATE_VERSION, "seed": config.seed, "rank": config.rank, "world_size": config.world_size,
                "num_workers": config.num_workers, "sources": list(config.names), "shards": self._shards_fingerprint(),
                "packing": config.packing}
        state = {"packing": False, **state}  # saved before packing existed
        different = [key for key, value in mine.items() if state.get(key) != value]
        if different:
            details = ", ".join(f"{key}: saved {state.get(key)!r}, now {mine[key]!r}" for key in different)
            raise ValueError(f"loader state does not match this loader ({details})")
        self.close()
        self._worker_states = [dict(s) if s else None for s in state["workers"]]
        self._batches_returned = state["batches"]
