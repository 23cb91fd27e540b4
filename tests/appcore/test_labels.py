from __future__ import annotations

import pytest

from appcore.labels import Label, LabelSet
from radiology.registry import MODELS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "", "id": 1, "color": (0, 0, 0)}, "non-empty identifier"),
        ({"name": "a b", "id": 1, "color": (0, 0, 0)}, "non-empty identifier"),
        ({"name": "liver", "id": 0, "color": (0, 0, 0)}, r"id must be in 1\.\.255"),
        ({"name": "liver", "id": 1, "color": (0, 0, 300)}, "color must be three values"),
    ],
)
def test_bad_label(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Label(**kwargs)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ((Label("a", 1, (1, 1, 1)), Label("a", 2, (2, 2, 2))), "Duplicate label names"),
        ((Label("a", 1, (1, 1, 1)), Label("b", 1, (2, 2, 2))), "Duplicate label ids"),
    ],
)
def test_bad_labelset(labels: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LabelSet(labels)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_are_consistent(name: str) -> None:
    spec = MODELS[name]
    assert spec.name == name
    colors = [label.color for label in spec.labels]
    assert len(set(colors)) == len(colors), "each class needs its own display colour"
    assert spec.num_classes == max(spec.labels.ids) + 1
    assert spec.labels.allowed_values == frozenset({0, *spec.labels.ids})
    with pytest.raises(KeyError, match="valid names"):
        spec.labels.by_name("nope")


def test_organs_ct_has_the_required_organs() -> None:
    names = set(MODELS["organs_ct"].labels.name_to_id())
    assert {"spleen", "kidney_left", "kidney_right", "liver", "stomach", "pancreas", "aorta"} <= names
