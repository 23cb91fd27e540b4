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
    """The labelled cases of an MSD folder, sorted by id.

    Uses ``dataset.json``'s ``training`` list when present; otherwise pairs ``imagesTr/X`` with
    ``labelsTr/X`` by file name, so a folder of new cases needs no manifest.
    """
    manifest = root / "dataset.json"
    if manifest.is_file():
        pairs = [(root / e["image"], root / e["label"]) for e in json.loads(manifest.read_text())["training"]]
    elif (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        pairs = [(p, root / "labelsTr" / p.name) for p in sorted((root / "imagesTr").glob("*.nii*"))]
        pairs = [(i, lab) for i, lab in pairs if lab.exists()]
    else:
        raise FileNotFoundError(f"{root} has neither dataset.json nor imagesTr/ and labelsTr/ (the MSD layout)")
    cases = [Case(id=i.name.split(".")[0], image=i.resolve(), label=lab.resolve()) for i, lab in pairs]
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
