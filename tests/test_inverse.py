"""The infer's inversion (``radiology.inverse``) answers what MONAI's ``Invertd`` answers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Spacingd

from radiology.inverse import InvertClassIndexd, invert_class_index
from radiology.registry import MODELS
from radiology.splits import msd_cases, split_cases
from radiology.transforms import preprocess
from tests.conftest import HIPPO, SPLEEN, TOTALSEG, requires_shared, write_nifti

AGREEMENT = 0.9999


def _both(model: str, path: Path, pre: list | None = None) -> tuple[np.ndarray, np.ndarray, MetaTensor]:
    """Invertd's and ours on a random class map of the model's grid (every voxel its own draw: the
    hardest map to agree on, each misplaced index shows)."""
    spec = MODELS[model]
    pre = pre if pre is not None else preprocess(spec, with_label=False)
    d = Compose(pre)({"image": str(path)})
    image = d["image"]
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, spec.num_classes, image.shape).astype(np.float32))
    d["pred"] = MetaTensor(labels, meta=image.meta)
    theirs = Invertd(keys="pred", transform=Compose(pre), orig_keys="image", nearest_interp=True)(dict(d))["pred"]
    ours = InvertClassIndexd(keys="pred", transform=Compose(pre))(dict(d))["pred"]
    return np.asarray(theirs)[0], np.asarray(ours)[0], ours


def _agree(model: str, path: Path, pre: list | None = None) -> None:
    theirs, ours, meta = _both(model, path, pre)
    assert ours.shape == theirs.shape == nib.load(path).shape
    assert ours.dtype == np.uint8
    share = float((theirs == ours).mean())
    assert share >= AGREEMENT, f"{share:.6f} of voxels agree"
    assert np.allclose(np.asarray(meta.affine), nib.load(path).affine, atol=1e-4)


def _hippocampus_test_cases() -> list[Path]:
    return [case.image for case in split_cases(msd_cases(HIPPO))["test"]] if HIPPO.exists() else []


@requires_shared
@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("organs_ct", SPLEEN / "imagesTr" / "spleen_2.nii.gz"),  # 0.79 x 0.79 x 5 mm to 2 x 2 x 3
        ("organs_ct", TOTALSEG / "example_ct.nii.gz"),  # 3 mm to 2 mm: voxel centres exactly between two
        *(("hippocampus", p) for p in _hippocampus_test_cases()),
    ],
    ids=lambda v: v if isinstance(v, str) else Path(v).name,
)
def test_real_images(model: str, path: Path) -> None:
    _agree(model, path)


PHANTOMS = {
    # voxel axes (signed permutation) x voxel size (mm), origin
    "RAS, 0.8 x 0.8 x 1": (np.diag([0.8, 0.8, 1.0]), (-200.0, -180.0, 50.0)),
    "LPS, 0.7 x 1.3 x 2.5": (np.diag([-0.7, -1.3, 2.5]), (90.0, 120.0, -40.0)),
    "permuted (PIL), 3 x 1.5 x 0.6": (np.array([[0, 0, -0.6], [-3.0, 0, 0], [0, -1.5, 0]]), (10.0, 33.3, 7.0)),
    "permuted and flipped, 1.5 x 4 x 0.9": (np.array([[0, 1.5, 0], [0, 0, -4.0], [-0.9, 0, 0]]), (-5.5, 0.25, 60.0)),
    "exactly between (1.5 and 6 mm)": (np.diag([1.5, 1.5, 6.0]), (0.0, 0.0, 0.0)),
}


@pytest.mark.parametrize("name", list(PHANTOMS))
@pytest.mark.parametrize("model", ["organs_ct", "hippocampus"])
def test_phantoms_with_flipped_permuted_anisotropic_axes(tmp_path: Path, name: str, model: str) -> None:
    axes, origin = PHANTOMS[name]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = axes, origin
    data = np.random.default_rng(1).normal(0, 300, (61, 47, 33)).astype(np.int16)
    _agree(model, write_nifti(tmp_path / "phantom.nii.gz", data, affine))


def test_oblique_image(tmp_path: Path, oblique_affine: np.ndarray) -> None:
    """Spacingd keeps the directions of a rotated image's voxel axes: still axis-aligned voxel to voxel."""
    data = np.random.default_rng(2).normal(0, 300, (40, 30, 20)).astype(np.int16)
    _agree("organs_ct", write_nifti(tmp_path / "oblique.nii.gz", data, oblique_affine))


def test_rotating_preprocessing_falls_back_to_invertd(tmp_path: Path, oblique_affine: np.ndarray) -> None:
    """``Spacingd(diagonal=True)`` rotates an oblique image onto the world axes: no per-axis map, Invertd."""
    path = write_nifti(tmp_path / "oblique.nii.gz", np.ones((20, 16, 12), np.float32), oblique_affine)
    pre = preprocess(MODELS["organs_ct"], with_label=False)
    pre = [Spacingd(keys="image", pixdim=(2.0, 2.0, 3.0), diagonal=True) if isinstance(t, Spacingd) else t for t in pre]
    image = Compose(pre)({"image": str(path)})["image"]
    assert invert_class_index(np.zeros(image.shape[1:], np.uint8), image) is None
    _agree("organs_ct", path, pre)


def test_class_indices_over_uint8_are_refused(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "img.nii.gz", np.ones((8, 8, 8), np.float32))
    pre = preprocess(MODELS["hippocampus"], with_label=False)
    d = Compose(pre)({"image": str(path)})
    d["pred"] = MetaTensor(torch.full(d["image"].shape, 300.0), meta=d["image"].meta)
    with pytest.raises(ValueError, match="run from 300.0 to 300.0: a uint8 label holds 0-255"):
        InvertClassIndexd(keys="pred", transform=Compose(pre))(d)
