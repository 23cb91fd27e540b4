"""Deterministic train/validation/test splits of an MSD-layout dataset, by case id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    label: Path


def msd_cases(root: Path) -> list[Case]:
    """The labelled cases of an MSD folder (``dataset.json`` with a ``training`` list), sorted by id."""
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"No dataset.json in {root}; expected the MSD layout (imagesTr/, labelsTr/)")
    entries = json.loads(manifest.read_text())["training"]
    cases = []
    for entry in entries:
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        cases.append(Case(id=image.name.split(".")[0], image=image, label=label))
    return sorted(cases, key=lambda c: c.id)


def split_cases(cases: list[Case], *, test_every: int = 5, val_every: int = 10) -> dict[str, list[Case]]:
    """Every ``test_every``-th case (sorted by id) is test, every ``val_every``-th of the rest validation.

    A fixed rule rather than a random draw, so the held-out cases can be named in the model card and
    re-derived by anyone with the same folder.
    """
    test = [c for i, c in enumerate(cases) if i % test_every == test_every - 1]
    rest = [c for i, c in enumerate(cases) if i % test_every != test_every - 1]
    val = [c for i, c in enumerate(rest) if i % val_every == val_every - 1]
    train = [c for i, c in enumerate(rest) if i % val_every != val_every - 1]
    return {"train": train, "val": val, "test": test}
