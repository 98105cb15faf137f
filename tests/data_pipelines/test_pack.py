import itertools
import json

import torch

from data_pipelines.batch.loader import SourceSpec
from data_pipelines.batch.pack import collate_packed, first_fit_decreasing
from data_pipelines.render.example import Example
from data_pipelines.render.tokenize import IGNORE_INDEX
from tests.data_pipelines.test_loader import TOKENS_PER_IMAGE, id_shards, keys_per_batch, make_loader, synth_sources  # noqa: F401 (fixtures)


def test_first_fit_decreasing_places_longest_first_and_leaves_what_does_not_fit():
    assert first_fit_decreasing([5, 7, 3, 4, 6], rows=2, capacity=10) == [[1, 2], [3, 4]]  # 7+3, 6+4; 5 waits
    assert first_fit_decreasing([5, 7, 3, 4, 6], rows=2, capacity=10, priority=[True] + [False] * 4) == [[0, 3], [1, 2]]
    assert first_fit_decreasing([11], rows=1, capacity=10) == []


def example(key, ids, targets_from, image=None):
    labels = [IGNORE_INDEX] * targets_from + ids[targets_from:]
    return Example(key=key, source="s", input_ids=ids, labels=labels, pixel_values=image)


def test_packed_rows_restart_positions_mask_boundaries_and_keep_image_order():
    red, blue = torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.ones(1, 3, 2, 2, dtype=torch.uint8)
    rows = [[example("a", [1, 10, 11, 12], 2, red), example("b", [1, 20, 21], 1)], [example("c", [1, 30], 1, blue)]]
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 1, 20, 21], [1, 30, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    # b's first token is predicted from a's last: never a target
    assert batch["labels"].tolist() == [[-100, -100, 11, 12, -100, 20, 21], [-100, 30] + [-100] * 5]
    assert batch["num_target_tokens"] == 5 and batch["num_samples"] == 3
    assert batch["sample_lengths"] == [4, 3, 2] and batch["keys"] == ["a", "b", "c"]
    assert torch.equal(batch["pixel_values"], torch.cat([red, blue]))


def test_packing_fills_rows_and_reads_every_sample_once(synth_dir, tiny_tokenizer):
    loader = make_loader(synth_sources(synth_dir), tiny_tokenizer, max_length=128, micro_batch_size=4, packing=True)
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    real = padded = 0
    for batch in itertools.islice(loader, 10):
        assert batch["input_ids"].shape[1] <= 128 and batch["num_samples"] > 4  # several samples per row
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
        assert batch["pixel_values"].shape[0] * TOKENS_PER_IMAGE == int((batch["input_ids"] == image_id).sum())
        assert sum(batch["sample_lengths"]) == int(batch["attention_mask"].sum())
    assert real / padded >= 0.95
    unpacked = make_loader(synth_sources(synth_dir), tiny_tokenizer, max_length=128, micro_batch_size=4)
    batches = list(itertools.islice(unpacked, 10))
    assert sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches) < 0.9


def test_packed_loader_resumes_exactly_with_its_buffer(id_shards, tiny_tokenizer):  # noqa: F811 (fixture)
    def loader():
        return make_loader([SourceSpec(id_shards, 1.0, "vqa", "ids")], tiny_tokenizer, num_workers=2,
                           micro_batch_size=2, max_length=48, shuffle_buffer=10, packing=True)

    uninterrupted = keys_per_batch(loader(), 9)
    first = loader()
    assert keys_per_batch(first, 5) == uninterrupted[:5]
    state = json.loads(json.dumps(first.state_dict()))
    assert any(worker["pending"] for worker in state["workers"])  # samples were waiting in the buffer
    resumed = loader()
    resumed.load_state_dict(state)
    assert keys_per_batch(resumed, 4) == uninterrupted[5:]
    seen = [key for batch in uninterrupted for key in batch]
    assert len(seen) == len(set(seen))  # no sample twice within the epoch
