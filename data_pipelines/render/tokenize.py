"""Rendered segments -> token ids and loss labels, with each `<image>` expanded to the vision encoder's token count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from weakref import WeakKeyDictionary

IGNORE_INDEX = -100  # label of positions that do not contribute to the loss (torch's CrossEntropyLoss default)


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]  # the token id where it is a training target, else IGNORE_INDEX
    num_images: int


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, or its EOS where it has none (never a target)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def image_token_id(tokenizer, image_token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or (token_id == tokenizer.unk_token_id and image_token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no {image_token!r} token; add it as a special token")
    return token_id


def piece_encoder(tokenizer) -> Callable[[str], list[int]]:
    """`tokenizer(piece, add_special_tokens=False)["input_ids"]` as a function of the piece, cached per tokenizer.

    A stock fast tokenizer's call, for one piece with no special tokens added, only configures its Rust backend (no
    truncation or padding, special tokens in the text matched unless split_special_tokens) and converts the encoding:
    calling the backend directly gives the same ids at a third of the cost, most of a sample's tokenizing in the
    loader. It is used only while the backend stands as that call would leave it, and only for a tokenizer whose
    call path is transformers' own and that gives the same ids on probe texts; anything else goes through its call.
    """
    try:
        cached = _PIECE_ENCODERS.get(tokenizer)
    except TypeError:  # a tokenizer that cannot be a weak dictionary's key: nothing to cache it under
        return _build_piece_encoder(tokenizer)
    if cached is None:
        cached = _PIECE_ENCODERS[tokenizer] = _build_piece_encoder(tokenizer)
    return cached


_PIECE_ENCODERS: WeakKeyDictionary = WeakKeyDictionary()


def _build_piece_encoder(tokenizer) -> Callable[[str], list[int]]:
    def through_call(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False)["input_ids"]

    backend = _stock_backend(tokenizer)
    if backend is None:
        return through_call

    def direct(piece: str) -> list[int]:
        if (backend.truncation is not None or backend.padding is not None
                or backend.encode_special_tokens != tokenizer.split_special_tokens):
            return through_call(piece)  # someone configured the backend: the call restores it
        return backend.encode(piece, add_special_tokens=False).ids

    specials = "".join(tokenizer.all_special_tokens)
    probes = ["", " ", "a b  c\n", "日本語の テキスト。", f"x{specials}y {specials} z", "  \t\n末尾 "]
    return direct if all(direct(text) == through_call(text) for text in probes) else through_call


def _stock_backend(tokenizer):
    """The Rust tokenizer of a fast tokenizer whose call path is transformers' own, else None."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    kind = type(tokenizer)
    stock = (isinstance(tokenizer, TokenizersBackend) and kind.__call__ is PreTrainedTokenizerBase.__call__
             and kind._encode_plus is TokenizersBackend._encode_plus
             and not hasattr(tokenizer, "_switch_to_input_mode"))
    return tokenizer.backend_tokenizer if stock else None


def encode(segments, tokenizer, *, image_token: str = "<image>", tokens_per_image: int | list[int],
           max_length: int, image_start_end: tuple[str, str] | None = None,
           cut_between_segments: bool = False) -> EncodedSample | None:
    """Token ids and labels for `segments` (from templates.render), or None when the sample cannot fit.

    Each segment is tokenized on its own (without added special tokens) so the target boundary is exact; text
    such as "</s>" inside a segment becomes its special token id. BOS, when the tokenizer has one, is prepended.
    Longer than `max_length`: cut from the end, only inside text (an image whose tokens the cut would split is dropped
    whole); None when no target token is left, e.g. when the image tokens alone do not fit.
    `tokens_per_image`: one count for every image, or one per image in placeholder order (dynamic resolution).
    `image_start_end`: two special tokens that wrap each image's tokens (never targets).
    `cut_between_segments` (documents): longer than `max_length`, cut after the last target segment that fits whole,
    so no text is cut mid-sentence and no image is left without text after it; when not even the first target
    segment fits, cut inside it as above.
    """
    image_id = image_token_id(tokenizer, image_token)
    piece_ids = piece_encoder(tokenizer)
    counts = tokens_per_image if isinstance(tokens_per_image, list) else None
    start_end = [image_token_id(tokenizer, token) for token in image_start_end] if image_start_end else None
    input_ids: list[int] = []
    labels: list[int] = []
    image_starts: list[int] = []
    image_ends: list[int] = []
    segment_ends: list[int] = []  # where each target segment ends
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, is_target in segments:
        for i, piece in enumerate(text.split(image_token)):
            if i > 0:  # an image placeholder stood before this piece
                image_starts.append(len(input_ids))
                count = counts[len(image_starts) - 1] if counts is not None else tokens_per_image
                block = [image_id] * count
                if start_end is not None:
                    block = [start_end[0], *block, start_end[1]]
                input_ids += block
                labels += [IGNORE_INDEX] * len(block)
                image_ends.append(len(input_ids))
            if piece:
                ids = piece_ids(piece)
                input_ids += ids
                labels += ids if is_target else [IGNORE_INDEX] * len(ids)
        if is_target:
            segment_ends.append(len(input_ids))
    if len(input_ids) > max_length:
        fitting = [end for end in segment_ends if end <= max_length] if cut_between_segments else []
        cut = fitting[-1] if fitting else max_length
        for start, end in zip(image_starts, image_ends):  # never cut inside an image's tokens: drop it whole
            if start < cut < end:
                cut = start
        input_ids, labels = input_ids[:cut], labels[:cut]
        image_starts = [start for start in image_starts if start < cut]
    predicted = labels[1:]  # labels[0] is never predicted (causal shift)
    if predicted.count(IGNORE_INDEX) == len(predicted):  # no target left (list.count: a genexpr was 5x slower)
        return None
    return EncodedSample(input_ids=input_ids, labels=labels, num_images=len(image_starts))
