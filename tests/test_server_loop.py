"""The real ``monailabel start_server`` process on ten real hippocampus cases, driven over HTTP."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.conftest import HIPPO, SHARED, requires_shared
from tests.servers import monailabel_server

pytestmark = [requires_shared, pytest.mark.slow]

CASES = sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[:10]
UNLABELLED = CASES[-1].name.split(".")[0] if CASES else "no_shared_data"  # never labelled by these tests


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path, Path]]:
    root = tmp_path_factory.mktemp("loop")
    studies = root / "studies"
    studies.mkdir()
    for case in CASES:
        shutil.copyfile(case, studies / case.name)
    conf = {"models": "hippocampus", "reservation_s": "600", "max_epochs": "1"}
    with monailabel_server(root, str(studies), conf) as running:
        yield running.http, studies, root / "app"


def _wait_idle(client: httpx.Client, path: str, timeout: float = 300) -> dict:
    """Poll the latest background task until it has ended (a new task is SUBMITTED before RUNNING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(path).json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"{path} still running after {timeout} s")


def _label_bytes(case: Path) -> bytes:
    return (HIPPO / "labelsTr" / case.name).read_bytes()


def test_active_learning_loop_over_http(server: tuple[httpx.Client, Path, Path]) -> None:
    client, studies, app_dir = server
    info = client.get("/info/").json()
    assert "hippocampus" in info["models"] and {"random", "epistemic"} <= set(info["strategies"])

    # 1. infer on a real case: a label on the image's own grid
    image_id = CASES[0].name.split(".")[0]
    r = client.post(f"/infer/hippocampus?image={image_id}&output=image")
    assert r.status_code == 200, r.text
    pred_path = studies.parent / "pred.nii.gz"
    pred_path.write_bytes(r.content)
    pred, src = nib.load(pred_path), nib.load(CASES[0])
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)

    # 1b. the same through a session, as a viewer without datastore access sends it
    r = client.put("/session/", files={"files": (CASES[1].name, CASES[1].read_bytes())})
    assert r.status_code == 200, r.text
    r = client.post("/infer/hippocampus", params={"image": "", "session_id": r.json()["session_id"], "output": "image"})
    assert r.status_code == 200, r.text
    pred_path.write_bytes(r.content)
    assert nib.load(pred_path).shape == nib.load(CASES[1]).shape
    r = client.put("/session/", files={"files": ("bad.nii.gz", b"\x1f\x8bnot a volume")})
    r = client.post("/infer/hippocampus", params={"image": "", "session_id": r.json()["session_id"]})
    assert r.status_code == 422 and "not a readable NIfTI" in r.json()["detail"], r.text

    # 1c. nothing to train on or download before the first saved label: refused at once
    r = client.post("/train/hippocampus", json={})
    assert r.status_code == 409 and "No image has a 'final' label" in r.json()["detail"], r.text
    assert client.get("/datastore/dataset").status_code == 404

    # 2. save the true labels of three cases
    for case in CASES[:3]:
        r = client.put(
            "/datastore/label",
            params={"image": case.name.split(".")[0], "tag": "final"},
            files={"label": (case.name, _label_bytes(case))},
        )
        assert r.status_code == 200, r.text
    assert len(list((studies / "labels" / "final").glob("*.nii.gz"))) == 3

    # 3. train; the run publishes new served weights and rescoring follows
    served = app_dir / "model" / "hippocampus.pt"
    assert not served.exists()
    # as 3D Slicer's module sends it: every option /info lists, the first of a list of choices
    config = info["trainers"]["hippocampus"]["config"]
    slicer_params = {k: v[0] if isinstance(v, list) else v for k, v in config.items()}
    r = client.post("/train/hippocampus", json={**slicer_params, "max_epochs": 1, "train_batch_size": 2})
    assert r.status_code == 200, r.text
    status = _wait_idle(client, "/train/")
    assert status["status"] == "DONE", status
    assert served.exists()

    # 4. the next infer serves the new weights without a restart
    r = client.post("/infer/hippocampus", params={"image": CASES[4].name.split(".")[0], "output": "json"})
    assert r.status_code == 200 and r.json()["model_trained"] is True

    # 5. scores exist for the unlabelled images, computed under the new weights
    scores = json.loads((app_dir / "model" / "scores_hippocampus.json").read_text())
    unlabelled = {c.name.split(".")[0] for c in CASES[3:]}
    assert unlabelled <= set(scores)
    version = {s["model_version"] for k, s in scores.items() if k in unlabelled}
    assert len(version) == 1 and version.pop().startswith("hippocampus.pt:")

    # 5b. batch infer (on the CPU here: MONAI Label's default spread over CUDA devices is skipped)
    r = client.post("/batch/infer/hippocampus", params={"images": "unlabeled"}, json={"max_batch_size": 2})
    assert r.status_code == 200, r.text
    status = _wait_idle(client, "/batch/infer")
    assert status["status"] == "DONE", status
    batch = sorted((studies / "labels" / "original").glob("*.nii.gz"))
    assert len(batch) == 2
    for path in batch:
        assert nib.load(path).shape == nib.load(studies / path.name).shape

    # 6. next sample: never a labelled image, never the same image to two clients
    def ask(client_id: str) -> dict:
        return client.post("/activelearning/epistemic", json={"client_id": client_id}).json()

    with ThreadPoolExecutor(4) as pool:
        picks = list(pool.map(ask, ["a", "b", "c", "d"]))
    ids = [p["id"] for p in picks]
    assert len(set(ids)) == 4 and set(ids) <= unlabelled
    batch = client.post("/activelearning/random", json={"client_id": "e", "k": 3}).json()
    assert len(batch["ids"]) == 3 and not set(batch["ids"]) & set(ids)


def test_a_labelled_image_is_not_replaced_by_one_on_another_grid(server) -> None:
    client, studies, _ = server
    labelled = CASES[0].name.split(".")[0]  # labelled by the loop test
    upload = {"file": (CASES[1].name, CASES[1].read_bytes())}
    r = client.put("/datastore/image", params={"image": labelled}, files=upload)
    assert r.status_code == 409 and "has labels (final)" in r.json()["detail"], r.text
    assert (studies / CASES[0].name).read_bytes() == CASES[0].read_bytes()


@pytest.mark.skipif(not (SHARED / "dicom" / "ct_abdomen").is_dir(), reason="real DICOM series under ../shared absent")
def test_a_session_of_dicom_files_is_checked_and_segmented_on_its_grid(server, tmp_path: Path) -> None:
    client, _, _ = server

    def session_infer(series: str) -> httpx.Response:
        files = [("files", (p.name, p.read_bytes())) for p in sorted((SHARED / "dicom" / series).glob("*.dcm"))]
        r = client.put("/session/", files=files)
        assert r.status_code == 200, r.text
        params = {"image": "", "session_id": r.json()["session_id"], "output": "image"}
        return client.post("/infer/hippocampus", params=params)

    r = session_infer("ct_abdomen")  # JPEG 2000, 20 slices of 512 x 512
    assert r.status_code == 200, r.text
    (tmp_path / "label.nii.gz").write_bytes(r.content)
    label = nib.load(tmp_path / "label.nii.gz")
    assert label.shape == (512, 512, 20) and np.allclose(np.diag(label.affine)[:3], [-0.9765625, -0.9765625, 2.0])
    r = session_infer("ct_head_ge")  # the same refusal as from a PACS, not a silently distorted volume
    assert r.status_code == 422 and "gantry tilt" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("post", "/infer/unknown_model?image=hippocampus_001", {}, 404),
        ("post", "/infer/hippocampus?image=..%2F..%2Fetc%2Fpasswd", {}, 400),
        ("post", "/infer/hippocampus?image=%2Fetc%2Fpasswd", {}, 400),
        ("post", "/infer/hippocampus?image=no_such_case", {}, 404),
        ("post", "/train/unknown_model", {"json": {}}, 404),
        ("put", "/datastore/label?image=hippocampus_001&tag=final", {"files": {"label": ("x.nii.gz", b"")}}, 422),
        (
            "put",
            "/datastore/label?image=hippocampus_001&tag=final",
            {"files": {"label": ("x.nii.gz", b"\x1f\x8bjunk")}},
            422,
        ),
        ("put", "/datastore/label?image=..%2Fx&tag=final", {"files": {"label": ("x.nii.gz", b"x")}}, 400),
        ("post", "/activelearning/random", {"json": {"k": "many"}}, 400),
        ("post", "/infer/hippocampus", {"files": {"file": ("scan.nii.gz", b"\x1f\x8bnot a volume")}}, 422),
        ("put", "/datastore/?image=..%2Fescape", {"files": {"file": ("x.nii.gz", b"x")}}, 400),
        ("put", "/datastore/label?image=hippocampus_001&tag=..%2Fx", {"files": {"label": ("x.nii.gz", b"x")}}, 400),
        ("post", "/activelearning/unknown_strategy", {"json": {}}, 404),
        ("post", "/scoring/unknown_method", {}, 404),
        ("post", "/batch/infer/unknown_model", {"json": {}}, 404),
        ("delete", "/datastore/?id=no_such_case", {}, 404),
        ("delete", "/datastore/image?id=..%2Fx", {}, 400),
        ("delete", f"/datastore/label?id={UNLABELLED}&tag=final", {}, 404),
        ("get", "/datastore/image/info?image=no_such_case", {}, 404),
        ("put", "/datastore/image/info?image=no_such_case", {"data": {"info": "{}"}}, 404),
        ("get", f"/datastore/label/info?label={UNLABELLED}&tag=final", {}, 404),
        ("put", f"/datastore/label/info?label={UNLABELLED}&tag=final", {"data": {"info": "{}"}}, 404),
        ("post", "/infer/hippocampus?image=hippocampus_001", {"data": {"params": "{not json"}}, 422),
        ("put", "/datastore/image/info?image=hippocampus_001", {"data": {"info": "[1, 2]"}}, 422),
        (
            "put",
            "/datastore/label?image=hippocampus_001&tag=final",
            {"files": {"label": ("x.nii.gz", b"x")}, "data": {"params": "{not json"}},
            422,
        ),
        ("post", "/train/hippocampus", {"json": {"max_epochs": "ten"}}, 422),
        ("post", "/train/hippocampus", {"json": {"val_split": 1.5}}, 422),
        ("post", "/infer/hippocampus?image=hippocampus_001&output=dicom_seg", {}, 400),
    ],
)
def test_bad_requests_get_clear_4xx(server, method: str, path: str, kwargs: dict, status: int) -> None:
    client, _, _ = server
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert client.get("/info/").status_code == 200, "the server keeps running"


def test_wrong_shape_label_leaves_the_saved_one_intact(server) -> None:
    client, studies, _ = server
    case = CASES[5]
    image_id = case.name.split(".")[0]
    r = client.put(
        "/datastore/label", params={"image": image_id, "tag": "final"}, files={"label": (case.name, _label_bytes(case))}
    )
    assert r.status_code == 200
    saved = studies / "labels" / "final" / case.name
    before = saved.read_bytes()
    other = next(c for c in sorted((HIPPO / "labelsTr").glob("*.nii.gz")) if nib.load(c).shape != nib.load(case).shape)
    r = client.put(
        "/datastore/label", params={"image": image_id, "tag": "final"}, files={"label": (case.name, other.read_bytes())}
    )
    assert r.status_code == 422 and "does not match the image shape" in r.json()["detail"]
    assert saved.read_bytes() == before


def test_stopped_training_leaves_the_served_weights_alone(server) -> None:
    client, _, app_dir = server
    served = app_dir / "model" / "hippocampus.pt"
    assert served.exists(), "runs after test_active_learning_loop_over_http, which publishes weights"
    before = served.read_bytes()
    r = client.post("/train/hippocampus", json={"max_epochs": 500, "train_batch_size": 2})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while not any("Epoch: 1/500" in line for line in client.get("/train/").json().get("details", [])):
        assert time.monotonic() < deadline, "training did not reach its first epoch"
        time.sleep(0.5)
    r = client.delete("/train/")
    assert r.status_code == 200 and r.json()["status"] == "STOPPED"
    assert _wait_idle(client, "/train/", timeout=30)["status"] == "STOPPED"
    assert served.read_bytes() == before
    assert client.post("/infer/hippocampus", params={"image": CASES[6].name.split(".")[0]}).status_code == 200
