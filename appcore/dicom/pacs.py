"""Start a local Orthanc with DICOMweb (storage in a folder we choose) and load the real series into it.

``python -m appcore.dicom.pacs --storage pacs/storage --shared ../shared/data`` is what ``make pacs``
runs: Orthanc on 127.0.0.1:8042 (DICOMweb at ``/dicom-web``, no authentication, loopback only),
loaded with ``ct_abdomen`` (empty UIDs filled in deterministically), ``ct_head_ge`` (kept as it is:
the server refuses it with a message, it is not distorted) and a few hippocampus cases written as
MR series. Loading is idempotent: the UIDs are stable, so loading twice stores nothing new.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import nibabel as nib
import requests
from pydicom.dataset import Dataset

from appcore.dicom.client import DicomWebClient
from appcore.dicom.prepare import fill_missing_uids, nifti_to_series, read_series_folder

logger = logging.getLogger(__name__)

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
REAL_SERIES = ("ct_abdomen", "ct_head_ge")
HIPPOCAMPUS_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")


def orthanc_config(storage: Path, http_port: int) -> dict:
    """Orthanc settings: HTTP on ``http_port`` for loopback clients only, DICOMweb on, no DICOM port."""
    return {
        "Name": f"active-label-server PACS ({http_port})",
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # answers 127.0.0.1 only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "HttpCompressionEnabled": False,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
    }


@dataclass
class Orthanc:
    """An Orthanc child process; a context manager that starts it and stops it.

    Args:
        storage: folder for its database and configuration (created).
        http_port: its HTTP port on 127.0.0.1.
        executable: the Orthanc binary.
    """

    storage: Path
    http_port: int = 8042
    executable: str = "Orthanc"
    _process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> Orthanc:
        binary = shutil.which(self.executable)
        if binary is None or not DICOMWEB_PLUGIN.exists():
            raise FileNotFoundError(
                f"Orthanc ({self.executable}) or its DICOMweb plugin ({DICOMWEB_PLUGIN}) is not installed; "
                "run `apt-get install orthanc orthanc-dicomweb` (make test does it)"
            )
        self.storage.mkdir(parents=True, exist_ok=True)
        config = self.storage / "orthanc.json"
        config.write_text(json.dumps(orthanc_config(self.storage.resolve(), self.http_port), indent=2))
        log = (self.storage / "orthanc.log").open("ab")
        self._process = subprocess.Popen(
            [binary, str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._process.returncode} at start; see {self.storage / 'orthanc.log'}"
                )
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it keeps accepting connections and answers none, as a hung PACS."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def real_series(shared: Path) -> dict[str, list[Dataset]]:
    """The real CT series of ``shared/dicom``, UIDs filled in where the published files left them empty."""
    return {name: fill_missing_uids(read_series_folder(shared / "dicom" / name), name) for name in REAL_SERIES}


def hippocampus_series(shared: Path, cases: Iterable[str] = HIPPOCAMPUS_CASES) -> dict[str, list[Dataset]]:
    """Hippocampus MR crops written as MR series (exact geometry, see ``nifti_to_series``)."""
    folder = shared / "hippocampus_mr" / "imagesTr"
    return {
        case: nifti_to_series(nib.load(folder / f"{case}.nii.gz"), name=case, modality="MR", description=case)
        for case in cases
    }


def load(client: DicomWebClient, series: dict[str, list[Dataset]]) -> dict[str, str]:
    """STOW every series; returns ``{name: SeriesInstanceUID}``."""
    uids = {}
    for name, datasets in series.items():
        client.store(datasets)
        uids[name] = str(datasets[0].SeriesInstanceUID)
        logger.info("Loaded %s: %d instances, series %s", name, len(datasets), uids[name])
    return uids


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, default=Path("pacs/storage"))
    parser.add_argument("--port", type=int, default=8042)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--no-load", action="store_true", help="start Orthanc without loading the real series")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Orthanc runs in its own session; stop it on SIGTERM as on Ctrl-C, never leave it orphaned.
    signal.signal(signal.SIGTERM, _exit_on_signal)

    with Orthanc(args.storage, args.port) as orthanc:
        if not args.no_load:
            if not (args.shared / "dicom").is_dir():
                raise SystemExit(f"{args.shared / 'dicom'} is absent; pass --shared DIR or --no-load")
            client = DicomWebClient(orthanc.dicomweb_url)
            load(client, {**real_series(args.shared), **hippocampus_series(args.shared)})
        logger.info("Orthanc is serving DICOMweb at %s (Ctrl-C stops it)", orthanc.dicomweb_url)
        try:
            while orthanc._process is not None and orthanc._process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
