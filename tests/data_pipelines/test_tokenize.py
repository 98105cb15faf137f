import torch

from data_pipelines.batch.collate import collate
from data_pipelines.render.example import Example
from data_pipelines.render.templates import Segment, render
from data_pipelines.render.tokenize import IGNORE_INDEX, encode, piece_encoder
from data_pipelines.synthetic.tiny_tokenizer import build_tiny_sentencepiece_tokenizer

CONVERSATION = {"conversations": [
    {"role": "user", "content": "<image>\nこの図形は何色ですか？"}, {"role": "assistant", "content": "赤色です。"},
    {"role": "user", "content": "この図形は何ですか？"}, {"role": "assistant", "content": "円です。"},
]}
IMAGE_ID = 4


def target_runs(input_ids, labels):
    """Consecutive target positions as lists of ids."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def test_loss_mask_covers_exactly_the_answers_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    for template in ("asagi", "sarashina"):
        segments = render(CONVERSATION, template, tok.eos_token)
        sample = encode(segments, tok, tokens_per_image=5, max_length=512)
        assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE_INDEX
        assert [tok.decode(run) for run in target_runs(sample.input_ids, sample.labels)] == ["赤色です。</s>", "円です。</s>"]
        assert sample.input_ids.count(tok.eos_token_id) == 2  # "</s>" in the text is the special token, not split
        # everything except the BOS and the image tokens decodes back to the rendered prompt
        text_ids = [t for t in sample.input_ids[1:] if t != IMAGE_ID]
        assert tok.decode(text_ids) == "".join(s.text for s in segments).replace("<image>", "")


def test_image_placeholder_expands_to_masked_image_tokens(tiny_tokenizer):
    segments = [Segment("<image>\n<image>\n", False), Segment("赤色の円。</s>", True)]
    sample = encode(segments, tiny_tokenizer, tokens_per_image=7, max_length=512)
    assert sample.num_images == 2
    newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert sample.input_ids[: 1 + 2 * (7 + len(newline))] == [1] + ([IMAGE_ID] * 7 + newline) * 2
    positions = [i for i, t in enumerate(sample.input_ids) if t == IMAGE_ID]
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)


def test_truncation_rules(tiny_tokenizer):
    tok = tiny_tokenizer
    segments = [Segment("<image>\nこの図形は何色ですか？", False), Segment("赤色です。</s>", True)]
    full = encode(segments, tok, tokens_per_image=10, max_length=512)
    assert len(full.input_ids) > 13
    cut = encode(segments, tok, tokens_per_image=10, max_length=len(full.input_ids) - 1)  # cuts the eos only
    assert cut.input_ids == full.input_ids[:-1] and cut.labels == full.labels[:-1]
    assert encode(segments, tok, tokens_per_image=10, max_length=6) is None  # inside the image tokens
    prompt_len = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    assert encode(segments, tok, tokens_per_image=10, max_length=prompt_len) is None  # no target left


def test_truncation_dropping_a_whole_trailing_image_counts_only_kept_images(tiny_tokenizer):
    segments = [Segment("<image>\n", False), Segment("赤色です。", True), Segment("<image>\n", False)]
    full = encode(segments, tiny_tokenizer, tokens_per_image=4, max_length=512)
    assert full.num_images == 2
    second_image = full.input_ids.index(IMAGE_ID, 5)
    kept = encode(segments, tiny_tokenizer, tokens_per_image=4, max_length=second_image)  # cut right before it
    assert kept.num_images == 1 and IMAGE_ID not in kept.input_ids[5:]


def test_collate_pads_right_and_concatenates_images():
    image_a, image_b = torch.zeros(1, 3, 4, 4), torch.ones(2, 3, 4, 4)
    examples = [
        Example("a", "s1", [1, 4, 10, 11], [-100, -100, 10, 11], image_a),
        Example("b", "s2", [1, 12], [-100, 12], None),
        Example("c", "s1", [1, 4, 4, 13, 14, 2], [-100, -100, -100, 13, 14, 2], image_b),
    ]
    batch = collate(examples, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 4, 10, 11, 3, 3], [1, 12, 3, 3, 3, 3], [1, 4, 4, 13, 14, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["labels"][1].tolist() == [-100, 12, -100, -100, -100, -100]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"][0].sum() == 0 and (batch["pixel_values"][1:] == 1).all()  # sample order kept
    assert batch["num_target_tokens"] == 2 + 1 + 3
    assert batch["keys"] == ["a", "b", "c"] and batch["sources"] == ["s1", "s2", "s1"]
    assert collate(examples[1:2], pad_token_id=3)["pixel_values"] is None


def test_a_cut_inside_a_later_image_drops_that_image_and_keeps_the_earlier_text(tiny_tokenizer):
    segments = [Segment("<image>\n", False), Segment("赤色です。", True), Segment("<image>\n", False),
                Segment("円です。", True)]
    full = encode(segments, tiny_tokenizer, tokens_per_image=4, max_length=512)
    second_image = full.input_ids.index(IMAGE_ID, 5)
    cut = encode(segments, tiny_tokenizer, tokens_per_image=4, max_length=second_image + 2)  # inside image 2
    assert cut.num_images == 1 and cut.input_ids == full.input_ids[:second_image]


def rendered_pieces(tok) -> list[str]:
    """The text pieces encode() tokenizes for CONVERSATION in every template, and edge cases."""
    pieces = [piece for template in ("asagi", "sarashina", "plain")
              for segment in render(CONVERSATION, template, tok.eos_token) for piece in segment.text.split("<image>")]
    return pieces + [" ", "\n\n", "  前後に空白  ", f"{tok.eos_token}{tok.eos_token}x", "<image>", "ｱｲｳ①Ⅻ", "a" * 300]


def test_piece_ids_are_the_tokenizer_calls_ids_for_fast_and_sentencepiece_tokenizers(tiny_tokenizer, tmp_path):
    for tok in (tiny_tokenizer, build_tiny_sentencepiece_tokenizer(tmp_path)):
        piece_ids = piece_encoder(tok)
        for piece in rendered_pieces(tok):
            assert piece_ids(piece) == tok(piece, add_special_tokens=False)["input_ids"], (type(tok), piece)


def test_piece_ids_ignore_a_truncation_left_on_the_backend_by_another_call(tiny_tokenizer):
    piece_ids, text = piece_encoder(tiny_tokenizer), "この図形は何色ですか？赤色です。"
    full = piece_ids(text)
    tiny_tokenizer([text], truncation=True, max_length=2)  # transformers leaves the backend truncating at 2
    try:
        assert tiny_tokenizer.backend_tokenizer.truncation is not None
        assert piece_ids(text) == full and len(full) > 2
    finally:
        tiny_tokenizer(text)  # a plain call resets the backend for the session's other tests


def test_piece_ids_go_through_a_tokenizer_that_overrides_its_call(tiny_tokenizer):
    class Lowercasing(type(tiny_tokenizer)):
        def __call__(self, text, **kwargs):
            return super().__call__(text.lower(), **kwargs)

    tok = Lowercasing(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token=tiny_tokenizer.bos_token,
                      eos_token=tiny_tokenizer.eos_token)
    assert piece_encoder(tok)("ABC") == tiny_tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer("ABC", add_special_tokens=False)["input_ids"] != piece_encoder(tok)("ABC")


def test_piece_ids_of_a_tokenizer_that_cannot_be_cached_still_go_through_its_call():
    class Unhashable:  # a tokenizer-like wrapper that defines __eq__ has no hash, so no weak dictionary key
        __hash__ = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    assert piece_encoder(Unhashable())("ab") == [97, 98]
