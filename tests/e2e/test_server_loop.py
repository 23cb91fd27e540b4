"""The real ``monailabel start_server`` process on ten real hippocampus cases, driven over HTTP."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import shutil
import socket
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch

from radiology.infer import SegmentationInfer
from radiology.registry import MODELS
from strategies.scores import ScoreStore
from tests.conftest import HIPPO, SHARED, requires_shared
from tests.servers import monailabel_server

pytestmark = [requires_shared, pytest.mark.slow]

CASES = sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[:10]
UNLABELLED = CASES[-1].name.split(".")[0] if CASES else "no_shared_data"  # never labelled by these tests


def _copy_cases(studies: Path) -> None:
    studies.mkdir()
    for case in CASES:
        shutil.copyfile(case, studies / case.name)


CONF = {"models": "hippocampus", "reservation_s": "600", "max_epochs": "1"}


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[tuple[httpx.Client, Path, Path]]:
    """A server of its own, nothing labelled or trained yet: the loop test starts from there whatever ran before."""
    _copy_cases(tmp_path / "studies")
    with monailabel_server(tmp_path, str(tmp_path / "studies"), CONF) as running:
        yield running.http, tmp_path / "studies", tmp_path / "app"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path, Path]]:
    root = tmp_path_factory.mktemp("loop")
    _copy_cases(root / "studies")
    with monailabel_server(root, str(root / "studies"), CONF) as running:
        yield running.http, root / "studies", root / "app"


def _wait_idle(client: httpx.Client, path: str, timeout: float = 900) -> dict:
    """Poll the latest background task until it has ended (a new task is SUBMITTED before RUNNING).

    ``timeout`` only catches a hang: a training's task runs on through the rescoring that follows it,
    which took over 300 s on a loaded 2-core machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(path).json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"{path} still running after {timeout} s")


def _label_bytes(case: Path) -> bytes:
    return (HIPPO / "labelsTr" / case.name).read_bytes()


def _id(case: Path) -> str:
    return case.name.split(".")[0]


PROBE = CASES[4] if CASES else Path("no_shared_data")  # never labelled here: predictions are compared on it


def _save_labels(client: httpx.Client, cases: list[Path]) -> None:
    for case in cases:
        params = {"image": _id(case), "tag": "final"}
        r = client.put("/datastore/label", params=params, files={"label": (case.name, _label_bytes(case))})
        assert r.status_code == 200, r.text


def _served(client: httpx.Client) -> tuple[int | None, bytes]:
    """The served version's number and its weights file, as the server answers them."""
    versions = client.get("/model/hippocampus/versions")
    assert versions.status_code == 200, versions.text
    weights = client.get("/model/hippocampus")
    assert weights.status_code == 200, weights.text
    return versions.json()["served_version"], weights.content


def _server_prediction(client: httpx.Client, case: Path) -> np.ndarray:
    r = client.post("/infer/hippocampus", params={"image": _id(case), "output": "image"})
    assert r.status_code == 200, r.text
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)


def _version(weights: Path) -> str:
    """The version a score carries when ``weights`` computed it (``radiology.uncertainty``)."""
    st = weights.stat()
    return f"{weights.name}:{st.st_mtime_ns}:{st.st_size}"


def _wait_scores(app_dir: Path, images: set[str], version: str, timeout: float = 600) -> None:
    """Wait until every image of ``images`` has a stored score computed by exactly ``version``.

    The shipped and the published weights are both ``hippocampus.pt``: only time and size tell them apart."""
    store = ScoreStore(app_dir / "model" / "scores_hippocampus.json")  # in the server's project database
    deadline = time.monotonic() + timeout
    while True:
        scores = store.load()
        got = {i: scores[i].model_version if i in scores else None for i in sorted(images)}
        if all(v == version for v in got.values()):
            return
        assert time.monotonic() < deadline, f"not rescored under {version} within {timeout} s: {got}"
        time.sleep(1)


@pytest.fixture(scope="module")
def predict(tmp_path_factory: pytest.TempPathFactory) -> Callable[[bytes], np.ndarray]:
    """PROBE's label under the given weights, computed in this process by the server's infer task
    with the server's default settings (``sw_batch_size`` 1, ``cpu_bf16``)."""
    folder = tmp_path_factory.mktemp("weights")
    cache: dict[str, np.ndarray] = {}

    def run(weights: bytes) -> np.ndarray:
        key = hashlib.sha256(weights).hexdigest()
        if key not in cache:
            path = folder / f"{key}.pt"
            path.write_bytes(weights)
            task = SegmentationInfer(MODELS["hippocampus"], [str(path)], sw_batch_size=1, cpu_bf16=True)
            out, _ = task({"image": str(PROBE), "device": "cpu", "logging": "WARNING"})
            cache[key] = np.asarray(nib.load(out).dataobj)
            Path(out).unlink(missing_ok=True)
        return cache[key]

    return run


@pytest.fixture(scope="module")
def labelled(server: tuple[httpx.Client, Path, Path]) -> list[Path]:
    """The module server has the true labels of the first three cases saved."""
    _save_labels(server[0], CASES[:3])
    return CASES[:3]


@pytest.fixture(scope="module")
def _trained_version(server: tuple[httpx.Client, Path, Path], labelled: list[Path]) -> tuple[int, bytes]:
    client = server[0]
    r = client.post("/train/hippocampus", json={"max_epochs": 1, "train_batch_size": 2})
    assert r.status_code == 200, r.text
    assert _wait_idle(client, "/train/")["status"] == "DONE"
    number, weights = _served(client)
    assert number and weights != MODELS["hippocampus"].shipped_weights_path.read_bytes(), "the training published"
    return number, weights


@pytest.fixture
def trained(server: tuple[httpx.Client, Path, Path], _trained_version: tuple[int, bytes]) -> tuple[int, bytes]:
    """The module server serves weights its own training published (served again if a test changed that)."""
    number, weights = _trained_version
    if _served(server[0])[0] != number:
        r = server[0].put("/model/hippocampus/serve", params={"version": number})
        assert r.status_code == 200, r.text
    return number, weights


def test_active_learning_loop_over_http(
    fresh_server: tuple[httpx.Client, Path, Path], predict: Callable[[bytes], np.ndarray]
) -> None:
    client, studies, app_dir = fresh_server
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
    # a corrupt NIfTI is refused when the session is made, by its header, not at its first infer
    r = client.put("/session/", files={"files": ("bad.nii.gz", b"\x1f\x8bnot a volume")})
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

    # 2b. the labelled cases download as one archive, streamed: nothing is left in a temporary folder
    tmp = app_dir.parent / "tmp"
    before = {p for p in tmp.rglob("*") if p.is_file()}
    r = client.get("/datastore/dataset")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(n for n in archive.namelist() if n.startswith("label/")) == [f"label/{c.name}" for c in CASES[:3]]
    assert archive.read(f"image/{CASES[0].name}") == CASES[0].read_bytes()
    left = {p for p in tmp.rglob("*") if p.is_file()} - before
    assert not left, f"the download left {sorted(p.name for p in left)} in the server's temporary folder"

    # 3. train; the run publishes new served weights and rescoring follows
    served = app_dir / "model" / "hippocampus.pt"
    shipped = MODELS["hippocampus"].shipped_weights_path
    assert not served.exists()
    unlabelled = {_id(c) for c in CASES[3:]}
    _wait_scores(app_dir, unlabelled, _version(shipped))  # the start-up scoring, under the shipped weights
    before, shipped_weights = _served(client)
    assert before == 0 and shipped_weights == shipped.read_bytes(), before
    # the comparison itself: the server's answer is this process's infer with the same weights, voxel for voxel
    assert np.array_equal(_server_prediction(client, PROBE), predict(shipped_weights))
    # as 3D Slicer's module sends it: every option /info lists, the first of a list of choices
    config = info["trainers"]["hippocampus"]["config"]
    slicer_params = {k: v[0] if isinstance(v, list) else v for k, v in config.items()}
    r = client.post("/train/hippocampus", json={**slicer_params, "max_epochs": 1, "train_batch_size": 2})
    assert r.status_code == 200, r.text
    status = _wait_idle(client, "/train/")
    assert status["status"] == "DONE", status
    last_run = client.get("/info/").json()["train_stats"]["hippocampus"]["last_run"]
    assert last_run["published"] is True and last_run["trained_on"] == 3, last_run

    # 4. a new version is served, without a restart: new weights, and the next infer is their network's
    after, new_weights = _served(client)
    assert after is not None and after > before, after
    assert hashlib.sha256(new_weights).digest() != hashlib.sha256(shipped_weights).digest()
    assert served.read_bytes() == new_weights
    assert not np.array_equal(predict(new_weights), predict(shipped_weights)), "no voxel changed: nothing told apart"
    assert np.array_equal(_server_prediction(client, PROBE), predict(new_weights)), "the shipped network answered"

    # 5. the unlabelled images are rescored, under exactly the new version (not the start-up scores)
    # (the training's own process rescores: the stored scores, not /scoring/'s status, say under which weights)
    assert _version(served) != _version(shipped)
    _wait_scores(app_dir, unlabelled, _version(served))

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

    # ... and epistemic hands out the images in the order of the stored scores (the new weights')
    scores = ScoreStore(app_dir / "model" / "scores_hippocampus.json").values()
    ranked = sorted(unlabelled, key=lambda i: scores[i], reverse=True)
    assert len({scores[i] for i in ranked}) == len(ranked), "ties: the order would be random"
    with ThreadPoolExecutor(4) as pool:
        picks = list(pool.map(ask, ["a", "b", "c", "d"]))
    ids = [p["id"] for p in picks]
    assert len(set(ids)) == 4 and set(ids) == set(ranked[:4]), (ids, ranked)
    r = client.post("/activelearning/epistemic", json={"client_id": "f", "k": 2})
    assert r.json()["ids"] == ranked[4:6], (r.json(), ranked)
    batch = client.post("/activelearning/random", json={"client_id": "e", "k": 1}).json()
    assert batch["ids"] == ranked[6:], "the one image nobody holds"


def test_a_labelled_image_is_not_replaced_by_one_on_another_grid(server, labelled: list[Path]) -> None:
    client, studies, _ = server
    labelled = _id(labelled[0])
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
        ("post", "/infer/hippocampus", {"files": {"file": ("README.md", b"# not an image")}}, 415),  # was a 500
        ("post", "/infer/hippocampus", {"files": {"file": ("scan.nrrd", b"garbage")}}, 415),  # was a 500
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
        ("get", "/datastore/label?label=..%2F..%2Fhippocampus_001&tag=final", {}, 400),  # was a 404
        ("get", "/datastore/label?label=hippocampus_001&tag=..", {}, 400),  # was a 404
        ("put", f"/datastore/label/info?label={UNLABELLED}&tag=final", {"data": {"info": "{}"}}, 404),
        ("post", "/infer/hippocampus?image=hippocampus_001", {"data": {"params": "{not json"}}, 422),
        ("put", "/datastore/image/info?image=hippocampus_001", {"data": {"info": "[1, 2]"}}, 422),
        ("put", "/datastore/image/info?image=hippocampus_001", {"data": {"info": '{"ts": 1}'}}, 422),  # the server's
        (
            "put",
            "/datastore/label?image=hippocampus_001&tag=final",
            {"files": {"label": ("x.nii.gz", b"x")}, "data": {"params": "{not json"}},
            422,
        ),
        ("post", "/train/hippocampus", {"json": {"max_epochs": "ten"}}, 422),
        ("post", "/train/hippocampus", {"json": {"val_split": 1.5}}, 422),
        ("post", "/infer/hippocampus?image=hippocampus_001&output=dicom_seg", {}, 400),
        ("post", "/infer/hippocampus", {}, 422),  # nothing to segment
        ("put", f"/datastore/image?image={'a' * 300}", {"files": {"file": ("x.nii.gz", b"x")}}, 400),  # was a 500
        ("post", "/infer/hippocampus?image=hippocampus_001", {"data": {"params": '{"device": "gpu 1"}'}}, 422),
        ("post", "/train/hippocampus", {"json": {"device": 5}}, 422),
        ("post", "/infer/hippocampus?session_id=no_such_session", {}, 404),
        ("post", "/activelearning/random", {"json": {"k": 2.5}}, 400),
        ("put", "/datastore/image?image=notes", {"files": {"file": ("notes.txt", b"not an image")}}, 415),
        ("put", "/model/unknown_model", {"files": {"file": ("m.pt", b"x")}}, 404),
        ("delete", "/model/unknown_model", {}, 404),
        ("put", "/session/?uncompress=true", {"files": {"files": ("scan.zip", b"not an archive")}}, 422),
        ("get", "/proxy/dicom/qido/studies", {}, 404),  # a studies folder, no PACS behind it
    ],
)
def test_bad_requests_get_clear_4xx(server, method: str, path: str, kwargs: dict, status: int) -> None:
    client, _, app_dir = server
    tmp = app_dir.parent / "tmp"
    before = {p for p in tmp.rglob("*") if p.is_file()}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert client.get("/info/").status_code == 200, "the server keeps running"
    left = {p for p in tmp.rglob("*") if p.is_file()} - before
    assert not left, f"the refused request left {sorted(p.name for p in left)} in the server's temporary folder"


def test_a_session_of_a_file_that_is_no_nifti_is_a_415_at_infer(server) -> None:
    client, _, _ = server
    r = client.put("/session/", files={"files": ("README.md", b"# not an image")})
    assert r.status_code == 200, r.text
    r = client.post("/infer/hippocampus", params={"image": "", "session_id": r.json()["session_id"]})
    assert r.status_code == 415 and "Infer reads NIfTI images" in r.json()["detail"], r.text
    assert "/" not in r.json()["detail"].split("has")[-1], "no server path in the message"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "says"),
    [
        (
            "post",
            "/infer/unknown_model?image=hippocampus_001",
            {},
            r"Unknown model 'unknown_model'; served models: \[.*'hippocampus'",
        ),
        (
            "post",
            "/train/unknown_model",
            {"json": {}},
            r"Unknown model 'unknown_model'; trainable models: \[.*'hippocampus'",
        ),
        (
            "post",
            "/batch/infer/unknown_model",
            {"json": {}},
            r"Unknown model 'unknown_model'; models: \[.*'hippocampus'",
        ),
        (
            "post",
            "/activelearning/unknown",
            {"json": {}},
            r"Unknown strategy 'unknown'; strategies: \[.*'epistemic'.*'random'",
        ),
        ("post", "/scoring/unknown", {}, r"Unknown scoring method 'unknown'; scoring methods: .*epistemic"),
    ],
)
def test_an_unknown_name_is_a_404_that_lists_the_valid_ones(
    server, method: str, path: str, kwargs: dict, says: str
) -> None:
    client, _, _ = server
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == 404 and re.search(says, r.json()["detail"]), r.text


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


def test_stopped_training_leaves_the_served_weights_alone(server, trained: tuple[int, bytes]) -> None:
    client, _, app_dir = server
    assert _served(client) == trained
    r = client.post("/train/hippocampus", json={"max_epochs": 500, "train_batch_size": 2})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while not any("Epoch: 1/500" in line for line in client.get("/train/").json().get("details", [])):
        assert time.monotonic() < deadline, "training did not reach its first epoch"
        time.sleep(0.5)
    r = client.delete("/train/")
    assert r.status_code == 200 and r.json()["status"] == "STOPPED"
    assert _wait_idle(client, "/train/", timeout=30)["status"] == "STOPPED"
    assert _served(client) == trained, "the same version, the same file"
    last_run = client.get("/info/").json()["train_stats"]["hippocampus"]["last_run"]
    assert last_run["published"] is False and last_run["stopped"] == "stopped by DELETE /train/", last_run
    assert client.post("/infer/hippocampus", params={"image": CASES[6].name.split(".")[0]}).status_code == 200


def test_uploaded_weights_are_checked_served_and_withdrawn(
    server, trained: tuple[int, bytes], predict: Callable[[bytes], np.ndarray]
) -> None:
    client, _, app_dir = server
    served = app_dir / "model" / "hippocampus.pt"
    shipped = MODELS["hippocampus"].shipped_weights_path
    number, trained_bytes = trained
    shipped_bytes = shipped.read_bytes()
    probe_scored = {_id(PROBE), UNLABELLED}  # unlabelled whatever ran before
    state = torch.load(shipped, weights_only=True)["model"]
    first = next(iter(state))
    wrong_shape, with_nan, one_member = io.BytesIO(), io.BytesIO(), io.BytesIO()
    torch.save({**state, first: torch.zeros(2, 2)}, wrong_shape)
    torch.save({**state, first: torch.full_like(state[first], float("nan"))}, with_nan)
    torch.save({k.removeprefix("members.0."): v for k, v in state.items() if k.startswith("members.0.")}, one_member)
    for content, match in [
        (b"PK\x03\x04 not a checkpoint", "not a PyTorch checkpoint"),
        (wrong_shape.getvalue(), "for another network"),
        (one_member.getvalue(), "serves 4 networks averaged and the file holds one network"),
        (with_nan.getvalue(), "NaN"),
    ]:
        r = client.put("/model/hippocampus", files={"file": ("m.pt", content)})
        assert r.status_code == 422 and match in r.json()["detail"], r.text
        assert _served(client) == trained, "a refused upload leaves the served weights as they were"

    # an upload of the shipped network: a new version, served at once and rescored under it
    r = client.put("/model/hippocampus", files={"file": ("hippocampus.pt", shipped_bytes)})
    assert r.status_code == 200, r.text
    assert r.json()["checksum"] == "SHA256:" + hashlib.sha256(shipped_bytes).hexdigest()
    uploaded, weights = _served(client)
    assert uploaded is not None and uploaded > number and weights == shipped_bytes == served.read_bytes()
    assert not np.array_equal(predict(trained_bytes), predict(shipped_bytes)), "no voxel changed: nothing told apart"
    assert np.array_equal(_server_prediction(client, PROBE), predict(shipped_bytes)), "the trained network answered"
    _wait_scores(app_dir, probe_scored, _version(served))

    # withdrawn from the trained version: the shipped weights are served again, and scored again
    r = client.put("/model/hippocampus/serve", params={"version": number})
    assert r.status_code == 200, r.text
    assert np.array_equal(_server_prediction(client, PROBE), predict(trained_bytes))
    assert client.delete("/model/hippocampus").status_code == 200
    assert not served.exists() and len(list(served.parent.glob("hippocampus.pt.*.deleted"))) >= 1
    r = client.delete("/model/hippocampus")
    assert r.status_code == 404 and "no published weights" in r.json()["detail"], r.text
    assert shipped.read_bytes() == shipped_bytes, "the shipped weights are never deleted"
    assert _served(client) == (0, shipped_bytes)
    assert np.array_equal(_server_prediction(client, PROBE), predict(shipped_bytes)), "the shipped weights are served"
    _wait_scores(app_dir, probe_scored, _version(shipped))


def test_a_session_archive_is_unpacked_inside_the_session(server, tmp_path: Path) -> None:
    client, _, _ = server
    escaped = tmp_path / "escaped.txt"
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as t:
        info = tarfile.TarInfo("../" * 12 + str(escaped).lstrip("/"))
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    r = client.put("/session/", params={"uncompress": "true"}, files={"files": ("scan.tar", evil.getvalue())})
    assert r.status_code == 422 and "outside the session" in r.json()["detail"], r.text
    assert not escaped.exists()

    case = CASES[7]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"scan/{case.name}", case.read_bytes())
    r = client.put("/session/", params={"uncompress": "true"}, files={"files": ("scan.zip", archive.getvalue())})
    assert r.status_code == 200, r.text
    params = {"session_id": r.json()["session_id"], "output": "image"}
    r = client.post("/infer/hippocampus", params=params)
    assert r.status_code == 200, r.text
    (tmp_path / "label.nii.gz").write_bytes(r.content)
    assert nib.load(tmp_path / "label.nii.gz").shape == nib.load(case).shape


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi is installed: GPU information is served")
def test_gpu_information_without_a_gpu_is_a_404(server) -> None:
    client, _, _ = server
    r = client.get("/logs/gpu")
    assert r.status_code == 404 and "nvidia-smi" in r.json()["detail"], r.text


def test_an_announced_huge_upload_is_refused_before_its_body_is_sent(server) -> None:
    client, studies, _ = server
    head = (
        "PUT /datastore/label?image=hippocampus_001&tag=final HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000000000\r\n\r\n"
    )
    with socket.create_connection((client.base_url.host, client.base_url.port), timeout=30) as s:
        s.sendall(head.encode())  # 5 GB announced, none of it sent: the answer must not wait for it
        reply = b""
        while chunk := s.recv(4096):  # the server closes the connection after answering
            reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "limited to 1024 MB (--conf max_upload_mb)" in reply, reply
    assert client.get("/info/").status_code == 200


def test_an_image_added_later_is_scored_when_the_next_sample_is_asked_for(server) -> None:
    client, _, app_dir = server
    scores = ScoreStore(app_dir / "model" / "scores_hippocampus.json")  # in the server's project database
    _wait_idle(client, "/scoring/")
    case = sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[len(CASES)]  # not among the server's images
    r = client.put("/datastore/image", params={"image": "late_arrival"}, files={"file": (case.name, case.read_bytes())})
    assert r.status_code == 200, r.text
    assert "late_arrival" not in scores.load()
    r = client.post("/activelearning/epistemic", json={"client_id": "late", "k": 1})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 180
    while "late_arrival" not in scores.load():
        assert time.monotonic() < deadline, "the new image was not scored within 180 s"
        time.sleep(1)
    _wait_idle(client, "/scoring/")


def test_concurrent_infers_answer_as_one_at_a_time(server) -> None:
    """Infer runs in worker threads now: requests overlap, and each answer must still be its own."""
    client, _, app_dir = server
    ids = [c.name.split(".")[0] for c in CASES[:4]]

    def label(image_id: str) -> np.ndarray:
        r = client.post("/infer/hippocampus", params={"image": image_id, "output": "image"})
        assert r.status_code == 200, r.text
        return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)

    alone = [label(i) for i in ids]
    log = app_dir.parent / "server.log"
    start = log.stat().st_size
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(label, ids * 2))
    assert all(np.array_equal(a, b) for a, b in zip(alone * 2, together, strict=True))

    # At most infer_concurrency (2, the default) computed at once, as the server's own log shows: MONAI
    # Label's infer task logs its start ("Infer Request (final)") and its end ("Result Json Keys")
    # inside the slot. Two at once are reached, so the eight requests did overlap.
    with log.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    running, peak, ended = 0, 0, 0
    for line in lines:
        if "Infer Request (final)" in line:
            running += 1
            peak = max(peak, running)
        elif "Result Json Keys" in line:
            running, ended = running - 1, ended + 1
    assert ended == 8 and peak == 2, f"{ended} infers ended, at most {peak} at once"


def test_a_training_with_run_sync_holds_neither_the_server_nor_a_second_training(server, labelled) -> None:
    """``run_sync=true`` trains inside the request: MONAI Label ran it on the event loop, and every
    other request waited for the whole training."""
    client, _, app_dir = server
    result: dict[str, httpx.Response] = {}

    def train() -> None:
        # Four networks train together (the hippocampus ensemble): about 1.5 s per epoch here, and the
        # answer comes only at the end, so this request may wait longer than the client's default.
        result["train"] = client.post(
            "/train/hippocampus",
            params={"run_sync": "true"},
            json={"max_epochs": 30, "train_batch_size": 2},
            timeout=600,
        )

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(train)
        deadline = time.monotonic() + 180
        while "Epoch: 1/30," not in (app_dir.parent / "server.log").read_text(errors="replace"):
            assert time.monotonic() < deadline and not running.done(), "the training did not start"
            time.sleep(0.2)
        started = time.monotonic()
        info = client.get("/info/")
        seconds = time.monotonic() - started
        # Answered while the training goes on (it shares both cores, so not instantly): MONAI Label's
        # answered only after the training's end.
        assert info.status_code == 200 and not running.done(), f"/info waited {seconds:.1f} s, for the training"
        assert seconds < 20, f"/info took {seconds:.1f} s during the training"
        second = client.post("/train/hippocampus", params={"run_sync": "true"}, json={"max_epochs": 1})
        background = client.post("/train/hippocampus", json={"max_epochs": 1})
        assert not running.done(), "the training ended before the checks: make it longer"
        running.result()
    assert second.status_code == 429 and "run_sync=true is running" in second.json()["detail"]
    assert background.status_code == 429, background.text
    assert result["train"].status_code == 200 and result["train"].json()["total_epochs"] == 30, result["train"].text
