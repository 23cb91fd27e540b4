from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from radiology.registry import MODELS
from research.radiology.label_mapping import load_class_map, remap_by_name
from research.radiology.offline import dice_per_class
from tests.conftest import TOTALSEG, requires_shared


def test_remap_by_name(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"1": "spleen", "5": "liver", "9": "not_in_model", "52": "aorta"}))
    source = load_class_map(path)
    labels = np.array([0, 1, 5, 9, 52, 5.0])
    assert remap_by_name(labels, source, MODELS["organs_ct"].labels).tolist() == [0, 1, 5, 0, 8, 5]


@requires_shared
def test_totalsegmentator_map_covers_every_organs_ct_label() -> None:
    names = set(load_class_map(TOTALSEG / "class_map.json").values())
    missing = set(MODELS["organs_ct"].labels.name_to_id()) - names
    assert not missing, f"organs_ct labels without a TotalSegmentator class: {missing}"


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], {1: 1.0, 2: 1.0}),  # class 2 absent from both counts as perfect
        ([1, 0, 0, 0], [1, 1, 0, 0], {1: 2 / 3, 2: 1.0}),
        ([2, 2, 0, 0], [1, 1, 0, 0], {1: 0.0, 2: 0.0}),
    ],
)
def test_dice_per_class(pred: list, truth: list, expected: dict) -> None:
    got = dice_per_class(np.array(pred), np.array(truth), (1, 2))
    assert got == pytest.approx(expected)
