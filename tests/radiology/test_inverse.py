"""The infer's inversion (``radiology.inverse``) answers what MONAI's ``Invertd`` answers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, Invertd, LoadImaged, Orientationd, Spacingd

from appcore.settings import AppSettings
from appcore.validation import infer_memory_mb
from radiology.inverse import InvertClassIndexd, invert_class_index
from radiology.registry import MODELS
from radiology.transforms import CompactDtyped, preprocess
from research.radiology.splits import msd_cases, split_cases
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


def _float32_decoding(spec_name: str) -> list:
    """The pre-processing as it was: decoded as float32 on the image's own grid."""
    pre = [t for t in preprocess(MODELS[spec_name], with_label=False) if not isinstance(t, CompactDtyped)]
    pre[0] = LoadImaged(keys="image", image_only=True)
    pre[2] = EnsureTyped(keys="image", dtype="float32", track_meta=True)
    return pre


def _volume(tmp_path: Path, kind: str) -> Path:
    rng = np.random.default_rng(3)
    lps = np.diag([-0.8, -0.8, 1.0, 1.0])
    if kind == "int16":
        img = nib.Nifti1Image(rng.normal(0, 400, (60, 50, 40)).astype(np.int16), lps)
    elif kind == "float64":
        img = nib.Nifti1Image(rng.normal(0, 400, (60, 50, 40)), lps)
    elif kind == "float32 with NaN":
        data = rng.normal(0, 400, (60, 50, 40)).astype(np.float32)
        data[3, 4, 5] = np.nan
        img = nib.Nifti1Image(data, lps)
    else:  # int16 with a slope and intercept
        img = nib.Nifti1Image(rng.integers(-1000, 1000, (60, 50, 40)).astype(np.int16), lps)
        img.header.set_slope_inter(0.5, -1024)
    path = tmp_path / "volume.nii.gz"
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("kind", ["int16", "float64", "float32 with NaN", "scaled int16"])
@pytest.mark.parametrize("model", ["organs_ct", "hippocampus"])
def test_file_dtype_until_resampling_changes_no_voxel(tmp_path: Path, kind: str, model: str) -> None:
    path = _volume(tmp_path, kind)
    before = Compose(_float32_decoding(model))({"image": str(path)})["image"]
    after = Compose(preprocess(MODELS[model], with_label=False))({"image": str(path)})["image"]
    assert after.dtype == torch.float32
    assert torch.equal(before.as_tensor(), after.as_tensor())
    assert torch.allclose(before.affine, after.affine)


@requires_shared
@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("organs_ct", SPLEEN / "imagesTr" / "spleen_2.nii.gz"),
        ("organs_ct", TOTALSEG / "example_ct.nii.gz"),
        *(("hippocampus", p) for p in _hippocampus_test_cases()[:5]),
    ],
    ids=lambda v: v if isinstance(v, str) else Path(v).name,
)
def test_file_dtype_until_resampling_on_real_images(model: str, path: Path) -> None:
    before = Compose(_float32_decoding(model))({"image": str(path)})["image"]
    after = Compose(preprocess(MODELS[model], with_label=False))({"image": str(path)})["image"]
    assert torch.equal(before.as_tensor(), after.as_tensor())


def test_int16_ct_stays_int16_until_reoriented(tmp_path: Path) -> None:
    """The reorientation (a flip of an LPS CT copies the volume) works on 2 bytes a voxel, not 4."""
    pre = preprocess(MODELS["organs_ct"], with_label=False)
    upto = next(i for i, t in enumerate(pre) if isinstance(t, Orientationd)) + 1
    image = Compose(pre[:upto])({"image": str(_volume(tmp_path, "int16"))})["image"]
    assert image.dtype == torch.int16


@pytest.mark.parametrize(
    ("dtype", "scaled", "passes"),
    [("int16", False, True), ("uint8", False, True), ("float32", False, False), ("int16", True, False)],
)
def test_routine_ct_within_the_default_budget(dtype: str, scaled: bool, passes: bool) -> None:
    """512 x 512 x 300 at 0.8 x 0.8 x 1 mm, a routine clinical CT: estimated at 2.2 GB and refused
    before; an int16 one now fits the default budget. Stored as float32, or scaled (nibabel decodes
    it as float64), it takes half as much again on its own grid, and the default refuses it."""
    spec = MODELS["organs_ct"]
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    need = infer_memory_mb((512, 512, 300), affine, spec.spacing, spec.num_classes, dtype=dtype, scaled=scaled)
    default = {f.name: f.default for f in dataclasses.fields(AppSettings)}["infer_memory_mb"]
    assert (need <= default) is passes, f"{need:.0f} MB against {default} MB"
