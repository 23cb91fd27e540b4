"""Nuclei segmentation metrics: pixel Dice and Aggregated Jaccard Index (Kumar et al., 2017)."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice of two instance (or binary) masks; 1.0 when both are empty."""
    p, t = pred > 0, truth > 0
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(p, t).sum()) / denom


def _overlaps(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts: intersection[g, p] (ids 1..), truth areas, prediction areas."""
    g_ids, g = np.unique(truth, return_inverse=True)
    p_ids, p = np.unique(pred, return_inverse=True)
    g, p = g.ravel(), p.ravel()
    inter = np.bincount(g * len(p_ids) + p, minlength=len(g_ids) * len(p_ids)).reshape(len(g_ids), len(p_ids))
    # Drop the background row/column when present.
    g_fg = g_ids > 0
    p_fg = p_ids > 0
    g_area = np.bincount(g, minlength=len(g_ids))[g_fg]
    p_area = np.bincount(p, minlength=len(p_ids))[p_fg]
    return inter[np.ix_(g_fg, p_fg)], g_area, p_area


def aji(pred: np.ndarray, truth: np.ndarray) -> float:
    """Aggregated Jaccard Index of two instance masks (0 background, one id per object).

    Each true nucleus is matched to the predicted one with the highest IoU; the index is the summed
    intersections over the summed unions of those pairs, plus, in the denominator, the area of every
    predicted nucleus matched to no true one. True nuclei with no overlapping prediction add their
    area to the denominator. 1.0 when both masks are empty; 0.0 when only one is.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, truth {truth.shape}")
    inter, g_area, p_area = _overlaps(truth.astype(np.int64), pred.astype(np.int64))
    if g_area.size == 0 and p_area.size == 0:
        return 1.0
    if g_area.size == 0 or p_area.size == 0:
        return 0.0
    union = g_area[:, None] + p_area[None, :] - inter
    iou = inter / union
    best = iou.argmax(axis=1)
    has_match = inter[np.arange(len(g_area)), best] > 0
    num = float(inter[np.arange(len(g_area)), best][has_match].sum())
    den = float(union[np.arange(len(g_area)), best][has_match].sum()) + float(g_area[~has_match].sum())
    used = np.zeros(len(p_area), dtype=bool)
    used[best[has_match]] = True
    den += float(p_area[~used].sum())
    return num / den if den else 1.0
