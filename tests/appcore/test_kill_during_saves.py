"""``kill -9`` of a real server while clients save labels: restarted on the same folder, nothing is lost.

Several clients save labels of the same and of different cases into a ``monailabel start_server``
process while the test kills its process group with SIGKILL, at a different moment in each round.
After each restart on the same folder: every version ``/datastore/label/versions`` lists is served
and is the file its record describes, every save that was answered 200 is among them, the current
label is the newest version, the project database and MONAI Label's records are intact, and new
saves work.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.conftest import HIPPO, requires_shared
from tests.servers import Server, monailabel_server

IMAGES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")
# Who saves what: two clients on the first case (the same label at once), one on each other case.
SAVERS = (IMAGES[0], IMAGES[0], IMAGES[1], IMAGES[2])
CONF = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
# Saves answered before the kill, and the pause after them, per round: the kill lands at a
# different point of a save each time (the whole loop of a save is tens of milliseconds).
ROUNDS = ((3, 0.0), (5, 0.05), (8, 0.13))


def _voxels(content: bytes) -> bytes:
    """A digest of a NIfTI file's voxels (the server stores a label with the image's header)."""
    raw = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return hashlib.sha256(np.ascontiguousarray(np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)).tobytes()).digest()


def _label(image: str, seed: int) -> tuple[bytes, bytes]:
    """A valid label of ``image`` unlike any other save (its seed drawn into a block of voxels), and
    the digest of its voxels."""
    ref = nib.load(HIPPO / "imagesTr" / f"{image}.nii.gz")
    rng = np.random.default_rng(seed)
    data = np.zeros(ref.shape, np.uint8)
    data[2:10, 2:10, 2:10] = rng.integers(0, 3, (8, 8, 8), dtype=np.uint8)
    content = nib.Nifti1Image(data, ref.affine).to_bytes()
    return content, hashlib.sha256(data.tobytes()).digest()


class Savers:
    """Threads saving labels until the server is gone; ``acked`` holds the voxels of each save answered 200."""

    def __init__(self, url: str, first_seed: int) -> None:
        self.url = url
        self.acked: dict[str, set[bytes]] = {image: set() for image in IMAGES}
        self.answered = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._seed = first_seed
        self._threads = [threading.Thread(target=self._run, args=(image,), daemon=True) for image in SAVERS]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a saver still runs two minutes after the kill"

    def _next_seed(self) -> int:
        with self._lock:
            self._seed += 1
            return self._seed

    def _run(self, image: str) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while True:
                content, digest = _label(image, self._next_seed())
                try:
                    r = http.put(
                        "/datastore/label",
                        params={"image": image, "tag": "final"},
                        data={"params": json.dumps({"client_id": f"saver-{threading.get_ident()}"})},
                        files={"label": ("label.nii", io.BytesIO(content), "application/octet-stream")},
                    )
                except httpx.TransportError:  # the server was killed
                    return
                with self._lock:
                    if r.status_code == 200:
                        self.acked[image].add(digest)
                        self.answered += 1
                    else:
                        self.errors.append(f"{image}: {r.status_code} {r.text[:300]}")


def _check_consistent(server: Server, app_dir: Path, studies: Path, acked: dict[str, set[bytes]]) -> None:
    http = server.http
    model = app_dir / "model"
    rows: list[tuple] = []
    if (model / "project.db").exists():  # made at the first save
        with contextlib.closing(sqlite3.connect(f"file:{model / 'project.db'}?mode=ro", uri=True)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = db.execute("SELECT image, tag, version, file, sha256 FROM label_versions").fetchall()
    assert len(rows) >= sum(map(len, acked.values()))
    for _, _, _, file, sha in rows:  # every record's file is there, as recorded
        path = model / "label_history" / file
        assert path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha, file
    records = json.loads((studies / "datastore_v2.json").read_text())  # MONAI Label's, whole
    assert set(IMAGES) <= set(records["objects"])
    for image in IMAGES:
        listing = http.get("/datastore/label/versions", params={"image": image, "tag": "final"})
        if listing.status_code == 404 and not acked[image]:  # never saved
            continue
        assert listing.status_code == 200, listing.text
        versions = listing.json()["versions"]
        numbers = [v["version"] for v in versions]
        assert numbers == list(range(1, len(numbers) + 1)), f"{image}: versions {numbers}"
        served: list[bytes] = []
        for v in versions:
            r = http.get("/datastore/label", params={"label": image, "tag": "final", "version": v["version"]})
            assert r.status_code == 200, r.text
            assert hashlib.sha256(r.content).hexdigest() == v["sha256"], f"{image} v{v['version']}"
            served.append(_voxels(r.content))
        lost = acked[image] - set(served)
        assert not lost, f"{image}: {len(lost)} saves answered 200 are no version of {numbers}"
        current = http.get("/datastore/label", params={"label": image, "tag": "final"})
        if acked[image] or versions:
            assert current.status_code == 200, current.text
            assert _voxels(current.content) == served[-1], f"{image}: the current label is not its newest version"
    for path in (studies / "labels" / "final").glob("*.nii.gz"):  # every label file MONAI Label may serve
        assert nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes())).shape, path
    leftovers = [p.name for p in (studies / "labels" / "final").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"staged files of killed saves left among the labels: {leftovers}"


@pytest.mark.slow
@requires_shared
def test_kill_9_during_saves_loses_no_answered_save_and_serves_every_listed_version(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    for image in IMAGES:
        shutil.copyfile(HIPPO / "imagesTr" / f"{image}.nii.gz", studies / f"{image}.nii.gz")
    acked: dict[str, set[bytes]] = {image: set() for image in IMAGES}
    for n, (saves, pause) in enumerate(ROUNDS):
        with monailabel_server(tmp_path, str(studies), CONF) as server:
            _check_consistent(server, tmp_path / "app", studies, acked)
            savers = Savers(server.url, first_seed=1000 * n)
            savers.start()
            deadline = time.monotonic() + 300
            while savers.answered < saves:
                assert time.monotonic() < deadline, f"only {savers.answered} saves answered in 300 s: {savers.errors}"
                time.sleep(0.01)
            time.sleep(pause)
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=60)
            savers.join()
            assert not savers.errors, savers.errors
            for image in IMAGES:
                acked[image] |= savers.acked[image]
    with monailabel_server(tmp_path, str(studies), CONF) as server:
        _check_consistent(server, tmp_path / "app", studies, acked)
        content, digest = _label(IMAGES[0], 99)
        before = server.http.get("/datastore/label/versions", params={"image": IMAGES[0], "tag": "final"}).json()
        r = server.http.put(
            "/datastore/label",
            params={"image": IMAGES[0], "tag": "final"},
            files={"label": ("label.nii", io.BytesIO(content), "application/octet-stream")},
        )
        assert r.status_code == 200, r.text
        after = server.http.get("/datastore/label/versions", params={"image": IMAGES[0], "tag": "final"}).json()
        assert len(after["versions"]) == len(before["versions"]) + 1
        got = server.http.get("/datastore/label", params={"label": IMAGES[0], "tag": "final"})
        assert _voxels(got.content) == digest
