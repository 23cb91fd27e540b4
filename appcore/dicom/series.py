"""A DICOM series as a volume on a regular grid, or a refusal that names the series and says why."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

# DICOM patient coordinates are LPS; NIfTI world coordinates are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Two directions closer than this are taken as the same (degrees); slice gaps that differ by less
# than this share of their median are taken as equal. Both are far below any real tilt or gap.
ANGLE_TOLERANCE_DEG = 0.5
GAP_TOLERANCE = 0.01


class SeriesRefused(ValueError):
    """A series that cannot be one regular volume without distorting it; the message names the series."""

    def __init__(self, series_uid: str, reasons: Sequence[str]) -> None:
        self.series_uid = series_uid
        self.reasons = tuple(reasons)
        super().__init__(
            f"Series {series_uid} cannot be loaded as a regular 3D volume: {'; '.join(reasons)}. "
            "Resample it to a regular grid (for example with dcm2niix) and store that series instead."
        )


@dataclass(frozen=True)
class SeriesVolume:
    """A decoded series.

    Args:
        series_uid: its SeriesInstanceUID.
        data: voxel values in modality units (rescale slope and intercept applied), indexed
            ``[column, row, slice]`` like a NIfTI made from the series.
        affine: voxel index to RAS world millimetres.
        sop_instance_uids: the instance of each slice, in slice order.
        modality: the series' Modality.
    """

    series_uid: str
    data: np.ndarray
    affine: np.ndarray
    sop_instance_uids: tuple[str, ...]
    modality: str

    def to_nifti(self) -> nib.Nifti1Image:
        img = nib.Nifti1Image(self.data, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img


@dataclass(frozen=True)
class SeriesGeometry:
    """Slice order and voxel-to-world affine (RAS) of a series that passed the checks."""

    order: tuple[int, ...]
    affine: np.ndarray


def _floats(ds: Dataset, keyword: str, n: int, series_uid: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise SeriesRefused(series_uid, [f"instance {ds.get('SOPInstanceUID', '?')} has no valid {keyword}"])
    return np.array([float(v) for v in value])


def series_geometry(datasets: Sequence[Dataset], series_uid: str) -> SeriesGeometry:
    """Check that the instances form one regular grid and return its slice order and affine.

    Refuses (``SeriesRefused``) an empty series, multi-frame instances, mixed matrix size, pixel
    spacing or orientation, duplicate slice positions, slices displaced off their normal (gantry
    tilt) and uneven slice gaps (missing slices or variable spacing).
    """
    if not datasets:
        raise SeriesRefused(series_uid, ["it has no instances"])
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise SeriesRefused(series_uid, ["it has multi-frame instances; only one slice per instance is supported"])

    iops = np.array([_floats(ds, "ImageOrientationPatient", 6, series_uid) for ds in datasets])
    ipps = np.array([_floats(ds, "ImagePositionPatient", 3, series_uid) for ds in datasets])
    spacings = np.array([_floats(ds, "PixelSpacing", 2, series_uid) for ds in datasets])
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}

    reasons = []
    if len(shapes) > 1:
        reasons.append(f"mixed image sizes {sorted(shapes)}")
    if np.abs(iops - iops[0]).max() > 1e-3:
        reasons.append("mixed image orientations")
    if np.abs(spacings - spacings[0]).max() > 1e-3 * spacings[0].max():
        reasons.append(f"mixed pixel spacings {sorted({tuple(s) for s in spacings.round(4).tolist()})}")
    if reasons:
        raise SeriesRefused(series_uid, reasons)

    row_dir, col_dir = iops[0][:3], iops[0][3:]
    normal = np.cross(row_dir, col_dir)
    order = np.argsort(ipps @ normal, kind="stable")
    positions = ipps[order]
    along = positions @ normal

    n = len(datasets)
    if n > 1:
        steps = np.diff(positions, axis=0)
        gaps = np.diff(along)
        if gaps.min() <= 1e-4:
            reasons.append(f"{int(np.sum(gaps <= 1e-4))} slice position(s) occur twice")
        else:
            cosines = np.clip((steps @ normal) / np.linalg.norm(steps, axis=1), -1.0, 1.0)
            tilt = float(np.degrees(np.arccos(cosines)).max())
            if tilt > ANGLE_TOLERANCE_DEG:
                reasons.append(f"slices are displaced {tilt:.1f} degrees off their normal (gantry tilt)")
            median = float(np.median(gaps))
            if gaps.max() - gaps.min() > GAP_TOLERANCE * median:
                multiples = gaps / gaps.min()
                if np.allclose(multiples, np.rint(multiples), atol=0.05):
                    missing = int(np.rint(multiples).sum() - len(gaps))
                    reasons.append(f"{missing} slice(s) missing (gaps of {_mm(gaps)} mm along the normal)")
                else:
                    reasons.append(f"uneven slice spacing ({_mm(gaps)} mm along the normal)")
        if reasons:
            raise SeriesRefused(series_uid, reasons)
        slice_step = (positions[-1] - positions[0]) / (n - 1)
    else:
        thickness = float(datasets[0].get("SpacingBetweenSlices") or datasets[0].get("SliceThickness") or 1.0)
        slice_step = normal * thickness

    row_spacing, col_spacing = spacings[0]  # PixelSpacing is (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # column index runs along the row direction
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    return SeriesGeometry(order=tuple(int(i) for i in order), affine=LPS_TO_RAS @ lps)


def _mm(gaps: np.ndarray) -> str:
    values = sorted({round(float(g), 2) for g in gaps})
    return ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")


def load_series(
    datasets: Sequence[Dataset],
    series_uid: str,
    check: Callable[[tuple[int, int, int], np.ndarray], None] | None = None,
) -> SeriesVolume:
    """Decode a checked series (any transfer syntax pydicom's handlers read) into a ``SeriesVolume``.

    ``check`` is given the volume's shape and voxel-to-world affine (RAS) before any pixel data is
    decoded, and may refuse it by raising.
    """
    geometry = series_geometry(datasets, series_uid)
    if check is not None:
        first = datasets[geometry.order[0]]
        check((int(first.Columns), int(first.Rows), len(geometry.order)), geometry.affine)
    slices = []
    for i in geometry.order:
        ds = datasets[i]
        pixels = ds.pixel_array.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels * slope + intercept)
    data = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, slices) -> (cols, rows, slices)
    if np.all(data == np.rint(data)) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    return SeriesVolume(
        series_uid=series_uid,
        data=data,
        affine=geometry.affine,
        sop_instance_uids=tuple(str(datasets[i].SOPInstanceUID) for i in geometry.order),
        modality=str(datasets[0].get("Modality", "")),
    )
