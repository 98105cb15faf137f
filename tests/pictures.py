"""Random test images: the tiling, OneVision and JPEG tests draw their pictures here."""

import numpy as np
from PIL import Image


def noise_picture(height: int, width: int, seed: int = 0) -> Image.Image:
    """An RGB image of uniform random pixels (the same for the same seed)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
