"""Score an export on freshly drawn synthetic shapes: does it name the colour (and the shape)? And does it answer
the colour question as the synthetic preference pairs' chosen answers do, in a whole sentence?

Loads the export through its family's loader (plain transformers for LLaVA exports), asks in the
export's own chat template, and compares the answer's first word with the truth. Chance is 1/6 for colour.
"""

from __future__ import annotations

import random

from data_pipelines.synthetic.synth import (
    COLOUR_QUESTION,
    COLOURS,
    SENTENCE_OPENING,
    SHAPE_QUESTION,
    SHAPES,
    draw_detail,
    draw_shape,
    preferred_colour_answer,
)
from train.benchmarks.generate import answer
from train.chat import load_export


def shapes_accuracy(model_dir, samples: int = 100, seed: int = 12345, image_size: int = 64,
                    detail: bool = False) -> dict:
    """`detail`: small shapes on wide, tall or large canvases (synth.draw_detail), which a single downscaled view of
    the image loses and a tiled view keeps."""
    model, processor = load_export(model_dir)
    rng = random.Random(seed)  # a seed the training data never used: fresh shapes
    colour_hits = shape_hits = preferred = 0
    examples = []
    for _ in range(samples):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image = draw_detail(rng, shape, colour) if detail else draw_shape(rng, shape, colour, image_size)
        said_colour = answer(model, processor, [image], COLOUR_QUESTION)
        said_shape = answer(model, processor, [image], SHAPE_QUESTION)
        # the colour named first, in the VQA set's answer or the preference pairs' whole sentence
        colour_hits += said_colour.removeprefix(SENTENCE_OPENING).startswith(colour + "色")
        shape_hits += said_shape.startswith(shape)
        preferred += said_colour.startswith(preferred_colour_answer(colour))  # as the synthetic pairs' chosen
        if len(examples) < 5:
            examples.append({"truth": f"{colour}色の{shape}", "colour_answer": said_colour, "shape_answer": said_shape})
    return {
        "samples": samples,
        "images": "detail" if detail else "shapes",
        "colour_accuracy": colour_hits / samples,
        "shape_accuracy": shape_hits / samples,
        "chance_colour": 1 / len(COLOURS),
        # the colour question answered as the preference pairs' chosen answers do: a whole sentence, right colour
        "chosen_style_rate": preferred / samples,
        "examples": examples,
    }
