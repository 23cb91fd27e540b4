"""Label history, review, tombstones and the audit log through a real server's HTTP API, and review in training."""

from __future__ import annotations

import gzip
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from appcore import seam
from appcore.identity import User, current_user
from pathology.train import NucleiTrainer
from tests.apps import make_app
from tests.conftest import HIPPO, requires_shared
from tests.servers import Server, one_case_server

CASE = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
IMAGE = "hippocampus_001"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with one_case_server(tmp_path_factory.mktemp("history_server"), train_on="approved") as running:
        yield running


def _label_form(value: int) -> dict:
    image = nib.load(CASE)
    data = np.zeros(image.shape, np.uint8)
    data[10 : 10 + value, 10:12, 10:12] = value
    return {
        "label": ("label.nii", io.BytesIO(nib.Nifti1Image(data, image.affine).to_bytes()), "application/octet-stream")
    }


def _values(content: bytes) -> set[int]:
    image = nib.Nifti1Image.from_bytes(content if content[:2] != b"\x1f\x8b" else gzip.decompress(content))
    return set(np.unique(np.asarray(image.dataobj)).tolist())


def _save(http, value: int, **params: object):
    return http.put(
        "/datastore/label",
        params={"image": IMAGE, "tag": "final"},
        data={"params": json.dumps(params)},
        files=_label_form(value),
    )


@pytest.mark.slow
@requires_shared
def test_history_review_restore_and_audit_over_http(server: Server) -> None:
    http = server.http
    assert _save(http, 1, client_id="viewer-a").status_code == 200
    assert _save(http, 2, client_id="viewer-b", proposal={"model": "hippocampus", "version": 0}).status_code == 200
    refused = _save(http, 1, proposal={"model": "hippocampus", "version": "latest"})
    assert refused.status_code == 422 and "its version is 'latest'" in refused.json()["detail"]

    listing = http.get("/datastore/label/versions", params={"image": IMAGE, "tag": "final"}).json()
    assert listing["current"] == 2
    assert [(v["version"], v["user"], v["client"], v["review"]["state"]) for v in listing["versions"]] == [
        (1, "anonymous", "viewer-a", "submitted"),
        (2, "anonymous", "viewer-b", "submitted"),
    ]
    assert listing["versions"][1]["proposal"] == {"model": "hippocampus", "version": 0}

    old = http.get("/datastore/label", params={"label": IMAGE, "tag": "final", "version": 1})
    assert old.status_code == 200 and _values(old.content) == {0, 1}
    current = http.get("/datastore/label", params={"label": IMAGE, "tag": "final"})  # MONAI Label's answer
    assert current.status_code == 200 and _values(current.content) == {0, 2}
    for version, status, match in ((0, 422, "numbered from 1"), (7, 404, r"versions kept: \[1, 2\]")):
        r = http.get("/datastore/label", params={"label": IMAGE, "tag": "final", "version": version})
        assert r.status_code == status and re.search(match, r.json()["detail"]), r.text

    # --conf train_on approved: nothing approved yet, so a training is refused before it starts.
    r = http.post("/train/hippocampus", json={"max_epochs": 1})
    assert r.status_code == 409 and "not approved (--conf train_on approved)" in r.json()["detail"], r.text
    review = {"image": IMAGE, "tag": "final", "version": 2}
    r = http.put("/datastore/label/review", params={**review, "state": "maybe"})
    assert r.status_code == 422 and "approved" in r.json()["detail"]
    r = http.put("/datastore/label/review", params={**review, "state": "approved", "comment": "good"})
    assert r.status_code == 200 and r.json()["review"] == {
        **r.json()["review"],
        "state": "approved",
        "reviewer": "anonymous",
        "comment": "good",
    }

    r = http.post("/datastore/label/restore", params={"image": IMAGE, "tag": "final", "version": 1})
    assert r.status_code == 200 and (r.json()["version"], r.json()["restored_from"]) == (3, 1), r.text
    current = http.get("/datastore/label", params={"label": IMAGE, "tag": "final"})
    assert _values(current.content) == {0, 1}

    assert http.delete("/datastore/label", params={"id": IMAGE, "tag": "final"}).status_code == 200
    assert http.get("/datastore/label", params={"label": IMAGE, "tag": "final"}).status_code == 404
    [tomb] = http.get("/datastore/tombstones", params={"image": IMAGE}).json()["tombstones"]
    assert (tomb["kind"], tomb["version"]) == ("label", 3)
    assert http.get("/datastore/label/versions", params={"image": IMAGE, "tag": "final"}).json()["current"] is None
    r = http.post("/datastore/restore", params={"image": IMAGE, "tag": "final"})
    assert r.status_code == 200 and r.json()["restored"]["version"] == 4, r.text
    assert _values(http.get("/datastore/label", params={"label": IMAGE, "tag": "final"}).content) == {0, 1}
    assert http.post("/datastore/restore", params={"image": IMAGE, "tag": "final"}).status_code == 404

    entries = http.get("/audit/", params={"limit": 20}).json()["entries"]
    seen = [(e["method"], e["path"], e["status"]) for e in reversed(entries)]
    assert seen == [
        ("PUT", "/datastore/label", 200),
        ("PUT", "/datastore/label", 200),
        ("PUT", "/datastore/label", 422),
        ("POST", "/train/hippocampus", 409),
        ("PUT", "/datastore/label/review", 422),
        ("PUT", "/datastore/label/review", 200),
        ("POST", "/datastore/label/restore", 200),
        ("DELETE", "/datastore/label", 200),
        ("POST", "/datastore/restore", 200),
        ("POST", "/datastore/restore", 404),
    ]
    assert {e["user"] for e in entries} == {"anonymous"}
    assert "version=2" in entries[-6]["query"] and "state=approved" in entries[-6]["query"]
    assert http.get("/audit/", params={"limit": 0}).status_code == 422


@pytest.mark.slow
@requires_shared
def test_train_on_approved_trains_only_approved_labels(tmp_path: Path) -> None:
    app = make_app(tmp_path, "hippocampus", labelled=2, conf={"train_on": "approved"})
    trainer = seam.trainers(app)["hippocampus"]
    reasons = {image: why for _, image, why in trainer.labels_with_reasons(app.datastore())}
    assert all("not approved" in why for why in reasons.values()) and len(reasons) == 2
    assert "not approved" in trainer.no_training_data(app.datastore())

    token = current_user.set(User("rita"))
    try:
        approved = app.datastore().history.review("hippocampus_001", "final", None, "approved")
    finally:
        current_user.reset(token)
    assert approved["review"]["reviewer"] == "rita"
    reasons = {image: why for _, image, why in trainer.labels_with_reasons(app.datastore())}
    assert reasons["hippocampus_001"] is None and "not approved" in reasons["hippocampus_003"]
    assert trainer.no_training_data(app.datastore()) is None


class _Store:
    """The datastore calls ``NucleiTrainer`` makes, over two labelled tiles."""

    def __init__(self, root: Path) -> None:
        self.paths = {i: str(root / f"{i}.png") for i in ("t1", "t2")}

    def datalist(self) -> list[dict[str, str]]:
        return [{"image": p, "label": p + ".label"} for p in self.paths.values()]

    def get_labeled_images(self) -> list[str]:
        return list(self.paths)

    def get_image_uri(self, image_id: str) -> str:
        return self.paths[image_id]


@pytest.mark.parametrize(
    ("gate", "kept", "refusal"),
    [
        (None, ["t1", "t2"], None),
        ({"t2": "rejected"}, ["t1"], None),
        ({"t1": "not approved", "t2": "not approved"}, [], "review leaves out all 2"),
    ],
)
def test_nuclei_training_leaves_out_what_review_does(tmp_path: Path, gate, kept, refusal) -> None:
    trainer = SimpleNamespace(review_gate=None if gate is None else gate.get)
    store = _Store(tmp_path)
    records = NucleiTrainer._reviewed(trainer, store.datalist(), store)  # type: ignore[arg-type]
    assert [Path(r["image"]).stem for r in records] == kept
    trainer._reviewed = lambda records, datastore: NucleiTrainer._reviewed(trainer, records, datastore)
    why = NucleiTrainer.no_training_data(trainer, store)  # type: ignore[arg-type]
    assert why is None if refusal is None else refusal in why


@pytest.mark.slow
@requires_shared
def test_a_training_process_trains_on_approved_labels_only(tmp_path: Path) -> None:
    # a server of its own: the module's server holds the review test's versions and audit entries
    with one_case_server(tmp_path, train_on="approved") as server:
        _train_on_approved_only(server)


def _train_on_approved_only(server: Server) -> None:
    http = server.http

    def save(image: str) -> None:
        case = f"{image}.nii.gz"
        if image != IMAGE:  # the server's own case is there already
            files = {"file": (case, (CASE.parent / case).read_bytes())}
            r = http.put("/datastore/image", params={"image": image}, files=files)
            assert r.status_code == 200, r.text
        r = http.put(
            "/datastore/label",
            params={"image": image, "tag": "final"},
            data={"params": json.dumps({"model": "hippocampus"})},
            files={"label": (case, (HIPPO / "labelsTr" / case).read_bytes())},
        )
        assert r.status_code == 200, r.text

    save(IMAGE)
    save("hippocampus_003")
    review = {"tag": "final", "state": "rejected", "comment": "posterior missing"}
    assert http.put("/datastore/label/review", params={"image": "hippocampus_003", **review}).status_code == 200
    r = http.post("/train/hippocampus", json={"max_epochs": 1})
    assert r.status_code == 409 and "rejected by anonymous: posterior missing" in r.json()["detail"], r.text

    r = http.put("/datastore/label/review", params={"image": IMAGE, "tag": "final", "state": "approved"})
    assert r.status_code == 200, r.text
    r = http.post("/train/hippocampus", json={"max_epochs": 1, "train_batch_size": 1})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 600  # a hang guard on a loaded machine, not a speed bound
    while (status := http.get("/train/").json()).get("status") not in ("DONE", "ERROR", "STOPPED"):
        assert time.monotonic() < deadline, "training did not finish in 600 s"
        time.sleep(1)
    assert status["status"] == "DONE", status
    last_run = http.get("/info/").json()["train_stats"]["hippocampus"]["last_run"]
    assert last_run["trained_on"] == 1, last_run
    assert "rejected by anonymous" in last_run["skipped"]["hippocampus_003"], last_run
