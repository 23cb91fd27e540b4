"""The DICOMweb datastore keeps a fetched series' instance headers in memory: a proposal and a save
each need them, and reading a CT's 300 header files each time cost a save tenths of a second."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from appcore.dicom import datastore as dicom_datastore
from appcore.dicom.datastore import DicomWebDatastore
from appcore.dicom.prepare import nifti_to_series


class FakePacs:
    """One MR series, as a DICOMweb client answers it; counts its retrieves."""

    def __init__(self) -> None:
        data = np.arange(12 * 10 * 6, dtype=np.float32).reshape(12, 10, 6) % 97
        self.series = nifti_to_series(nib.Nifti1Image(data, np.eye(4)), name="phantom", modality="MR")
        self.uid = str(self.series[0].SeriesInstanceUID)
        self.url = "http://pacs.invalid/dicom-web"
        self.retrieved = 0

    def search_series(self, filters: dict[str, Any] | None = None) -> list[Dataset]:
        if (filters or {}).get("Modality") != "MR":
            return []
        found = Dataset()
        found.SeriesInstanceUID, found.StudyInstanceUID = self.uid, self.series[0].StudyInstanceUID
        found.Modality = "MR"
        return [found]

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        self.retrieved += 1
        return [copy.deepcopy(ds) for ds in self.series]


@pytest.fixture
def store(tmp_path: Path) -> tuple[DicomWebDatastore, FakePacs]:
    pacs = FakePacs()
    ds = DicomWebDatastore(
        pacs,  # type: ignore[arg-type]
        tmp_path / "cache",
        modalities=("MR",),
        allowed_values=lambda info: {0, 1, 2},
        labels_for=lambda info, modality: ("m", None),  # type: ignore[arg-type,return-value]
    )
    return ds, pacs


def test_series_headers_are_read_once_and_again_after_a_fetch(
    store: tuple[DicomWebDatastore, FakePacs], monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, pacs = store
    reads: list[str] = []
    real = pydicom.dcmread
    monkeypatch.setattr(dicom_datastore.pydicom, "dcmread", lambda path, **kw: reads.append(path) or real(path, **kw))
    first = ds.source_headers(pacs.uid)
    assert [str(h.SOPInstanceUID) for h in first] == [str(h.SOPInstanceUID) for h in ds.source_headers(pacs.uid)]
    assert len(reads) == len(first) == 6 and pacs.retrieved == 1, "read from the folder once, fetched once"
    assert "PixelData" not in first[0]
    first.clear()  # a caller's list is its own
    assert len(ds.source_headers(pacs.uid)) == 6
    Path(ds.get_image_uri(pacs.uid)).unlink()  # the cached volume gone: fetched again, headers rewritten
    assert len(ds.source_headers(pacs.uid)) == 6
    assert pacs.retrieved == 2 and len(reads) == 12, "the headers are read again after the fetch"
