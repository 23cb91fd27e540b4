"""The inference window chosen per volume (``radiology.windows.infer_window``), checked against MONAI's own tiling."""

from __future__ import annotations

import dataclasses
import math

import pytest
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from radiology.registry import MODELS
from radiology.windows import OVERLAP, infer_window, windows_along


def monai_windows(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> int:
    padded = tuple(max(s, w) for s, w in zip(shape, window, strict=True))
    interval = _get_scan_interval(padded, window, len(shape), (overlap,) * len(shape))
    return len(dense_patch_slices(padded, window, interval))


@pytest.mark.parametrize("size", [30, 48, 64, 65, 96, 130, 152, 183, 300])
@pytest.mark.parametrize("window", [48, 64, 72, 88, 96])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_windows_along_matches_monai(size: int, window: int, overlap: float) -> None:
    assert windows_along(size, window, overlap) == monai_windows((size,), (window,), overlap)


@pytest.mark.parametrize(
    ("shape", "roi", "expected"),
    [
        # spleen_ct/spleen_2 at organs_ct spacing: one window instead of four.
        ((65, 66, 43), (64, 64, 48), (72, 72, 48)),
        # totalseg_ct/example_ct_sm at organs_ct spacing: 6 larger windows instead of 12.
        ((183, 152, 30), (64, 64, 48), (80, 88, 48)),
        # The largest hippocampus crop fits the patch: unchanged.
        ((43, 59, 47), (48, 64, 48), (48, 64, 48)),
        # Exactly the patch: unchanged.
        ((64, 64, 48), (64, 64, 48), (64, 64, 48)),
        # Large volume: the cheapest tiling, not the largest window (4 x 64 deep beats 6 x 48).
        ((400, 400, 200), (64, 64, 48), (64, 64, 64)),
    ],
)
def test_infer_window(shape: tuple[int, ...], roi: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert infer_window(shape, roi, overlap=OVERLAP, max_scale=1.5, multiple=8) == expected


@pytest.mark.parametrize("shape", [(65, 66, 43), (183, 152, 30), (183, 152, 112), (97, 200, 49), (10, 10, 10)])
def test_infer_window_never_costs_more_than_the_patch(shape: tuple[int, ...]) -> None:
    roi = (64, 64, 48)
    window = infer_window(shape, roi, overlap=OVERLAP, max_scale=1.5, multiple=8)
    assert all(w % 8 == 0 and r <= w <= 1.5 * r for w, r in zip(window, roi, strict=True))
    voxels = monai_windows(shape, window, OVERLAP) * math.prod(window)
    assert voxels <= monai_windows(shape, roi, OVERLAP) * math.prod(roi)


def test_scale_one_keeps_the_training_patch() -> None:
    assert infer_window((183, 152, 30), (64, 64, 48), overlap=OVERLAP, max_scale=1.0, multiple=8) == (64, 64, 48)


def test_max_window_scale_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_window_scale must be at least 1"):
        dataclasses.replace(MODELS["organs_ct"], max_window_scale=0.5)
