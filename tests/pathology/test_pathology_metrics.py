"""AJI and Dice of nuclei masks against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from research.pathology.metrics import aji, dice


def _mask(*boxes: tuple[int, int, int, int, int], shape: tuple[int, int] = (10, 10)) -> np.ndarray:
    m = np.zeros(shape, dtype=np.int32)
    for i, y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = i
    return m


A = _mask((1, 0, 2, 0, 2), (2, 5, 7, 5, 7))  # two 2x2 nuclei


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        (A, A, 1.0),
        (np.zeros((10, 10), np.int32), np.zeros((10, 10), np.int32), 1.0),
        (np.zeros((10, 10), np.int32), A, 0.0),
        (A, np.zeros((10, 10), np.int32), 0.0),
        # ids do not matter, only the partition
        (np.where(A == 1, 7, np.where(A == 2, 3, 0)), A, 1.0),
        # one truth nucleus found half (2 of 4 pixels), the other exactly: (2 + 4) / (4 + 4)
        (_mask((1, 0, 1, 0, 2), (2, 5, 7, 5, 7)), A, 6 / 8),
        # an extra false nucleus of 4 pixels adds its area to the union: 8 / (8 + 4)
        (_mask((1, 0, 2, 0, 2), (2, 5, 7, 5, 7), (3, 8, 10, 8, 10)), A, 8 / 12),
        # two truth nuclei merged into one prediction: each matches it; the union counts it twice
        (_mask((1, 0, 7, 0, 7)), A, (4 + 4) / (49 + 49)),
        # one truth nucleus split in two predictions: the unmatched half joins the denominator
        (_mask((1, 0, 2, 0, 1), (2, 0, 2, 1, 2), (3, 5, 7, 5, 7)), A, (2 + 4) / (4 + 4 + 2)),
    ],
)
def test_aji(pred: np.ndarray, truth: np.ndarray, expected: float) -> None:
    assert aji(pred, truth) == pytest.approx(expected)


def test_aji_refuses_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        aji(np.zeros((3, 3)), np.zeros((3, 4)))


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [(A, A, 1.0), (np.zeros((10, 10)), np.zeros((10, 10)), 1.0), (_mask((1, 0, 1, 0, 2), (2, 5, 7, 5, 7)), A, 12 / 14)],
)
def test_dice(pred: np.ndarray, truth: np.ndarray, expected: float) -> None:
    assert dice(pred, truth) == pytest.approx(expected)
