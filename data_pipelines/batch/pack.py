"""Sequence packing: several examples per row, up to max_length tokens, with no attention across them.

A packed row carries `position_ids` that restart at 0 for every example (and for the padding tail), which is what
transformers reads to build a block-diagonal causal mask on CPU (sdpa/eager) and the varlen boundaries for
flash-attention on GPU. Examples are never split, so an image's tokens always stay in one row with its text.
"""

from __future__ import annotations

import torch

from data_pipelines.batch.collate import collate
from data_pipelines.render.example import Example, layouts
from data_pipelines.render.tokenize import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], rows: int, capacity: int,
                         priority: list[bool] | None = None) -> list[list[int]]:
    """Place items (by index) into `rows` bins of `capacity` tokens: prioritised items first, then longest first,
    each into the first row it fits. Items that fit nowhere are left out (the caller keeps them for later).
    Ties keep index order, so the placement depends only on the inputs."""
    priority = priority or [False] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (not priority[i], -lengths[i], i))
    placed: list[list[int]] = [[] for _ in range(rows)]
    free = [capacity] * rows
    for item in order:
        for row in range(rows):
            if lengths[item] <= free[row]:
                placed[row].append(item)
                free[row] -= lengths[item]
                break
    return [sorted(row) for row in placed if row]  # arrival order inside a row: deterministic and readable


def collate_packed(rows: list[list[Example]], pad_token_id: int) -> dict:
    """Rows of examples -> one micro-batch, right-padded to the longest row.

    Same keys as collate.collate, plus position_ids [B, T] (restarting per example and for the padding tail) and
    num_samples. Each example's first label is the IGNORE_INDEX: that position would be predicted from the previous
    example's last token. Images are concatenated in row-major example order, the order of their tokens.
    """
    examples = [example for row in rows for example in row]
    flat = [_concatenated(row) for row in rows]
    batch = collate(flat, pad_token_id)
    length = batch["input_ids"].shape[1]
    position_ids = torch.zeros_like(batch["input_ids"])  # [B, T]
    for index, row in enumerate(rows):
        positions = [p for example in row for p in range(len(example.input_ids))]
        positions += range(length - len(positions))  # the padding tail is a sequence of its own
        position_ids[index] = torch.tensor(positions, dtype=torch.long)
    batch.update(position_ids=position_ids, num_samples=len(examples),
                 sample_lengths=[len(example.input_ids) for example in examples],
                 keys=[example.key for example in examples], sources=[example.source for example in examples])
    return batch


def _concatenated(row: list[Example]) -> Example:
    input_ids, labels, images, sources = [], [], [], []
    for example in row:
        sources += example.token_sources or [example.source_id] * len(example.input_ids)
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
        if example.pixel_values is not None:
            images.append(example.pixel_values)
    return Example(key=row[0].key, source=row[0].source, input_ids=input_ids, labels=labels,
                   pixel_values=torch.cat(images) if images else None, token_sources=sources,
                   **layouts(row))  # dynamic resolution's grids, tiling's tiles: in the order of the pixels
