"""Real Orthanc and real ``monailabel start_server`` processes for the PACS and browser tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from appcore.dicom.client import DicomWebClient
from appcore.dicom.pacs import DICOMWEB_PLUGIN, Orthanc, hippocampus_series, load, real_series
from tests.conftest import SHARED
from tests.servers import Server, free_port
from tests.servers import monailabel_server as run_server

requires_orthanc = pytest.mark.skipif(
    shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists(),
    reason="Orthanc with its DICOMweb plugin is not installed (make test installs orthanc, orthanc-dicomweb)",
)
requires_dicom_data = pytest.mark.skipif(
    not (SHARED / "dicom" / "ct_abdomen").is_dir(), reason=f"real DICOM series under {SHARED / 'dicom'} are absent"
)


@dataclass(frozen=True)
class LoadedPacs:
    orthanc: Orthanc
    series: dict[str, str]  # name -> SeriesInstanceUID

    @property
    def client(self) -> DicomWebClient:
        return DicomWebClient(self.orthanc.dicomweb_url)


@contextmanager
def loaded_orthanc(storage: Path, hippocampus_cases: tuple[str, ...]) -> Iterator[LoadedPacs]:
    """Orthanc on a free port with the real CT series and the given hippocampus cases as MR series."""
    with Orthanc(storage, free_port()) as orthanc:
        client = DicomWebClient(orthanc.dicomweb_url)
        series = load(client, {**real_series(SHARED), **hippocampus_series(SHARED, hippocampus_cases)})
        yield LoadedPacs(orthanc, series)


@contextmanager
def monailabel_server(
    root: Path,
    studies: str,
    conf: dict[str, str],
    timeout: float = 180,
    *,
    env: dict[str, str] | None = None,
    probe: str = "/info/",
) -> Iterator[Server]:
    """The radiology app's server on ``studies``, with its DICOMweb cache inside ``root``; ``env``
    adds to its environment (authentication on: probe a public route, ``/auth/``)."""
    with run_server(
        root,
        studies,
        conf,
        env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "dicom_cache"), **(env or {})},
        timeout=timeout,
        http_timeout=180,
        probe=probe,
    ) as server:
        yield server
