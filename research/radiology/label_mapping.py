"""Map label volumes from another label scheme (such as TotalSegmentator's) onto a model's labels by name."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from appcore.labels import LabelSet


def load_class_map(path: Path | str) -> dict[int, str]:
    """``{id: name}`` from a JSON object such as TotalSegmentator's ``class_map.json``."""
    return {int(k): str(v) for k, v in json.loads(Path(path).read_text()).items()}


def remap_by_name(labels: np.ndarray, source: Mapping[int, str], target: LabelSet) -> np.ndarray:
    """Relabel ``labels`` (ids of ``source``) to ``target``'s ids; classes ``target`` lacks become 0."""
    lut = np.zeros(max(max(source), int(labels.max(initial=0))) + 1, dtype=np.uint8)
    by_name = target.name_to_id()
    for source_id, name in source.items():
        if name in by_name:
            lut[source_id] = by_name[name]
    return lut[np.rint(labels).astype(np.int64)]
