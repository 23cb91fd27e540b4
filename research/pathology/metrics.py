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


def correction_effort(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> dict[str, int]:
    """What an annotator changes to turn the instance mask ``pred`` into ``truth``, and what drawing
    ``truth`` from scratch takes.

    A predicted nucleus matches a true one when their IoU is at least ``iou`` and each is the
    other's best overlap (at 0.5 or more that pairing is unique); a match is kept as it is. A true
    nucleus without a match is redrawn when some prediction overlaps it (the one overlapping most
    is reshaped: a wrong outline, a merge or a piece of a split), else added; every other unmatched
    prediction is deleted. Pixels are those whose foreground/background state changes.

    Returns ``nuclei_add``, ``nuclei_delete``, ``nuclei_redraw``, ``nuclei`` (their sum), ``pixels``,
    and from scratch ``scratch_nuclei`` (every true nucleus drawn) and ``scratch_pixels`` (every
    true foreground pixel painted).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, truth {truth.shape}")
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    inter, g_area, p_area = _overlaps(truth.astype(np.int64), pred.astype(np.int64))
    n_true, n_pred = len(g_area), len(p_area)
    matched_true = np.zeros(n_true, dtype=bool)
    used_pred = np.zeros(n_pred, dtype=bool)
    redraw = add = 0
    if n_true and n_pred:
        ious = inter / (g_area[:, None] + p_area[None, :] - inter)
        best_pred, best_true = ious.argmax(axis=1), ious.argmax(axis=0)
        for g in range(n_true):
            p = best_pred[g]
            if ious[g, p] >= iou and best_true[p] == g:
                matched_true[g] = used_pred[p] = True
        for g in np.flatnonzero(~matched_true):
            free = np.flatnonzero((inter[g] > 0) & ~used_pred)
            if free.size:
                used_pred[free[np.argmax(inter[g, free])]] = True
                redraw += 1
            else:
                add += 1
    else:
        add = n_true
    delete = int((~used_pred).sum())
    return {
        "nuclei_add": int(add),
        "nuclei_delete": delete,
        "nuclei_redraw": int(redraw),
        "nuclei": int(add + delete + redraw),
        "pixels": int(np.count_nonzero((pred > 0) != (truth > 0))),
        "scratch_nuclei": int(n_true),
        "scratch_pixels": int(np.count_nonzero(truth > 0)),
    }
