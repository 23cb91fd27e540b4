"""The click oracle's wrong region (``research.radiology.clicks_oracle``)."""

from __future__ import annotations

import numpy as np
import pytest

from research.radiology.clicks_oracle import check_same_grid, largest_wrong_region


@pytest.mark.parametrize(
    ("case", "expected_class", "expected_voxels"),
    [
        ("missed_slab", 1, 5 * 5 * 2),  # the label misses a 2-voxel slab of class 1: the whole slab
        ("false_island", 0, 3 * 3 * 3),  # a false island of class 2: the island, as background
        ("perfect", None, 0),
    ],
)
def test_the_oracle_takes_the_whole_region_the_annotator_clicks(
    case: str, expected_class: int | None, expected_voxels: int
) -> None:
    truth = np.zeros((12, 12, 12), np.int64)
    truth[2:7, 2:7, 2:6] = 1
    pred = truth.copy()
    if case == "missed_slab":
        pred[2:7, 2:7, 4:6] = 0
    elif case == "false_island":
        pred[8:11, 8:11, 8:11] = 2
    found = largest_wrong_region(pred, truth, 3)
    if expected_class is None:
        assert found is None
        return_class = None
    else:
        assert found is not None
        return_class, region = found
        assert int(region.sum()) == expected_voxels
        fixed = pred.copy()
        fixed[region] = return_class
        np.testing.assert_array_equal(fixed, truth)
    assert return_class == expected_class


def test_a_case_off_the_model_grid_is_refused() -> None:
    check_same_grid("same", (3, 4, 5), (3, 4, 5))
    with pytest.raises(ValueError, match=r"case_7: model grid \(3, 4, 5\) is not the image's \(3, 4, 6\)"):
        check_same_grid("case_7", (3, 4, 5), (3, 4, 6))
