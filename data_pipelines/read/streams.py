"""One source's endless, deterministic, resumable stream of raw samples for one reader slot (rank x worker).

Splitting: epoch e of a source is a list of *units*: its shards in an order shuffled by (seed, source, e), each
shard split into `parts` = ceil(slots / shards) interleaved parts (part r holds the samples whose index in the
shard is r mod parts). Unit g of the endless concatenation of epochs goes to slot g mod slots, so every unit is
read by exactly one slot and all slots move through the epochs together: no sample is read twice within an
epoch, and with at least as many shards as slots each slot reads whole shards. With fewer, a slot streams the
tar but reads (and decodes) only its own part's members.

Shuffling: besides the per-epoch shard order, the slot's stream is cut into blocks of `block_size` consecutive
samples, each emitted in an order drawn from a RNG seeded by (seed, source, slot, block number). Unlike a
reservoir buffer, a block is reproducible from its start position alone, so the stream's whole state is a few
integers (`StreamState`) and resuming reads one block's raw bytes again but decodes nothing it skips.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Iterator

from data_pipelines.read.shard_reader import RawSample, iter_raw_samples


def seeded_rng(*parts) -> random.Random:
    """A RNG seeded from `parts` the same way in every process (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class Unit:
    shard: str
    part: int  # this unit holds the shard's samples with index % parts == part
    parts: int


class UnitPlan:
    """The endless unit sequence of one source, dealt round-robin to `num_slots` slots."""

    def __init__(self, shards: list[str], *, seed: int, source_index: int, num_slots: int):
        if not shards:
            raise ValueError("a source needs at least one shard")
        self.shards, self.seed, self.source_index, self.num_slots = list(shards), seed, source_index, num_slots
        self.parts = math.ceil(num_slots / len(self.shards))
        self.units_per_epoch = len(self.shards) * self.parts
        self._order_epoch, self._order = -1, self.shards

    def epoch_shards(self, epoch: int) -> list[str]:
        if epoch != self._order_epoch:
            self._order = list(self.shards)
            seeded_rng(self.seed, "shards", self.source_index, epoch).shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def unit(self, slot: int, counter: int) -> Unit:
        """The slot's `counter`-th unit (0-based)."""
        epoch, position = divmod(slot + counter * self.num_slots, self.units_per_epoch)
        shard_position, part = divmod(position, self.parts)
        return Unit(self.epoch_shards(epoch)[shard_position], part, self.parts)


@dataclass
class StreamState:
    """Where a slot's stream stands: the current block's start (unit counter, sample index and byte offset of
    the next sample to read in that unit's shard), how many blocks were started, and how many samples of the
    current block were already emitted. Plain ints: JSON-serialisable."""

    unit: int = 0
    sample: int = 0
    offset: int = 0
    block: int = -1  # -1: no block read yet
    taken: int = 0


Cursor = tuple[int, int, int]  # (unit counter, sample index in the shard, byte offset in the shard)


class SourceStream:
    """`next()` gives the slot's next raw sample; `state_dict()` / the constructor's `state` resume it exactly."""

    def __init__(self, plan: UnitPlan, slot: int, block_size: int, state: StreamState | None = None):
        self.plan, self.slot, self.block_size = plan, slot, block_size
        self._state = StreamState(**vars(state)) if state is not None else StreamState()
        self._block: list[RawSample | None] = []
        self._order: list[int] = []
        self._reader: Iterator[tuple[RawSample, Cursor]] | None = None
        self._next_block_start: Cursor | None = None
        if self._state.block >= 0:  # resuming mid-block: read that block again, skip what was already emitted
            self._load_block((self._state.unit, self._state.sample, self._state.offset), self._state.block)

    @property
    def units_read(self) -> int:
        """Unit counter of the read position: how far the slot has advanced through its units."""
        return self._next_block_start[0] if self._next_block_start else self._state.unit

    def state_dict(self) -> dict:
        """Where the stream stands (StreamState's fields), as a fresh plain dict: the loader takes one per sample read,
        so no dataclasses.asdict (a recursive deep copy)."""
        return dict(vars(self._state))

    def __next__(self) -> RawSample:
        if self._state.block < 0 or self._state.taken >= len(self._block):
            start = self._next_block_start or (self._state.unit, self._state.sample, self._state.offset)
            self._load_block(start, self._state.block + 1)
        index = self._order[self._state.taken]
        sample, self._block[index] = self._block[index], None  # free the bytes once emitted
        self._state.taken += 1
        return sample

    def __iter__(self) -> SourceStream:
        return self

    def _load_block(self, start: Cursor, block: int) -> None:
        if self._reader is None or start != self._next_block_start:
            self._reader = self._read_from(start)
        self._block, cursor = [], start
        for sample, cursor in self._reader:  # noqa: B007 - the cursor after the last sample read is kept below
            self._block.append(sample)
            if len(self._block) == self.block_size:
                break
        self._next_block_start = cursor
        self._order = list(range(len(self._block)))
        seeded_rng(self.plan.seed, "block", self.plan.source_index, self.slot, block).shuffle(self._order)
        taken = self._state.taken if block == self._state.block else 0
        self._state = StreamState(*start, block=block, taken=taken)

    def _read_from(self, start: Cursor) -> Iterator[tuple[RawSample, Cursor]]:
        """Raw samples from `start` on, each with the cursor just after it. Endless."""
        unit_counter, sample, offset = start
        empty_units = 0
        while True:
            unit = self.plan.unit(self.slot, unit_counter)
            found = False
            for raw in iter_raw_samples(unit.shard, sample, offset, keep=lambda i: i % unit.parts == unit.part):
                found = True
                after = (unit_counter + 1, 0, 0) if raw.end_offset < 0 else (unit_counter, raw.index + 1,
                                                                              raw.end_offset)
                yield raw, after
                if raw.end_offset < 0:
                    break
            if not found and sample == 0:
                empty_units += 1
                if empty_units > self.plan.units_per_epoch:  # looping again would spin forever
                    raise RuntimeError(f"no sample in any shard of source {self.plan.source_index} "
                                       f"for slot {self.slot}")
            elif found:
                empty_units = 0
            unit_counter, sample, offset = unit_counter + 1, 0, 0
