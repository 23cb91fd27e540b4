"""Pure patch selection on a slide: a random patch that always fits, a grid, the most uncertain patch."""

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


def random_patch(image_size: tuple[int, int], patch_size: tuple[int, int], rng: random.Random) -> Box:
    """A patch placed uniformly at random, wholly inside the image."""
    pw, ph = fit_patch(image_size, patch_size)
    iw, ih = image_size
    return rng.randint(0, iw - pw), rng.randint(0, ih - ph), pw, ph


def patch_grid(image_size: tuple[int, int], patch_size: tuple[int, int]) -> list[Box]:
    """Patches tiling the image; the last row and column are shifted inwards so every patch is whole."""
    pw, ph = fit_patch(image_size, patch_size)
    iw, ih = image_size
    xs = sorted({min(x, iw - pw) for x in range(0, iw, pw)})
    ys = sorted({min(y, ih - ph) for y in range(0, ih, ph)})
    return [(x, y, pw, ph) for y in ys for x in xs]


def most_uncertain(boxes: Sequence[Box], scores: Mapping[Box, float], rng: random.Random) -> Box:
    """The box with the highest score, ties broken at random; unscored boxes count as least uncertain."""
    if not boxes:
        raise ValueError("no candidate patches")
    best = max(scores.get(b, float("-inf")) for b in boxes)
    tied = [b for b in boxes if scores.get(b, float("-inf")) == best]
    return rng.choice(tied)
