"""The standard simulated annotator of interactive segmentation, and random clicks for training.

The standard annotator looks at what is wrong and clicks once: for each class ``t`` (background
included) the voxels that are ``t`` in the reference but not in the prediction are split into
6-connected regions; the largest region of all gets the click, at its most interior voxel (the
maximum of its Euclidean distance transform), under the name of its reference class. A region the
prediction missed thus gets a click of its label, and a false region (reference background) a
background click.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def standard_click(pred: np.ndarray, truth: np.ndarray, classes: int) -> tuple[int, tuple[int, int, int]] | None:
    """``(class, voxel)`` of the standard annotator's next click, or ``None`` if ``pred`` is right everywhere."""
    best: tuple[int, int, np.ndarray] | None = None  # size, class, region mask
    for t in range(classes):
        wrong = (truth == t) & (pred != t)
        if not wrong.any():
            continue
        regions, count = ndimage.label(wrong, structure=SIX_CONNECTED)
        sizes = np.bincount(regions.ravel(), minlength=count + 1)
        sizes[0] = 0
        largest = int(sizes.argmax())
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), t, regions == largest)
    if best is None:
        return None
    _, t, region = best
    # Padded so that a region touching the volume's edge is measured to that edge too.
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
    voxel = np.unravel_index(int(depth.argmax()), region.shape)
    return t, (int(voxel[0]), int(voxel[1]), int(voxel[2]))


def random_interior_voxel(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int] | None:
    """A voxel of ``mask`` drawn with probability proportional to its depth in the mask (its distance
    to the nearest voxel outside), as DeepEdit draws its simulated clicks; ``None`` for an empty mask."""
    if not mask.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1].ravel()
    weights = depth**2
    index = int(rng.choice(depth.size, p=weights / weights.sum()))
    voxel = np.unravel_index(index, mask.shape)
    return int(voxel[0]), int(voxel[1]), int(voxel[2])


def random_error_click(
    pred: np.ndarray, truth: np.ndarray, classes: int, rng: np.random.Generator
) -> tuple[int, tuple[int, int, int]] | None:
    """A click inside the errors, not necessarily the largest: a class drawn in proportion to its
    wrong voxels, then a voxel of them by ``random_interior_voxel``; ``None`` if nothing is wrong."""
    wrong = [(truth == t) & (pred != t) for t in range(classes)]
    sizes = np.array([w.sum() for w in wrong], np.float64)
    if sizes.sum() == 0:
        return None
    t = int(rng.choice(classes, p=sizes / sizes.sum()))
    voxel = random_interior_voxel(wrong[t], rng)
    return None if voxel is None else (t, voxel)


def mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Mean Dice over the foreground classes ``1..classes-1`` (a class absent from both counts 1)."""
    scores = []
    for c in range(1, classes):
        p, t = pred == c, truth == c
        denom = int(p.sum()) + int(t.sum())
        scores.append(1.0 if denom == 0 else 2.0 * float((p & t).sum()) / denom)
    return float(np.mean(scores))
