"""Every infer answers on the input's own voxel grid: exact shape, spacing, origin and orientation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from radiology.infer import SegmentationInfer
from radiology.registry import MODELS
from radiology.spec import ModelSpec
from tests.conftest import SPLEEN, TOTALSEG, dice, requires_shared, write_nifti


class ThresholdInfer(SegmentationInfer):
    """The real pipeline with the network replaced by an intensity threshold in pre-processed space.

    The "prediction" is then known in the original space too (the thresholded input), so any error
    in reorientation, resampling or header handling shows up as a mismatch.
    """

    def __init__(self, spec: ModelSpec, threshold: float) -> None:
        super().__init__(spec, [])
        self.threshold = threshold

    def get_path(self, validate: bool = True) -> str:
        return "threshold"

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict:
        image = data["image"]
        self.seen = {
            "pixdim": np.asarray(image.pixdim),
            "shape": image.shape[1:],
            "axcodes": nib.aff2axcodes(image.affine),
        }
        fg = (data["image"] > self.threshold).float()
        data["pred"] = torch.cat([1 - fg, fg], dim=0)
        return data


def _run(task: SegmentationInfer, image: Path) -> nib.Nifti1Image:
    out, _ = task({"image": str(image), "device": "cpu"})
    return nib.load(out)


def _assert_same_grid(out: nib.Nifti1Image, src: nib.Nifti1Image) -> None:
    assert out.shape == src.shape[:3]
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    np.testing.assert_allclose(out.header.get_zooms()[:3], src.header.get_zooms()[:3], atol=1e-5)


@pytest.mark.parametrize(
    ("model", "zooms", "min_dice"),
    [
        ("hippocampus", (1.0, 1.0, 1.0), 1.0),  # native spacing, LPS orientation: the round trip is exact
        ("hippocampus", (1.2, 0.9, 2.5), 0.9),  # resampled to 1 mm and back
        ("organs_ct", (0.8, 0.8, 5.0), 0.9),  # thick CT slices resampled to 2 x 2 x 3 mm and back
    ],
)
def test_phantom_round_trip(
    tmp_path: Path, oblique_affine: np.ndarray, model: str, zooms: tuple, min_dice: float
) -> None:
    affine = oblique_affine.copy()
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    affine[:3, :3] = direction @ np.diag(zooms)
    shape = (48, 64, 32)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * np.array(zooms)
    center = np.array(shape) * np.array(zooms) / 2
    sphere = np.linalg.norm(grid - center, axis=-1) < 0.35 * min(np.array(shape) * np.array(zooms))
    image = np.where(sphere, 300.0, -200.0).astype(np.float32)
    src = write_nifti(tmp_path / "phantom.nii.gz", image, affine)

    spec = MODELS[model]
    threshold = 0.0 if model == "hippocampus" else 0.5  # z-scored MR / windowed CT in [0, 1]
    task = ThresholdInfer(spec, threshold)
    out = _run(task, src)
    _assert_same_grid(out, nib.load(src))
    # The network saw the image in RAS at the model's spacing, the same volume in fewer or more voxels.
    assert task.seen["axcodes"] == ("R", "A", "S")
    np.testing.assert_allclose(task.seen["pixdim"], spec.spacing, atol=1e-4)
    expected_voxels = np.prod(shape) * np.prod(zooms) / np.prod(spec.spacing)
    assert np.prod(task.seen["shape"]) == pytest.approx(expected_voxels, rel=0.1)
    pred = np.asarray(out.dataobj) == 1
    assert dice(pred, sphere) >= min_dice
    # No shift: the centroids agree to within half a voxel on every axis.
    centroid = lambda m: np.array(np.nonzero(m)).mean(axis=1)  # noqa: E731
    np.testing.assert_array_less(np.abs(centroid(pred) - centroid(sphere)), 0.5)


@requires_shared
@pytest.mark.parametrize(
    "image",
    [
        SPLEEN / "imagesTr" / "spleen_2.nii.gz",  # 0.795 x 0.795 x 5 mm, RAS, offset origin
        TOTALSEG / "chest_aorta" / "ct_cropped.nii.gz",  # 1.5 mm, LPS orientation
        TOTALSEG / "example_ct_sm.nii.gz",  # 3 mm
    ],
    ids=["spleen_ct", "chest_aorta_lps", "totalseg_sm"],
)
def test_real_ct_round_trip(image: Path) -> None:
    spec = MODELS["organs_ct"]
    # 0.05 of the window [-175, 250] HU is -153.75 HU: body against air, a large region with a
    # sharp edge, so what remains of the mismatch is the grid round trip itself.
    out = _run(ThresholdInfer(spec, 0.05), image)
    src = nib.load(image)
    _assert_same_grid(out, src)
    expected = np.asarray(src.dataobj, dtype=np.float32) > -153.75
    pred = np.asarray(out.dataobj) == 1
    assert dice(pred, expected) > 0.97
    centroid_mm = lambda m: nib.affines.apply_affine(src.affine, np.array(np.nonzero(m)).mean(axis=1))  # noqa: E731
    np.testing.assert_array_less(np.abs(centroid_mm(pred) - centroid_mm(expected)), 1.0)
