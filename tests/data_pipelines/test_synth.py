import json
import random
import time

import numpy as np

from data_pipelines.image.images import decode_image
from data_pipelines.read.shards import iter_raw_samples
from data_pipelines.render.templates import ASAGI_PREAMBLE, render
from data_pipelines.synthetic.synth import COLOURS, SHAPES, draw_shape, synth_texts, synthesize
from data_pipelines.synthetic.tiny_tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, load_or_build_tiny_tokenizer


def samples_of(paths):
    return [sample for path in paths for sample in iter_raw_samples(path)]


def shape_colour(image) -> np.ndarray:
    """Mean colour of the pixels clearly darker or more saturated than the light background."""
    rgb = np.asarray(image).astype(int)
    mask = (rgb.max(axis=2) - rgb.min(axis=2)) > 60
    return rgb[mask].mean(axis=0)


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - rgb).sum())


def test_synthesize_is_byte_identical_and_indexed(tmp_path):
    first = synthesize(tmp_path / "a", samples=25, seed=3, samples_per_shard=10, image_size=32)
    second = synthesize(tmp_path / "b", samples=25, seed=3, samples_per_shard=10, image_size=32)
    assert [p.rsplit("/", 1)[1] for p in first["caption"]] == ["captions-000000.tar", "captions-000001.tar",
                                                               "captions-000002.tar"]
    for task in ("caption", "vqa"):
        assert [open(p, "rb").read() for p in first[task]] == [open(p, "rb").read() for p in second[task]]
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [(s["path"], s["samples"]) for s in index["shards"] if s["task"] == "vqa"] == [
        ("vqa-000000.tar", 10), ("vqa-000001.tar", 10), ("vqa-000002.tar", 5)]
    other_seed = synthesize(tmp_path / "c", samples=25, seed=4, samples_per_shard=10, image_size=32)
    assert open(other_seed["caption"][0], "rb").read() != open(first["caption"][0], "rb").read()


def test_smaller_rerun_removes_stale_shards(tmp_path):
    synthesize(tmp_path, samples=30, samples_per_shard=10, image_size=16)
    written = synthesize(tmp_path, samples=10, samples_per_shard=10, image_size=16)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["captions-000000.tar", "vqa-000000.tar"]
    assert written == {"caption": [str(tmp_path / "captions-000000.tar")], "vqa": [str(tmp_path / "vqa-000000.tar")]}


def test_captions_name_the_colour_and_shape_drawn(synth_dir):
    captions = samples_of(sorted(map(str, synth_dir.glob("captions-*.tar"))))
    assert len(captions) == 60
    for sample in captions:
        assert sample.meta["source"] == "synth-shapes" and sample.image_exts == ["png"]
        image = decode_image(sample.images[0])
        assert image.size == (32, 32)
        colour = nearest_colour(shape_colour(image))
        assert f"{colour}色の" in sample.meta["caption"]
        assert any(f"色の{shape}" in sample.meta["caption"] for shape in SHAPES)


def test_vqa_answers_match_images_and_some_are_text_only(synth_dir):
    vqa = samples_of(sorted(map(str, synth_dir.glob("vqa-*.tar"))))
    text_only = [s for s in vqa if not s.images]
    assert 1 <= len(text_only) <= 15
    two_turn = [s for s in vqa if len(s.meta["conversations"]) == 4]
    assert two_turn
    for sample in vqa:
        turns = sample.meta["conversations"]
        placeholders = sum(t["content"].count("<image>") for t in turns)
        assert placeholders == len(sample.images) <= 1
        for question, answer in zip(turns[::2], turns[1::2]):
            if "何色ですか" in question["content"] and sample.images:
                assert answer["content"] == f"{nearest_colour(shape_colour(decode_image(sample.images[0])))}色です。"


def test_draw_shape_sizes_and_backgrounds():
    rng = random.Random(0)
    for shape in SHAPES:
        image = draw_shape(rng, shape, "青", image_size=64)
        rgb = np.asarray(image)
        assert image.size == (64, 64)
        assert any((rgb[y, x] >= 215).all() for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)])  # light background
        coloured = ((rgb.max(axis=2).astype(int) - rgb.min(axis=2)) > 60).sum()
        assert 0.05 * 64 * 64 < coloured < 0.8 * 64 * 64


def test_tiny_tokenizer_is_deterministic_reversible_and_compact(tmp_path, tiny_tokenizer):
    start = time.perf_counter()
    rebuilt = build_tiny_tokenizer(tmp_path / "again")
    assert time.perf_counter() - start < 5
    assert rebuilt.get_vocab() == tiny_tokenizer.get_vocab()
    assert 256 < len(rebuilt) <= 1024
    assert [rebuilt.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (rebuilt.unk_token, rebuilt.bos_token, rebuilt.eos_token, rebuilt.pad_token) == tuple(SPECIAL_TOKENS[:4])
    conversation = {"conversations": [{"role": "user", "content": "<image>\n" + synth_texts()[-2]},
                                      {"role": "assistant", "content": synth_texts()[-1]}]}
    rendered = ["".join(s.text for s in render(conversation, t, "</s>")) for t in ("asagi", "sarashina")]
    for text in synth_texts() + rendered + ["Hello, world!  漢字 カタカナ 😀\n\ttab"]:
        ids = rebuilt(text, add_special_tokens=False)["input_ids"]
        assert rebuilt.decode(ids) == text
        assert rebuilt.unk_token_id not in ids
    assert len(rebuilt(ASAGI_PREAMBLE, add_special_tokens=False)["input_ids"]) <= 5
    assert rebuilt("<image></s>", add_special_tokens=False)["input_ids"] == [4, 2]
    assert rebuilt("<image>")["input_ids"] == [1, 4]  # plain calls add BOS, as tokenize.encode does


def test_load_or_build_reuses_the_saved_copy(tmp_path):
    cache = tmp_path / "tiny"
    first = load_or_build_tiny_tokenizer(cache)
    saved = (cache / "tokenizer.json").stat().st_mtime_ns
    second = load_or_build_tiny_tokenizer(cache)
    assert (cache / "tokenizer.json").stat().st_mtime_ns == saved
    assert second.get_vocab() == first.get_vocab() and second.eos_token == "</s>"
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny"]  # no temp folder left behind


def test_the_detail_set_is_small_shapes_on_tile_sized_canvases_and_leaves_the_other_kinds_as_they_were(tmp_path):
    from data_pipelines.synthetic.synth import DETAIL_CANVASES, DETAIL_SHAPE_PX

    plain = synthesize(tmp_path / "plain", samples=10, seed=1, samples_per_shard=10, image_size=32)
    with_detail = synthesize(tmp_path / "detail", samples=10, seed=1, samples_per_shard=10, image_size=32, details=12)
    for kind in plain:  # the older kinds keep their seeds: byte-identical with or without the detail set
        assert [open(p, "rb").read() for p in plain[kind]] == [open(p, "rb").read() for p in with_detail[kind]]
    index = json.loads((tmp_path / "detail" / "index.json").read_text())
    assert {s["path"]: s["task"] for s in index["shards"]}["detail-000001.tar"] == "vqa"
    samples = samples_of(with_detail["detail"])
    images = [decode_image(data) for sample in samples for data in sample.images]
    assert len(samples) == 12 and images and all(image.size in DETAIL_CANVASES for image in images)
    for image in images:  # the shape covers at most DETAIL_SHAPE_PX across, whatever the canvas
        rgb = np.asarray(image).astype(int)
        rows, cols = np.nonzero((rgb.max(axis=2) - rgb.min(axis=2)) > 60)
        assert rows.max() - rows.min() < DETAIL_SHAPE_PX[1] and cols.max() - cols.min() < DETAIL_SHAPE_PX[1]
