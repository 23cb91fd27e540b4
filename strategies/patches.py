"""Pure patch selection on a slide: a grid of whole patches, ranked by uncertainty."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

Box = tuple[int, int, int, int]  # (x, y, w, h)


def fit_patch(image_size: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
    """The patch size shrunk to the image where the image is smaller (a small slide is one patch)."""
    (iw, ih), (pw, ph) = image_size, patch_size
    if iw < 1 or ih < 1:
        raise ValueError(f"image size must be positive, got {image_size}")
    if pw < 1 or ph < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    return min(pw, iw), min(ph, ih)


def patch_grid(image_size: tuple[int, int], patch_size: tuple[int, int]) -> list[Box]:
    """Patches tiling the image; the last row and column are shifted inwards so every patch is whole."""
    pw, ph = fit_patch(image_size, patch_size)
    iw, ih = image_size
    xs = sorted({min(x, iw - pw) for x in range(0, iw, pw)})
    ys = sorted({min(y, ih - ph) for y in range(0, ih, ph)})
    return [(x, y, pw, ph) for y in ys for x in xs]


def ranked_patches(boxes: Sequence[Box], scores: Mapping[Box, float], rng: random.Random) -> list[Box]:
    """The boxes, most uncertain first; ties in random order, unscored boxes last (also at random)."""
    keyed = [(-scores.get(b, float("-inf")), rng.random(), b) for b in boxes]
    return [b for _, _, b in sorted(keyed)]
