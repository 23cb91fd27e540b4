"""Make real data PACS-ready: fill empty UIDs deterministically, and write a NIfTI volume as an MR series."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from appcore.dicom.series import SeriesVolume, load_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}


def stable_uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` (``2.25.<hash>``): loading twice gives the same UIDs.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the sources and is random.)
    """
    digest = hashlib.sha256("\x00".join(["active-label-server", *parts]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def fill_missing_uids(datasets: Sequence[Dataset], name: str) -> list[Dataset]:
    """Fill empty Study/Series/SOP Instance UIDs and SOP Class UID, the same for the whole series.

    ``name`` (the series' folder name) seeds the UIDs; instances are keyed by InstanceNumber, or by
    their position in ``datasets`` where that is missing. UIDs already present are kept.
    """
    out = []
    study_uid, series_uid = stable_uid(name, "study"), stable_uid(name, "series")
    for index, ds in enumerate(datasets):
        ds = copy.deepcopy(ds)
        key = str(ds.get("InstanceNumber") or f"#{index}")
        if not ds.get("StudyInstanceUID"):
            ds.StudyInstanceUID = study_uid
        if not ds.get("SeriesInstanceUID"):
            ds.SeriesInstanceUID = series_uid
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = stable_uid(name, "instance", key)
        if not ds.get("SOPClassUID"):
            modality = str(ds.get("Modality", ""))
            if modality not in _SOP_CLASS:
                raise ValueError(
                    f"{name}: SOPClassUID is empty and modality {modality!r} is not one of {list(_SOP_CLASS)}"
                )
            ds.SOPClassUID = _SOP_CLASS[modality]
        if not ds.get("FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = stable_uid(name, "frame-of-reference")
        if not ds.get("PatientID"):
            ds.PatientID = name
        if not ds.get("PatientName"):
            ds.PatientName = f"{name}^"
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def read_series_folder(folder: Path) -> list[Dataset]:
    """Every DICOM file of ``folder`` (files that are not DICOM, such as a LICENSE, are skipped)."""
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            datasets.append(pydicom.dcmread(path))
        except pydicom.errors.InvalidDicomError:
            continue
    return datasets


def load_series_folder(
    folder: str | Path, check: Callable[[tuple[int, int, int], np.ndarray], None] | None = None
) -> SeriesVolume:
    """The one series a folder of DICOM files holds (a MONAI Label session of a series' files).

    Raises ``ValueError`` unless the files hold exactly one series, ``SeriesRefused`` (a
    ``ValueError`` too) for one that is not a regular grid; ``check`` (``load_series``) may refuse
    its grid before any pixel data is decoded.
    """
    datasets = read_series_folder(Path(folder))
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(uids) != 1:
        raise ValueError(f"The files hold {len(uids)} DICOM series; send the files of one series")
    return load_series(datasets, uids[0], check)


def nifti_to_series(
    image: nib.Nifti1Image, *, name: str, modality: str = "MR", description: str | None = None
) -> list[Dataset]:
    """One single-frame instance per slice of ``image`` along its third axis, with exact geometry.

    Values are rounded to integers and stored as signed 16-bit with a rescale slope chosen so that
    the range fits, which keeps float MR intensities to within 0.01% of their range.
    """
    if len(image.shape) != 3:
        raise ValueError(f"{name}: need a 3D volume, got shape {image.shape}")
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine  # to LPS
    axes = affine[:3, :3]
    col_spacing, row_spacing = np.linalg.norm(axes[:, 0]), np.linalg.norm(axes[:, 1])
    row_dir, col_dir = axes[:, 0] / col_spacing, axes[:, 1] / row_spacing
    normal = np.cross(row_dir, col_dir)
    step = axes[:, 2]
    if (
        abs(abs(np.dot(step, normal)) - np.linalg.norm(step)) > 1e-4 * np.linalg.norm(step)
        or abs(np.dot(row_dir, col_dir)) > 1e-4
    ):
        raise ValueError(f"{name}: the affine is sheared; a DICOM series cannot represent it")

    data = np.asarray(image.dataobj, dtype=np.float64)
    low, high = float(data.min()), float(data.max())
    slope = max(abs(low), abs(high)) / 32000.0 if max(abs(low), abs(high)) > 32000 else 1.0
    if not np.allclose(data, np.rint(data)):
        slope = max(abs(low), abs(high), 1e-6) / 32000.0
    stored = np.rint(data / slope).astype(np.int16)

    study_uid, series_uid = stable_uid(name, "study"), stable_uid(name, "series")
    frame_uid = stable_uid(name, "frame-of-reference")
    out = []
    for k in range(image.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
        ds.SOPInstanceUID = stable_uid(name, "instance", str(k))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = _SOP_CLASS[modality]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName = name, f"{name}^"
        ds.StudyID, ds.AccessionNumber = "1", ""
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20000101", "000000", ""
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.Modality, ds.Manufacturer = modality, "active-label-server (converted from NIfTI)"
        ds.SeriesDescription = description or name
        ds.StudyDescription = description or name
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [float(v) for v in affine[:3, :3] @ [0, 0, k] + affine[:3, 3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(row_spacing), float(col_spacing)]
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        pixels = np.ascontiguousarray(stored[:, :, k].T)  # (rows, columns)
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", "0", "US"
        ds.PixelData = pixels.tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        out.append(ds)
    return out
