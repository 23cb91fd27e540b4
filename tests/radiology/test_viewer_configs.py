from __future__ import annotations

import pytest

from radiology.registry import MODELS
from radiology.viewer_configs import DEFAULT_DIR, slicer_color_table


@pytest.mark.parametrize("name", sorted(MODELS))
def test_committed_slicer_colour_tables_match_the_registry(name: str) -> None:
    path = DEFAULT_DIR / f"{name}.ctbl"
    assert path.exists(), "run: python -m radiology.viewer_configs"
    assert path.read_text() == slicer_color_table(MODELS[name]), "stale; run: python -m radiology.viewer_configs"
