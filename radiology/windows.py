"""Sliding-window geometry shared by infer and scoring; no server imports, so GPU and offline tools use it alone."""

from __future__ import annotations

import math
from collections.abc import Sequence

OVERLAP = 0.25


def windows_along(size: int, window: int, overlap: float) -> int:
    """How many windows MONAI's sliding window places along an axis of ``size`` voxels.

    The image is first padded to at least ``window``; windows then start every
    ``int(window * (1 - overlap))`` voxels until one reaches the end (``monai.inferers.utils``).
    """
    if size <= window:
        return 1
    interval = max(1, int(window * (1 - overlap)))
    return math.ceil((size - window) / interval) + 1


def infer_window(
    shape: Sequence[int], roi: Sequence[int], *, overlap: float, max_scale: float, multiple: int
) -> tuple[int, ...]:
    """The sliding-window size that needs the fewest voxels of network input to cover ``shape``.

    Per axis, candidates run from the training patch ``roi`` up to ``max_scale`` times it, in steps
    of ``multiple`` (the network's downsampling factor); each costs (windows along the axis) x (its
    size), and the cheapest wins, the smaller on a tie. The cost of a window set is the product of
    the axes' costs, so choosing per axis is exact. An axis no longer than the patch keeps the patch,
    so small volumes (every hippocampus crop) run exactly as before. Example: a 65 x 66 x 43 CT at
    ``organs_ct`` spacing takes one 72 x 72 x 48 window instead of four 64 x 64 x 48 ones.
    """
    out = []
    for size, r in zip(shape, roi, strict=True):
        cap = max(r, int(r * max_scale) // multiple * multiple)
        candidates = range(r, cap + 1, multiple)
        out.append(min(candidates, key=lambda w: (windows_along(size, w, overlap) * w, w)))
    return tuple(out)
