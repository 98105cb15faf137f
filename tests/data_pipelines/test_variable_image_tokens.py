"""Per-image token counts (Qwen2-VL dynamic resolution) and image start/end tokens, through real tar shards."""

import pytest
import torch
from transformers import Qwen2VLImageProcessorPil

from data_pipelines.batch.loader import MixtureLoader, SourceSpec
from data_pipelines.image.patches import DynamicResolutionPatches
from data_pipelines.read.shards import ShardWriter
from data_pipelines.render.tokenize import IGNORE_INDEX, encode
from data_pipelines.synthetic.testing import conversation, png_bytes

START_END = ("<|vision_start|>", "<|vision_end|>")
SIZES = [(64, 32), (32, 32), (48, 64), (64, 64)]  # (width, height); factor 16 = patch 8 x merge 2


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *START_END]},
                                      replace_extra_special_tokens=False)
    return tiny_tokenizer


def patchify() -> DynamicResolutionPatches:
    return DynamicResolutionPatches(Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=8, temporal_patch_size=2, merge_size=2))


def test_encode_takes_one_count_per_image_and_wraps_each_image(tokenizer):
    segments = [("<image>a<image>", False), ("b", True)]
    sample = encode(segments, tokenizer, tokens_per_image=[2, 5], max_length=64, image_start_end=START_END)
    image, start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<image>", *START_END))
    ids = sample.input_ids
    first = ids.index(start)
    assert ids[first:first + 4] == [start, image, image, end]
    second = ids.index(start, first + 1)
    assert ids[second:second + 7] == [start] + [image] * 5 + [end]
    assert all(sample.labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t in (image, start, end))
    assert ids.count(image) == 7 and sample.num_images == 2


def test_truncation_drops_a_wrapped_image_whole(tokenizer):
    segments = [("x", True), ("<image>", False), ("y" * 40, True)]
    full = encode(segments, tokenizer, tokens_per_image=[6], max_length=200, image_start_end=START_END)
    image_at = full.input_ids.index(tokenizer.convert_tokens_to_ids(START_END[0]))
    cut = encode(segments, tokenizer, tokens_per_image=[6], max_length=image_at + 3, image_start_end=START_END)
    assert cut.num_images == 0 and cut.input_ids == full.input_ids[:image_at]


def test_fixed_count_path_is_unchanged(tokenizer):
    segments = [("<image>q", False), ("a", True)]
    fixed = encode(segments, tokenizer, tokens_per_image=3, max_length=64)
    listed = encode(segments, tokenizer, tokens_per_image=[3], max_length=64)
    assert fixed == listed and fixed.input_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 3


def test_loader_batches_carry_patches_grids_and_per_image_counts(tmp_path, tokenizer):
    with ShardWriter(tmp_path, "mixed", 4) as writer:
        for i, size in enumerate(SIZES):
            images = 2 if i == 3 else 1  # the last sample has two images of different sizes
            files = [("png", png_bytes(size))] + ([("png", png_bytes((32, 48)))] if images == 2 else [])
            writer.write(f"s{i}", conversation(images=images), files)
    loader = MixtureLoader([SourceSpec(writer.paths, 1.0, "vqa", "mixed")], tokenizer=tokenizer, template="sarashina",
                           tokens_per_image=None, patchify=patchify(), image_start_end=START_END, max_length=256,
                           micro_batch_size=4, seed=0, num_workers=0, shuffle_buffer=1)
    batch = next(loader)
    grids = batch["image_grid_thw"]  # [N_images, 3], in example order
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    per_row = [int((row == image_id).sum()) for row in batch["input_ids"]]
    images_per_row = [2 if key == "s3" else 1 for key in batch["keys"]]
    expected, at = [], 0
    for n in images_per_row:
        expected.append(int(grids[at:at + n].prod(-1).sum()) // 4)
        at += n
    assert per_row == expected and len(set(per_row)) > 1  # the count depends on the image
    assert grids.shape == (5, 3) and batch["pixel_values"].shape == (int(grids.prod(-1).sum()), 3 * 2 * 8 * 8)
    assert batch["pixel_values"].dtype == torch.float32
    for key, grid in zip(batch["keys"], grids):  # grid (t, h, w) in patches of 8 px: width 64 -> w 8
        if key != "s3":
            width, height = SIZES[int(key[1:])]
            assert grid.tolist() == [1, height // 8, width // 8]


def test_loader_refuses_both_fixed_and_dynamic_counts(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        MixtureLoader([SourceSpec(["x.tar"], 1.0, "vqa", "x")], tokenizer=tokenizer, template="sarashina",
                      tokens_per_image=4, patchify=patchify(), max_length=64, micro_batch_size=1, seed=0)


def test_an_image_dynamic_resolution_refuses_is_a_bad_sample(tmp_path, tokenizer):
    with ShardWriter(tmp_path, "odd", 4) as writer:
        writer.write("thin", conversation(), [("png", png_bytes((4000, 8)))])  # aspect ratio 500: smart_resize refuses
        for i in range(3):
            writer.write(f"ok{i}", conversation(), [("png", png_bytes((32, 32)))])
    loader = MixtureLoader([SourceSpec(writer.paths, 1.0, "vqa", "odd")], tokenizer=tokenizer, template="sarashina",
                           tokens_per_image=None, patchify=patchify(), max_length=256, micro_batch_size=3, seed=0,
                           num_workers=0, shuffle_buffer=1, bad_sample_limit=1.0)
    batch = next(loader)
    assert "thin" not in batch["keys"] and loader.stats["bad"] == {"unusable_image": 1}


def test_packed_rows_keep_grids_in_the_order_of_their_image_tokens(tmp_path, tokenizer):
    with ShardWriter(tmp_path, "pack", 8) as writer:
        for i in range(8):
            writer.write(f"p{i}", conversation(), [("png", png_bytes(SIZES[i % 4]))])
    loader = MixtureLoader([SourceSpec(writer.paths, 1.0, "vqa", "pack")], tokenizer=tokenizer, template="sarashina",
                           tokens_per_image=None, patchify=patchify(), image_start_end=START_END, max_length=160,
                           micro_batch_size=2, seed=0, num_workers=0, shuffle_buffer=1, packing=True)
    batch = next(loader)
    assert batch["num_samples"] > 2  # several samples per row
    image_id, start = (tokenizer.convert_tokens_to_ids(t) for t in ("<image>", START_END[0]))
    runs = []  # image-token count of each image, row-major, read off the token sequence
    for row in batch["input_ids"].tolist():
        for at, token in enumerate(row):
            if token == start:
                runs.append(next(i for i in range(at + 1, len(row)) if row[i] != image_id) - at - 1)
    grids = batch["image_grid_thw"]
    assert runs == (grids.prod(-1) // 4).tolist()
    assert batch["pixel_values"].shape[0] == int(grids.prod(-1).sum())
