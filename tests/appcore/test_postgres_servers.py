"""Two real servers sharing one PostgreSQL database (``--conf database_url``): one project, two doors.

They serve one studies folder and one app folder (its model folder keeps the label versions'
files); the database keeps everything that must be decided in one place: which case is handed to
whom, and every label version.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import HIPPO, requires_shared
from tests.postgres import new_database, postgres_server, requires_postgres
from tests.servers import Server, monailabel_server

IMAGES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006")


def _label(image: str, value: int) -> dict:
    ref = nib.load(HIPPO / "imagesTr" / f"{image}.nii.gz")
    data = np.zeros(ref.shape, np.uint8)
    data[4:8, 4:8, 4:8] = value
    content = nib.Nifti1Image(data, ref.affine).to_bytes()
    return {"label": ("label.nii", io.BytesIO(content), "application/octet-stream")}


def _values(content: bytes) -> set[int]:
    raw = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return set(np.unique(np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)).tolist())


def _versions(server: Server, image: str) -> list[tuple[int, str | None]]:
    r = server.http.get("/datastore/label/versions", params={"image": image, "tag": "final"})
    assert r.status_code == 200, r.text
    return [(v["version"], v["client"]) for v in r.json()["versions"]]


@pytest.mark.slow
@requires_shared
@requires_postgres
def test_two_servers_on_one_postgresql_never_hand_out_one_case_and_see_each_other_s_versions(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    for image in IMAGES:
        shutil.copyfile(HIPPO / "imagesTr" / f"{image}.nii.gz", studies / f"{image}.nii.gz")
    with postgres_server() as pg:
        conf = {
            "models": "hippocampus",
            "score_on_start": "false",
            "score_new_images": "false",
            "database_url": new_database(pg),
        }
        app_dir = tmp_path / "app"
        with (
            monailabel_server(tmp_path / "a", str(studies), conf, app_dir=app_dir) as a,
            monailabel_server(tmp_path / "b", str(studies), conf, app_dir=app_dir) as b,
        ):

            def ask(job: tuple[Server, str]) -> str:
                server, client = job
                r = server.http.post("/activelearning/random", json={"client_id": client})
                assert r.status_code == 200, r.text
                return r.json()["id"]

            with ThreadPoolExecutor(4) as pool:
                handed = list(pool.map(ask, [(a, "c1"), (b, "c2"), (a, "c3"), (b, "c4")]))
            assert sorted(handed) == sorted(IMAGES), f"one case handed out twice: {handed}"

            image = IMAGES[0]
            for server, value, client in ((a, 1, "viewer-a"), (b, 2, "viewer-b")):
                r = server.http.put(
                    "/datastore/label",
                    params={"image": image, "tag": "final"},
                    data={"params": json.dumps({"client_id": client})},
                    files=_label(image, value),
                )
                assert r.status_code == 200, r.text
            assert _versions(a, image) == _versions(b, image) == [(1, "viewer-a"), (2, "viewer-b")]
            for server in (a, b):
                old = server.http.get("/datastore/label", params={"label": image, "tag": "final", "version": 1})
                assert old.status_code == 200 and _values(old.content) == {0, 1}, old.text
            audit = b.http.get("/audit/", params={"limit": 50}).json()["entries"]
            assert sum(e["path"] == "/datastore/label" and e["status"] == 200 for e in audit) == 2, "one audit log"
    assert not (app_dir / "model" / "project.db").exists(), "nothing was kept in a SQLite file beside"
