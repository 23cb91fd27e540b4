"""What an image's voxel values say about its modality, where they leave no doubt.

A CT in Hounsfield units has air (about -1000 HU) or at least fat (about -100 HU) below 0; a
magnitude MR has nothing below 0. Training (which labels a CT model may learn from) and scoring
(which images a model ranks for annotators) use it for NIfTI files, whose headers do not say.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np

from radiology.spec import ModelSpec

# Below this, the image holds air in Hounsfield units: no magnitude MR goes below 0.
CT_AIR_BELOW = -500.0


def ruled_out_modality(image_path: str) -> str | None:
    """The modality (``"CT"`` or ``"MR"``) an image's voxel values rule out, else ``None``.

    Nothing below 0 rules out a CT in Hounsfield units; voxels below -500 rule out a magnitude MR.
    Anything between (an MR normalised to negative values, a CT cropped to soft tissue) rules out
    neither, and so does a file that cannot be read (its readers report that).
    """
    try:
        voxels = np.asanyarray(nib.load(image_path).dataobj)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return None
    return ruled_out_by_values(voxels)


def ruled_out_by_values(voxels: np.ndarray) -> str | None:
    """``ruled_out_modality`` for an image's voxels already read (NaNs aside; all NaN rules out nothing)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: nanmin is nan
        low = float(np.nanmin(voxels))
    if low >= 0.0:
        return "CT"
    if low < CT_AIR_BELOW:
        return "MR"
    return None


def wrong_modality(image: str | np.ndarray, spec: ModelSpec) -> str | None:
    """Why ``spec`` should not learn from or rank an image (its values rule out the model's
    modality), else ``None``; ``image`` is its path or its voxels already read."""
    ruled_out = ruled_out_modality(image) if isinstance(image, str) else ruled_out_by_values(image)
    if ruled_out != spec.modality:
        return None
    why = "nothing below 0" if spec.modality == "CT" else f"voxels below {CT_AIR_BELOW:g}"
    return f"the image is no {spec.modality} ({why}) and {spec.name} segments {spec.modality}"
