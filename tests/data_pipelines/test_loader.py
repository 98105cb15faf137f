import itertools
import json
import logging
from collections import Counter

import pytest
import torch

from data_pipelines.batch import batches as batches_module
from data_pipelines.batch.loader import MixtureLoader, SourceSpec, TooManyBadSamples
from data_pipelines.read.shards import ShardWriter
from data_pipelines.render.tokenize import IGNORE_INDEX
from data_pipelines.synthetic.testing import conversation, png_bytes, write_bad_shards

TOKENS_PER_IMAGE = 4


def make_loader(sources, tokenizer, **overrides):
    options = dict(tokenizer=tokenizer, image_size=16, template="asagi", tokens_per_image=TOKENS_PER_IMAGE,
                   max_length=128, micro_batch_size=4, seed=0, num_workers=0)
    return MixtureLoader(sources, **{**options, **overrides})


def synth_sources(synth_dir, caption_weight=0.5, vqa_weight=0.5):
    return [SourceSpec([f"{synth_dir}/captions-{{000000..000002}}.tar"], caption_weight, "caption", "captions"),
            SourceSpec([f"{synth_dir}/vqa-*.tar"], vqa_weight, "vqa", "vqa")]


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    """8 shards x 10 samples whose keys are their ids: id000..id079."""
    out = tmp_path_factory.mktemp("ids")
    with ShardWriter(out, "ids", 10) as writer:
        for i in range(80):
            writer.write(f"id{i:03d}", conversation(), [("png", png_bytes((8, 8), (i, 0, 0)))])
    return writer.paths


def keys_per_batch(loader, count):
    return [batch["keys"] for batch in itertools.islice(loader, count)]


def test_same_seed_same_batches_any_worker_count_of_the_same_config(synth_dir, tiny_tokenizer):
    runs = [keys_per_batch(make_loader(synth_sources(synth_dir), tiny_tokenizer, seed=seed), 6) for seed in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    loader = make_loader(synth_sources(synth_dir), tiny_tokenizer, num_workers=2)
    threaded = [next(loader) for _ in range(6)]
    again = keys_per_batch(make_loader(synth_sources(synth_dir), tiny_tokenizer, num_workers=2), 6)
    assert [b["keys"] for b in threaded] == again
    for batch in threaded:
        image_tokens = int((batch["input_ids"] == tiny_tokenizer.convert_tokens_to_ids("<image>")).sum())
        assert batch["pixel_values"].shape[0] * TOKENS_PER_IMAGE == image_tokens
        assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape[1:] == (3, 16, 16)
        assert batch["num_target_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
        assert not [key for key in batch if key.startswith("_")]


def test_image_transform_path_still_works(synth_dir, tiny_tokenizer, image_transform):
    loader = make_loader(synth_sources(synth_dir), tiny_tokenizer, image_size=None, image_transform=image_transform)
    batch = next(loader)
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].max() <= 1


# 8 shards: each of the 4 readers (2 ranks x 2 workers) reads 2 whole shards; 1 shard: split 4 ways by sample
# index (3, 3, 2, 2 samples), so rank 0 needs 6 one-sample batches for its share and rank 1 needs 4
@pytest.mark.parametrize("shards_used,micro_batch,block,batches", [(8, 4, 20, (10, 10)), (1, 1, 1, (6, 4))])
def test_ranks_and_workers_split_an_epoch_without_duplicates_or_gaps(id_shards, tiny_tokenizer, shards_used,
                                                                     micro_batch, block, batches):
    seen = []
    for rank in (0, 1):
        loader = make_loader([SourceSpec(id_shards[:shards_used], 1.0, "vqa", "ids")], tiny_tokenizer, rank=rank,
                             world_size=2, num_workers=2, micro_batch_size=micro_batch, shuffle_buffer=block)
        seen += [key for batch in keys_per_batch(loader, batches[rank]) for key in batch]
    assert sorted(seen) == [f"id{i:03d}" for i in range(10 * shards_used)]


def test_exact_resume_two_ranks_two_workers(id_shards, tiny_tokenizer, monkeypatch):
    def loader_for(rank):
        return make_loader([SourceSpec(id_shards, 1.0, "vqa", "ids")], tiny_tokenizer, rank=rank, world_size=2,
                           num_workers=2, micro_batch_size=5, shuffle_buffer=10)

    uninterrupted = [keys_per_batch(loader_for(rank), 12) for rank in (0, 1)]
    first_epoch = [key for rank in (0, 1) for batch in uninterrupted[rank][:8] for key in batch]
    assert sorted(first_epoch) == [f"id{i:03d}" for i in range(80)]  # the 80 ids once each over 2 x 8 batches
    states = []
    for rank in (0, 1):
        loader = loader_for(rank)
        assert keys_per_batch(loader, 5) == uninterrupted[rank][:5]  # stop after an odd batch: mid round-robin
        states.append(json.loads(json.dumps(loader.state_dict())))  # as a checkpoint would store it
    decoded = []
    real_load_pixels = batches_module.load_pixels
    monkeypatch.setattr(batches_module, "load_pixels", lambda data, *a: decoded.append(data) or real_load_pixels(
        data, *a))
    for rank in (0, 1):
        resumed = make_loader([SourceSpec(id_shards, 1.0, "vqa", "ids")], tiny_tokenizer, rank=rank, world_size=2,
                              num_workers=0 if rank else 2, micro_batch_size=5, shuffle_buffer=10)
        if rank:  # workers in-process here, so the decode counter sees them; worker count must still match
            with pytest.raises(ValueError, match="num_workers"):
                resumed.load_state_dict(states[rank])
            resumed = loader_for(rank)
            resumed.num_workers = 0  # same logical workers, run in-process
        resumed.load_state_dict(states[rank])
        assert keys_per_batch(resumed, 7) == uninterrupted[rank][5:]
    assert len(decoded) == 7 * 5  # rank 1's resume decoded only the images it returned


def test_source_weights_are_respected(synth_dir, tiny_tokenizer):
    loader = make_loader(synth_sources(synth_dir, 0.8, 0.2), tiny_tokenizer, micro_batch_size=10)
    counts = Counter(source for batch in itertools.islice(loader, 50) for source in batch["sources"])
    assert sum(counts.values()) == 500
    assert abs(counts["captions"] - 400) < 3 * (500 * 0.8 * 0.2) ** 0.5  # within 3 standard deviations
    assert loader.stats == {"samples": 500, "bad": {}}


def test_every_bad_kind_is_skipped_counted_and_logged(tmp_path, tiny_tokenizer, caplog):
    paths, expected = write_bad_shards(tmp_path, good=20, max_length=64, tokens_per_image=TOKENS_PER_IMAGE)
    loader = make_loader([SourceSpec(paths, 1.0, "vqa", "bad")], tiny_tokenizer, max_length=64, micro_batch_size=1,
                         shuffle_buffer=1, bad_sample_limit=1.0)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.batch.loader"):
        # 30 good samples a pass; both shards start with a good one, so the 31st ends the pass exactly
        keys = [key for batch in keys_per_batch(loader, 31) for key in batch]
    assert sorted(set(keys)) == [f"good{i:06d}" for i in range(30)]
    assert loader.stats == {"samples": 31, "bad": expected}
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == sum(expected.values())
    assert any(f"shard={paths[0]} key=bomb image_too_large" in line for line in warnings)
    assert any(f"shard={paths[1]} key=cut truncated_shard" in line for line in warnings)


def test_too_many_bad_samples_stops_with_one_line(tmp_path, tiny_tokenizer):
    paths, expected = write_bad_shards(tmp_path, good=100, max_length=64, tokens_per_image=TOKENS_PER_IMAGE)
    loader = make_loader([SourceSpec(paths, 1.0, "vqa", "bad")], tiny_tokenizer, max_length=64, micro_batch_size=10,
                         shuffle_buffer=1)
    with pytest.raises(TooManyBadSamples) as error:
        keys_per_batch(loader, 20)
    message = str(error.value)
    assert "\n" not in message and "limit 1.0%" in message and "image_too_large=1" in message
    relaxed = make_loader([SourceSpec(paths, 1.0, "vqa", "bad")], tiny_tokenizer, max_length=64,
                          micro_batch_size=10, shuffle_buffer=1, bad_sample_limit=0.2)
    assert len(keys_per_batch(relaxed, 20)) == 20


def test_source_without_usable_samples_fails_instead_of_spinning(tmp_path, tiny_tokenizer, make_png):
    with ShardWriter(tmp_path, "c", 10) as writer:
        writer.write("only", {"caption": "赤色の円。"}, [("png", make_png())])
    sources = [SourceSpec([f"{tmp_path}/c-*.tar"], 1.0, "vqa", "wrong")]
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(make_loader(sources, tiny_tokenizer, bad_sample_limit=1.0))
    with pytest.raises(TooManyBadSamples, match="task_mismatch="):
        next(make_loader(sources, tiny_tokenizer))


def test_invalid_arguments_fail_at_construction(synth_dir, tiny_tokenizer, image_transform):
    sources = synth_sources(synth_dir)
    with pytest.raises(ValueError, match="unknown template"):
        make_loader(sources, tiny_tokenizer, template="alpaca")
    with pytest.raises(FileNotFoundError):
        make_loader([SourceSpec([f"{synth_dir}/nothing-*.tar"], 1.0, "vqa", "x")], tiny_tokenizer)
    with pytest.raises(ValueError, match="weight"):
        make_loader([SourceSpec(sources[0].shards, 0.0, "caption", "x")], tiny_tokenizer)
    with pytest.raises(ValueError, match="exactly one"):
        make_loader(sources, tiny_tokenizer, image_transform=image_transform)
    state = make_loader(sources, tiny_tokenizer).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_loader(sources, tiny_tokenizer, seed=5).load_state_dict(state)


def test_many_stage_starts_on_two_ranks_with_live_gloo_threads_never_hang(synth_dir, tmp_path):
    # the workers start from a forkserver (data_pipelines/batch/workers.py WORKER_START), never by fork of a process with
    # threads, and close() joins them: a hang here fails run_on_ranks instead of passing
    from data_pipelines.batch.workers import WORKER_START
    from tests.data_pipelines.stage_starts import stage_starts
    from tests.ranks import run_on_ranks

    results = run_on_ranks(stage_starts, str(synth_dir), str(tmp_path / "tok"), 8, WORKER_START)
    for rank, result in enumerate(results):
        assert len(result["seconds"]) == 8, rank
        assert result["left_alive"] == [0] * 8, rank
