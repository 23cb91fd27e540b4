"""Real Orthanc and real ``monailabel start_server`` processes for the PACS and browser tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appcore.dicom.client import DicomWebClient
from appcore.dicom.pacs import DICOMWEB_PLUGIN, Orthanc, hippocampus_series, load, real_series
from tests.conftest import ROOT, SHARED

requires_orthanc = pytest.mark.skipif(
    shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists(),
    reason="Orthanc with its DICOMweb plugin is not installed (make test installs orthanc, orthanc-dicomweb)",
)
requires_dicom_data = pytest.mark.skipif(
    not (SHARED / "dicom" / "ct_abdomen").is_dir(), reason=f"real DICOM series under {SHARED / 'dicom'} are absent"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@dataclass(frozen=True)
class Server:
    http: httpx.Client
    url: str
    log: Path
    process: subprocess.Popen


@contextmanager
def monailabel_server(root: Path, studies: str, conf: dict[str, str], timeout: float = 180) -> Iterator[Server]:
    """``monailabel start_server`` on a copy of the radiology app, on a free port, stopped on exit."""
    app_dir = root / "app"
    shutil.copytree(ROOT / "apps" / "radiology", app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    port = free_port()
    launcher = Path(sys.executable).parent / "monailabel"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(app_dir), "--studies", studies, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {
        **os.environ,
        "MONAILABEL_PYEXE": sys.executable,
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "dicom_cache"),
    }
    log_path = root / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=180)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if http.get("/info/").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not answer /info within {timeout} s"
            time.sleep(0.5)
        yield Server(http, url, log_path, proc)
    finally:
        http.close()
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
