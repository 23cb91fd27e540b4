"""Shared fixtures: the real data folder, phantom volumes and small helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from research.radiology.splits import Case

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
HIPPO = SHARED / "hippocampus_mr"
TOTALSEG = SHARED / "totalseg_ct"
SPLEEN = SHARED / "spleen_ct"

requires_shared = pytest.mark.skipif(
    not (HIPPO / "dataset.json").exists(), reason=f"real data folder {SHARED} is absent"
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def phantom_cases(folder: Path, n: int, shape: tuple[int, int, int] = (36, 50, 36)) -> list[Case]:
    """Tiny synthetic MR-like volumes with a two-part structure (mechanics only, not accuracy)."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        label[12:24, 10:25, 12:24] = 1
        label[12:24, 25:40, 12:24] = 2
        image = (label * 100.0 + rng.normal(0, 10, label.shape)).astype(np.float32)
        img = write_nifti(folder / f"img_{i}.nii.gz", image)
        lab = write_nifti(folder / f"lab_{i}.nii.gz", label)
        cases.append(Case(id=f"c{i}", image=img, label=lab))
    return cases


def phantom_msd_folder(tmp_path: Path, n: int) -> Path:
    """``n`` phantom cases in the MSD layout (no dataset.json), as ``research.radiology.offline`` reads them."""
    data = tmp_path / "msd"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for case in phantom_cases(tmp_path, n):
        case.image.rename(data / "imagesTr" / f"hippocampus_{case.id}.nii.gz")
        case.label.rename(data / "labelsTr" / f"hippocampus_{case.id}.nii.gz")
    return data


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """LPS-oriented, anisotropic, rotated by 10 degrees about z, with an offset origin."""
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, -0.9, 2.5])
    affine[:3, 3] = [40.0, -25.0, 12.5]
    return affine


@pytest.fixture
def seeded() -> Iterator[None]:
    """Seeds torch, numpy and random (MONAI's ``set_determinism``) for a test whose training must
    reach a figure, then unseeds them: MONAI Label's training never seeds, and one unseeded run of
    ``test_organs_ct_learns`` fell short once."""
    set_determinism(seed=0)
    try:
        yield
    finally:
        set_determinism(seed=None)


def records_rewritten_during(
    monkeypatch: pytest.MonkeyPatch, module: object, check: str, store: object, other: object, image_id: str
) -> None:
    """While ``store`` runs ``module.check`` (a step of its label save), another process's datastore
    (``other``, on the same folder) writes the records file and ``store``'s folder watcher re-reads it."""
    checked = getattr(module, check)

    def meanwhile(*args, **kwargs):
        time.sleep(0.05)  # a later mtime than the records file's
        other.update_image_info(image_id, {"note": "from another process"})  # type: ignore[attr-defined]
        store.refresh()  # type: ignore[attr-defined]  # the watcher's reaction to the records file changing
        return checked(*args, **kwargs)

    monkeypatch.setattr(module, check, meanwhile)


# The suite's random-order option (``--shuffle``); hooks are picked up from this module's namespace.
from tests.shuffle import pytest_addoption, pytest_collection_modifyitems, pytest_report_header  # noqa: E402, F401
