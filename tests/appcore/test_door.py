"""Security issue #23 (findings 3, 7, 8, 9, 10, 11): no client string becomes a server path, every
parameter is checked on every route, and answers carry no server paths."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import BackgroundTasks
from starlette.datastructures import UploadFile

from appcore.app import (
    RequestChecks,
    _bad_task_params,
    _bad_train_params,
    _check_infer_params,
    _needs_input,
    _session_answer,
    _short_upload_names,
    hide_server_paths,
    path_free_train_request,
    serve_own_log,
    server_files,
)
from appcore.datastore import check_save_params
from appcore.errors import RequestError
from appcore.sessions import CheckedSessions
from appcore.settings import AppSettings
from appcore.validation import check_image_id
from tests.conftest import HIPPO, requires_shared, write_nifti
from tests.servers import monailabel_server

TRAINERS = ["hippocampus", "organs_ct"]


# -- ids and tags: one rule (finding 10) ------------------------------------------------------------
@pytest.mark.parametrize(
    "good",
    [
        "hippocampus_001",
        "1.2.840.113619.2.55.3.604688119.969.1268071029.320",  # a DICOM UID
        "8b77284d6f37ab3fc826139ebadaec3b9d81c552fe525c3547bbbd6c65ac0d83",  # a pathology tile
        "final",
        "spleen 2",
        "Ünïcøde",
        "финал",  # one script, not a look-alike of a Latin word
        "case(1)+v2",
    ],
)
def test_plain_ids_and_tags_pass(good: str) -> None:
    assert check_image_id(good, "Label tag", existing=["final", "original", "hippocampus_001"]) == good


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("final ", "starts or ends with whitespace"),
        (" final", "starts or ends with whitespace"),
        ("Final", "differs from the existing 'final' only in case"),
        ("FINAL", "differs from the existing 'final'"),
        ("ｆｉｎａｌ", "compatibility characters"),  # full-width
        ("ﬁnal", "compatibility characters"),  # the fi ligature
        ("f\u0456nal", "mixes Latin letters with CYRILLIC"),  # a Cyrillic i
        ("fin\u200bal", "contains"),  # a zero-width space
        ("a#b", "contains '#'"),
        ("a%2Fb", "contains '%'"),
        ("/some/dir", "contains a path"),
    ],
)
def test_look_alike_and_odd_tags_are_refused(bad: str, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        check_image_id(bad, "Label tag", existing=["final", "original"])
    assert e.value.status_code == 400


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"path": "/etc/passwd"}, "path are set by the server"),
        ({"ts": 1, "name": "x.nii.gz"}, "name, ts are set by the server"),
        ({"file_version": "1"}, "file_version are set by the server"),
        ({"model": ["hippocampus"]}, 'parameter "model" must be a model\'s name .* got list'),
        ({"model": {"a": 1}}, "got dict"),
        ({"model": 3}, "got int"),
    ],
)
def test_save_params_that_the_server_keeps_or_of_the_wrong_type_are_refused(params: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        check_save_params(params, "Save label")
    assert e.value.status_code == 422


def test_plain_save_params_pass() -> None:
    params = {"model": "hippocampus", "label_info": [{"name": "anterior", "idx": 1}]}
    assert check_save_params(params, "Save label") == params
    assert check_save_params(None, "Save label") == {}


# -- training parameters (findings 3 and 7) ---------------------------------------------------------
SLICER = {  # what 3D Slicer's module sends: every option /info lists, as picked
    "name": "train_01",
    "pretrained": True,
    "device": "cpu",
    "max_epochs": 1,
    "early_stop_patience": -1,
    "val_split": 0.2,
    "train_batch_size": 2,
    "val_batch_size": 1,
    "multi_gpu": False,
    "gpus": "all",
    "dataset": "CacheDataset",
    "dataloader": "ThreadDataLoader",
    "tracking": "None",
    "tracking_uri": "",
    "tracking_experiment_name": "",
}


def _assert_refusal(error: RequestError | None, status: int | None, match: str | None) -> None:
    """``error`` is None where ``status`` is, else a ``RequestError`` of ``status`` whose detail matches."""
    if status is None:
        assert error is None, error
    else:
        assert isinstance(error, RequestError) and error.status_code == status, error
        assert re.search(match or "", error.detail), error.detail


@pytest.mark.parametrize(
    ("params", "model", "status", "match"),
    [
        (SLICER, "hippocampus", None, None),
        ({**SLICER, "model": "hippocampus"}, "hippocampus", None, None),
        ({"max_epochs": 1, "client_id": "slicer"}, "hippocampus", None, None),  # MONAILabelClient adds client_id
        ({"client_id": ["x"]}, "hippocampus", 422, "'client_id' must be a string"),
        ({"name": "/some/dir"}, "hippocampus", 400, "'name' '/some/dir' contains a path"),
        ({"name": "../../../tmp/x"}, "hippocampus", 400, "contains a path"),
        ({"name": ".."}, "hippocampus", 400, "contains a path"),
        ({"name": "run "}, "hippocampus", 400, "whitespace"),
        ({"name": ["x"]}, "hippocampus", 400, "'name' is required"),
        ({"bundle_path": "/tmp/session"}, "hippocampus", 422, "'bundle_path' is not accepted.*PYTHONPATH"),
        ({"train_ds": "/etc/datalist.json"}, "hippocampus", 422, "'train_ds' is not accepted"),
        ({"val_ds": [{"image": "/etc/x"}]}, "hippocampus", 422, "'val_ds' is not accepted"),
        ({"tracking_uri": "/tmp/mlruns"}, "hippocampus", 422, "'tracking_uri' is not accepted"),
        ({"tracking": "mlflow"}, "hippocampus", 422, "'tracking' must be one of"),
        ({"tracking_experiment_name": "../x"}, "hippocampus", 400, "contains a path"),
        ({"model": "organs_ct"}, "hippocampus", 422, "would train another model"),
        ({"gpus": "0;rm"}, "hippocampus", 422, "'gpus' must be 'all'"),
        ({"pretrained": "no"}, "hippocampus", 422, "'pretrained' must be true or false"),
        ({"early_stop_patience": -5}, "hippocampus", 422, "at least -1"),
        ({"output_dir": "/tmp"}, "hippocampus", 422, "Unknown training parameter 'output_dir'"),
    ],
)
def test_training_parameters_of_one_model(params: dict, model: str, status: int | None, match: str | None) -> None:
    error = _bad_train_params(json.dumps(params).encode(), model)
    _assert_refusal(error, status, match)


@pytest.mark.parametrize(
    ("params", "status", "match"),
    [
        ({}, None, None),
        ({"hippocampus": SLICER, "organs_ct": {"max_epochs": 2}}, None, None),
        ({"max_epochs": 2}, None, None),  # applies to every model
        ({"hippocampus": {"max_epochs": -1}}, 422, "'max_epochs' must be an integer of at least 1, got -1"),
        ({"organs_ct": {"train_batch_size": 0}}, 422, "'train_batch_size' must be an integer"),
        ({"max_epochs": -1}, 422, "'max_epochs' must be an integer"),
        ({"hippocampus": {"name": "/some/dir"}}, 400, "contains a path"),
        ({"name": "../../x"}, 400, "contains a path"),
        ({"hippocampus": [1]}, 422, "model 'hippocampus' must be a JSON object"),
        ({"hippocampus": {"model": "organs_ct"}}, 422, "would train another model"),
        ({"model": "hippocampus"}, 422, "POST /train/'s top-level parameters would train another model"),
        ({"bundle_path": "/tmp"}, 422, "'bundle_path' is not accepted"),
        ({"spleen": {}}, 422, "Unknown training parameter 'spleen'"),
    ],
)
def test_training_parameters_of_every_model(params: dict, status: int | None, match: str | None) -> None:
    error = _bad_train_params(json.dumps(params).encode(), None, trainers=TRAINERS)
    _assert_refusal(error, status, match)


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"name": "/some/dir"}, "contains a path"),
        ({"name": "train_01", "bundle_path": "/tmp/x"}, "'bundle_path' is not accepted"),
        ({"train_ds": "/etc/x.json"}, "'train_ds' is not accepted"),
    ],
)
def test_a_training_task_refuses_path_parameters_itself(request_: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        path_free_train_request(request_)


def test_a_training_task_takes_monai_labels_own_configuration() -> None:
    path_free_train_request({**SLICER, "model": "hippocampus", "gpus": "all"})
    path_free_train_request({})  # BasicTrainTask's default name, train_01


@pytest.mark.parametrize(
    ("body", "what", "key", "name", "match"),
    [
        ({"bundle_path": "/tmp/s"}, "Scoring", "method", "epistemic", "'bundle_path' is not accepted"),
        ({"epistemic": {"bundle_path": "/tmp/s"}}, "Scoring", "method", None, "'bundle_path' is not accepted"),
        ({"method": "other"}, "Scoring", "method", "epistemic", "differs from the one in the path"),
        ({"bundle_path": "/tmp/s"}, "Batch infer", "model", "hippocampus", "'bundle_path'"),
        ({"label_tag": "../final"}, "Batch infer", "model", "hippocampus", "contains a path"),
        ({"images": ["/etc/passwd"]}, "Batch infer", "model", "hippocampus", "contains a path"),
        ({"images": 3}, "Batch infer", "model", "hippocampus", "'images' must be"),
        ({"gpus": "x"}, "Batch infer", "model", "hippocampus", "'gpus' must be"),
        ({"started_by": "mallory"}, "Batch infer", "model", "hippocampus", "'started_by' is set by the server"),
    ],
)
def test_scoring_and_batch_parameters_name_no_server_path(
    body: dict, what: str, key: str, name: str | None, match: str
) -> None:
    error = _bad_task_params(json.dumps(body).encode(), what, key, name)
    assert isinstance(error, RequestError) and re.search(match, error.detail), error
    assert _bad_task_params(b'{"max_batch_size": 2, "images": "unlabeled"}', what, key, name) is None


# -- infer: only the file the request's endpoint wrote (finding 8) ----------------------------------
class _Store:
    def get_image_uri(self, image_id: str) -> str:
        return f"/studies/{image_id}.nii.gz"


class _App(RequestChecks):
    _infers = {"hippocampus": object()}

    def __init__(self, sessions: Any = None) -> None:
        self._sessions = sessions

    def sessions(self) -> Any:
        return self._sessions


def test_an_absolute_image_path_is_refused_the_same_whether_or_not_it_exists(tmp_path: Path) -> None:
    there = tmp_path / "secret.nii.gz"
    there.write_bytes(b"x" * 10)
    answers = []
    for path in (str(there), str(tmp_path / "absent.nii.gz"), "/etc/passwd", str(tmp_path)):
        with pytest.raises(RequestError) as e:
            _App().request_image({"model": "hippocampus", "image": path}, _Store(), 1)
        answers.append((e.value.status_code, e.value.detail))
    assert len(set(answers)) == 1 and answers[0][0] == 400, answers
    assert "not a server path" in answers[0][1]
    assert _App().request_image({"model": "hippocampus", "image": "case_1"}, _Store(), 1) == "/studies/case_1.nii.gz"


def test_the_upload_the_endpoint_saved_for_this_request_is_the_only_path_taken(tmp_path: Path) -> None:
    from monailabel.utils.others.generic import remove_file

    upload = tmp_path / "tmpabc.nii.gz"
    other = tmp_path / "tmpother.nii.gz"
    seen: dict[str, Any] = {}

    def run_inference(background_tasks: Any, model: str, image: str = "", session_id: str = "", params: str = "{}",
                      file: Any = None, label: Any = None, output: Any = None) -> dict:  # fmt: skip
        """As MONAI Label's: save the upload, queue its removal, then call the app's infer."""
        upload.write_bytes(b"x" * 10)
        other.write_bytes(b"x" * 10)
        background_tasks.add_task(remove_file, str(upload))
        seen["files"] = server_files()
        for path in (upload, other):
            try:
                seen[path.name] = _App().request_image({"model": "hippocampus", "image": str(path)}, _Store(), 1)
            except RequestError as e:
                seen[path.name] = e.status_code
        return {}

    checked = _needs_input(run_inference)
    tasks = BackgroundTasks()
    checked(tasks, "hippocampus", file=UploadFile(BytesIO(b"x"), filename="scan.nii.gz"))
    assert seen == {"files": frozenset({str(upload)}), upload.name: str(upload), other.name: 400}
    assert len(tasks.tasks) == 1, "the removal still reaches FastAPI's tasks"
    assert server_files() == frozenset(), "nothing is left for the next request in this thread"


def test_a_session_image_is_taken_for_its_own_request(tmp_path: Path) -> None:
    image = tmp_path / "sessions" / "s1" / "scan.nii.gz"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"x" * 10)
    sessions = SimpleNamespace(get_session=lambda sid: SimpleNamespace(image=str(image)) if sid == "s1" else None)

    def run_inference(background_tasks: Any, model: str, image: str = "", session_id: str = "", params: str = "{}",
                      file: Any = None, label: Any = None, output: Any = None) -> str:  # fmt: skip
        return _App(sessions).request_image({"model": "hippocampus", "image": str(image_path)}, _Store(), 1)

    image_path = image
    import appcore.app as app_module

    real = app_module._running_app
    app_module._running_app = lambda: _App(sessions)  # type: ignore[assignment]
    try:
        assert _needs_input(run_inference)(BackgroundTasks(), "hippocampus", session_id="s1") == str(image)
        with pytest.raises(RequestError, match="not a server path"):
            _needs_input(run_inference)(BackgroundTasks(), "hippocampus", image="case_1")
    finally:
        app_module._running_app = real  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"image": "/etc/passwd"}, "'image' is not accepted in params"),
        ({"session": {"image": "/etc/passwd"}}, "'session' is not accepted"),
        ({"label": "/etc/passwd"}, "'label' is not accepted"),
        ({"model_filename": "../../x.pt"}, "'model_filename' is not accepted"),
        ({"result_extension": "/../../x"}, "'result_extension' must be a file extension"),
        ({"result_extension": "." + "x" * 300}, "'result_extension' must be a file extension"),
        ({"label_tag": "../x"}, "contains a path"),
    ],
)
def test_infer_params_name_no_server_file(params: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        _check_infer_params(json.dumps(params))
    _check_infer_params(json.dumps({"result_extension": ".nii.gz", "largest_cc": True}))


# -- upload file names, sessions, logs (findings 9 and 11) ------------------------------------------
@pytest.mark.parametrize("name", ["a" * 250 + ".nii.gz", "é" * 120 + ".nii.gz", "x." + "y" * 260])
def test_upload_names_too_long_for_a_file_are_a_400(name: str) -> None:
    called = []

    def endpoint(background_tasks: Any, files: list) -> dict:
        called.append(1)
        return {}

    checked = _short_upload_names(endpoint)
    with pytest.raises(RequestError, match="name is .* bytes long; at most 200") as e:
        checked(None, [UploadFile(BytesIO(b"x"), filename=name)])
    assert e.value.status_code == 400 and not called
    assert checked(None, [UploadFile(BytesIO(b"x"), filename="scan.nii.gz")]) == {}


def test_session_ids_are_random_and_answers_carry_no_server_path(tmp_path: Path) -> None:
    upload = tmp_path / "upload" / "scan.nii.gz"
    upload.parent.mkdir()
    write_nifti(upload, np.zeros((8, 8, 8), np.float32))  # sessions judge the file by its header
    sessions = CheckedSessions(str(tmp_path / "sessions"), 3600)
    session_id, info = sessions.add_session(str(upload))
    assert uuid.UUID(session_id).version == 4
    answered = _session_answer(info.to_json())
    assert "path" not in answered and answered["image"] == "scan.nii.gz"
    assert str(tmp_path) not in json.dumps(answered)


def test_logs_are_served_only_when_asked_and_only_this_servers(tmp_path: Path) -> None:
    assert AppSettings.from_conf({}, ["hippocampus"]).expose_logs is False
    assert AppSettings.from_conf({"expose_logs": "true"}, ["hippocampus"]).expose_logs is True
    with pytest.raises(ValueError, match="expose_logs: expected true or false"):
        AppSettings.from_conf({"expose_logs": "maybe"}, ["hippocampus"])
    path = serve_own_log(tmp_path, 8123)
    try:
        logging.getLogger("tests.door").warning("only this server's line")
        for handler in logging.getLogger().handlers:
            handler.flush()
        assert path == tmp_path / "logs" / "server-8123.log" and "only this server's line" in path.read_text()
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "baseFilename", "") == str(path)]:
            root.removeHandler(handler)
            handler.close()


def test_task_status_names_server_folders_by_name() -> None:
    status = {
        "request": {"model": "hippocampus", "bundle": None},
        "details": deque(["Run/Output Path: /srv/apps/radiology/model/train_01", "read /srv/studies/a.nii.gz", 3]),
    }
    folders = {"/srv/apps/radiology": "<app>", "/srv": "<other>", "/srv/studies": "<studies>"}
    assert hide_server_paths(status, folders) == {
        "request": {"model": "hippocampus", "bundle": None},
        "details": ["Run/Output Path: <app>/model/train_01", "read <studies>/a.nii.gz", 3],
    }


# -- the same over HTTP, on a real server ------------------------------------------------------------
CASES = sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[:3]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    root = tmp_path_factory.mktemp("door")
    studies = root / "studies"
    studies.mkdir()
    for case in CASES:
        shutil.copyfile(case, studies / case.name)
    with monailabel_server(root, str(studies), {"models": "hippocampus", "score_on_start": "false"}) as running:
        yield running.http, root


def _id(case: Path) -> str:
    return case.name.split(".")[0]


@requires_shared
@pytest.mark.slow
def test_training_name_and_parameters_over_http(server: tuple[httpx.Client, Path]) -> None:
    client, root = server
    target = root / "victim"
    target.mkdir()
    (target / "model.pt").write_bytes(b"keep")
    for name in (str(target), f"../../../../../../../..{target}"):
        r = client.post("/train/hippocampus", json={"name": name, "max_epochs": 1})
        assert r.status_code == 400 and "contains a path" in r.json()["detail"], r.text
    r = client.post("/train/", json={"hippocampus": {"name": str(target)}})
    assert r.status_code == 400, r.text
    r = client.post("/train/", json={"hippocampus": {"max_epochs": -1}})
    assert r.status_code == 422 and "'max_epochs' must be an integer" in r.json()["detail"], r.text
    r = client.post("/train/", json={"train_batch_size": -3})
    assert r.status_code == 422, r.text
    r = client.post("/scoring/epistemic", json={"bundle_path": str(root)})
    assert r.status_code == 422 and "bundle_path" in r.json()["detail"], r.text
    r = client.post("/batch/infer/hippocampus", json={"bundle_path": str(root)})
    assert r.status_code == 422, r.text
    assert (target / "model.pt").read_bytes() == b"keep" and sorted(os.listdir(target)) == ["model.pt"]
    assert client.get("/train/").status_code == 404, "no training was started"


@requires_shared
@pytest.mark.slow
def test_infer_names_no_server_file_over_http(server: tuple[httpx.Client, Path]) -> None:
    client, root = server
    inside_tmp = root / "tmp" / "planted.nii.gz"
    shutil.copyfile(CASES[0], inside_tmp)
    answers = set()
    for path in (inside_tmp, root / "tmp" / "absent.nii.gz", Path("/etc/passwd"), Path("/nonexistent")):
        r = client.post("/infer/hippocampus", params={"image": str(path), "output": "json"})
        answers.add((r.status_code, r.text))
    assert len(answers) == 1 and next(iter(answers))[0] == 400, answers
    r = client.post(
        "/infer/hippocampus",
        params={"output": "json"},
        data={"params": json.dumps({"image": str(inside_tmp)})},
        files={"file": (CASES[1].name, CASES[1].read_bytes())},
    )
    assert r.status_code == 422 and "'image' is not accepted" in r.json()["detail"], r.text
    r = client.post(
        "/infer/hippocampus", params={"output": "json"}, files={"file": ("a.nii.gz", CASES[1].read_bytes())}
    )
    assert r.status_code == 200, r.text
    assert str(root) not in r.text


@requires_shared
@pytest.mark.slow
def test_labels_tags_and_uploads_over_http(server: tuple[httpx.Client, Path]) -> None:
    client, root = server
    image, label = _id(CASES[0]), (HIPPO / "labelsTr" / CASES[0].name).read_bytes()

    def save(tag: str, params: dict | None = None) -> httpx.Response:
        return client.put(
            "/datastore/label",
            params={"image": image, "tag": tag},
            data={"params": json.dumps(params or {})},
            files={"label": (CASES[0].name, label)},
        )

    for params in ({"model": ["hippocampus"]}, {"model": {"x": 1}}, {"path": "/etc/passwd"}, {"ts": 1}):
        r = save("final", params)
        assert r.status_code == 422, (params, r.text)
    assert save("final", {"model": "hippocampus"}).status_code == 200
    for tag in ("final ", "Final", "ｆｉｎａｌ", "f\u0456nal"):
        r = save(tag)
        assert r.status_code == 400, (tag, r.text)
    r = save("Final")
    assert "existing 'final'" in r.json()["detail"], r.text
    labels = sorted(p.name for p in (root / "studies" / "labels").iterdir())
    assert set(labels) <= {"final", "original"}, labels  # MONAI Label makes both at start

    # image uploads: server fields and look-alike ids refused, too-long file names a 400
    upload = CASES[1].read_bytes()
    r = client.put(
        "/datastore/image", data={"params": json.dumps({"path": "/x"})}, files={"file": ("n.nii.gz", upload)}
    )
    assert r.status_code == 422, r.text
    r = client.put("/datastore/", params={"image": image.upper()}, files={"file": ("n.nii.gz", upload)})
    assert r.status_code == 400 and f"existing {image!r}" in r.json()["detail"], r.text
    long_name = "a" * 300 + ".nii.gz"
    r = client.put("/datastore/image", files={"file": (long_name, upload)})
    assert r.status_code == 400 and "bytes long" in r.json()["detail"], r.text
    before = set((root / "tmp").iterdir())
    r = client.put("/session/", files={"files": (long_name, upload)})
    assert r.status_code == 400 and "bytes long" in r.json()["detail"], r.text
    assert set((root / "tmp").iterdir()) == before, "the refused session left a folder behind"


@requires_shared
@pytest.mark.slow
def test_logs_sessions_and_answers_over_http(server: tuple[httpx.Client, Path]) -> None:
    client, root = server
    r = client.get("/logs/", params={"text": "true"})
    assert r.status_code == 403 and "--conf expose_logs true" in r.json()["detail"], r.text

    r = client.put("/session/", files={"files": (CASES[2].name, CASES[2].read_bytes())})
    assert r.status_code == 200, r.text
    session_id = r.json()["session_id"]
    assert uuid.UUID(session_id).version == 4
    for answer in (r.json(), client.get(f"/session/{session_id}").json()):
        assert str(root) not in json.dumps(answer) and "path" not in json.dumps(answer), answer

    r = client.post("/scoring/epistemic", json={})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 300
    while client.get("/scoring/").json().get("status") not in ("DONE", "ERROR") and time.monotonic() < deadline:
        time.sleep(0.5)
    r = client.get("/scoring/", params={"all": "true"})
    leaks = [r.text[max(0, m.start() - 150) : m.end() + 60] for m in re.finditer(re.escape(str(root)), r.text)]
    assert r.status_code == 200 and r.json() and not leaks, leaks
    assert "/.cache/monailabel/sessions" not in r.text and "<app>" in r.text, r.text[:1000]

    r = client.get("/datastore/image/info", params={"image": _id(CASES[0])})
    assert r.json()["path"] == CASES[0].name, r.text
    for path in ("/info/", "/datastore/?output=all", "/datastore/?output=train", "/datastore/"):
        r = client.get(path)
        assert r.status_code == 200 and str(root) not in r.text, (path, r.text[:500])


def test_an_unreadable_tile_is_named_by_its_file_name_only(tmp_path: Path) -> None:
    from pathology.wsi import read_tile

    bad = tmp_path / "tmpupload.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(RequestError, match="tmpupload.png") as e:
        read_tile(bad, "uploaded image")
    assert str(tmp_path) not in e.value.detail


@requires_shared
@pytest.mark.slow
def test_exposed_logs_are_this_servers_own(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copyfile(CASES[0], studies / CASES[0].name)
    conf = {"models": "hippocampus", "score_on_start": "false", "expose_logs": "true"}
    with monailabel_server(tmp_path, str(studies), conf) as running:
        shared = tmp_path / "app" / "logs" / "app.log"
        shared.parent.mkdir(parents=True, exist_ok=True)
        with shared.open("a") as f:
            f.write("a line another server of this app folder wrote\n")
        r = running.http.put("/session/", files={"files": (CASES[0].name, CASES[0].read_bytes())})
        assert r.status_code == 200, r.text
        r = running.http.get("/logs/", params={"text": "true", "lines": 5000})
        assert r.status_code == 200, r.text
        assert "This server logs to" in r.text and "Session ID" in r.text, r.text[-2000:]
        assert "another server" not in r.text, r.text[-2000:]
        port = running.url.rsplit(":", 1)[1]
        assert (tmp_path / "app" / "logs" / f"server-{port}.log").stat().st_size > 0
