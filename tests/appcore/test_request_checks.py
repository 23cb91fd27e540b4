"""The checks ``appcore.app`` adds in front of MONAI Label's endpoints, without a server."""

from __future__ import annotations

import importlib
import json
import re

import pytest

from appcore.app import (
    FORM_JSON_MODULES,
    INFER_FUNCTIONS,
    NAMED_UPLOAD_FUNCTIONS,
    UPLOAD_FUNCTIONS,
    _bad_train_params,
    _removes_uploads_on_error,
)
from appcore.errors import RequestError
from appcore.seam import Kind, apply
from appcore.seam.table import ROWS


def _rebinds(*modules: str) -> list:
    """The table's rebinding rows of MONAI Label's endpoint ``modules``."""
    return [r for r in ROWS if r.kind is Kind.REBIND and r.target.split(":")[0] in modules and not r.when]


def _applied(rows: list) -> list[str]:
    return [o.row.target for o in apply(rows) if o.state == "applied" and o.reason != "already"]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", None),
        (b"{}", None),
        (b'{"max_epochs": 3, "train_batch_size": 2, "val_split": 0.2}', None),
        (b'{"val_split": 0}', None),
        (b"{bad", None),  # FastAPI's own 422 answers malformed JSON
        (b'{"max_epochs": "3"}', "'max_epochs' must be an integer of at least 1, got '3'"),
        (b'{"max_epochs": 0}', "'max_epochs' must be an integer"),
        (b'{"max_epochs": 2.5}', "'max_epochs' must be an integer"),
        (b'{"train_batch_size": true}', "'train_batch_size' must be an integer"),
        (b'{"val_batch_size": null}', "'val_batch_size' must be an integer"),
        (b'{"val_split": 1}', r"'val_split' must be a number in \[0, 1\)"),
        (b'{"val_split": "0.2"}', "'val_split' must be a number"),
        (b'{"device": "gpu0"}', "Training parameter 'device' must be 'cpu', 'cuda' or 'cuda:N'"),
        (b'{"device": "cpu"}', None),
    ],
)
def test_training_parameters(body: bytes, match: str | None) -> None:
    error = _bad_train_params(body)
    if match is None:
        assert error is None
    else:
        assert isinstance(error, RequestError) and error.status_code == 422
        assert re.search(match, error.detail), error.detail


@pytest.fixture
def endpoint_modules(monkeypatch: pytest.MonkeyPatch) -> list:
    modules = [importlib.import_module(name) for name in FORM_JSON_MODULES]
    for module in modules:
        monkeypatch.setattr(module, "json", json)  # restored after the test
    return modules


def test_form_fields_must_be_json_objects(endpoint_modules: list) -> None:
    rows = [r for r in _rebinds(*FORM_JSON_MODULES) if r.target.endswith(":json")]
    assert _applied(rows) == [f"{name}:json" for name in FORM_JSON_MODULES]
    assert _applied(rows) == [], "installing twice is harmless"
    for module in endpoint_modules:
        assert module.json.loads('{"model": "hippocampus"}') == {"model": "hippocampus"}
        assert module.json.dumps({"a": 1}) == '{"a": 1}'
        for text, match in (("{bad", "not valid JSON"), ("[1]", "must be a JSON object, got list"), ("", "not valid")):
            with pytest.raises(RequestError, match=match) as e:
                module.json.loads(text)
            assert e.value.status_code == 422


@pytest.fixture
def endpoint_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    replaced = [*NAMED_UPLOAD_FUNCTIONS, ("monailabel.endpoints.model", "update_model")]
    sessions = [("monailabel.endpoints.session", f) for f in ("get_session", "remove_session")]
    sessions += [(f"monailabel.endpoints.{m}", "status") for m in ("train", "scoring", "batch_infer")]
    sessions += [("monailabel.endpoints.train", "stop")]
    kept = [("monailabel.endpoints.datastore", "download_dataset"), ("monailabel.endpoints.datastore", "datastore")]
    for name, function in [*replaced, *kept, *sessions]:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, function, getattr(module, function))  # restored after the test
    model = importlib.import_module("monailabel.endpoints.model")
    monkeypatch.setattr(model, "delete_model", model.delete_model)
    proxy = importlib.import_module("monailabel.endpoints.proxy")
    monkeypatch.setattr(proxy, "proxy_dicom", proxy.proxy_dicom)


@pytest.mark.usefixtures("endpoint_functions")
def test_infer_with_nothing_to_segment_is_a_422() -> None:
    changed = [
        "monailabel.endpoints.model:update_model",
        "monailabel.endpoints.model:delete_model",
        "monailabel.endpoints.train:stop",
        "monailabel.endpoints.train:run_model",  # a run is signed by the request's user
        "monailabel.endpoints.train:run",
        "monailabel.endpoints.batch_infer:run",  # a batch infer's labels are authored by the request's user
        "monailabel.endpoints.proxy:proxy_dicom",
        *(f"{name}:{function}" for name, function in INFER_FUNCTIONS),
        *(f"{name}:{function}" for name, function in UPLOAD_FUNCTIONS),
        *(f"{name}:{function}" for name, function in NAMED_UPLOAD_FUNCTIONS),
        "monailabel.endpoints.datastore:download_dataset",
        "monailabel.endpoints.datastore:datastore",
        *(f"monailabel.endpoints.{m}:status" for m in ("train", "scoring", "batch_infer")),
        *(f"monailabel.endpoints.session:{f}" for f in ("create_session", "get_session", "remove_session")),
    ]
    rows = [r for r in _rebinds(*{t.split(":")[0] for t in changed}) if not r.target.endswith(":json")]
    # An app made earlier in this process (another test's) may have applied some of them already.
    first = apply(rows)
    assert [o.row.target for o in first if o.state == "applied"] == changed, [(o.row.target, o.state) for o in first]
    assert _applied(rows) == [], "installing twice is harmless"
    for name, function in INFER_FUNCTIONS:
        run = getattr(importlib.import_module(name), function)
        for kwargs in ({}, {"image": "", "session_id": ""}):
            with pytest.raises(RequestError, match="Name what to segment") as e:
                run(None, "nuclei", **kwargs)
            assert e.value.status_code == 422, name


def test_an_upload_saved_by_a_refused_request_is_removed(tmp_path) -> None:
    from fastapi import BackgroundTasks
    from monailabel.utils.others.generic import remove_file

    upload, kept = tmp_path / "upload.nii.gz", tmp_path / "kept.nii.gz"

    def endpoint(background_tasks: BackgroundTasks, image: str, refuse: bool) -> dict:
        """As MONAI Label's: save the upload, queue its removal, then maybe fail."""
        upload.write_bytes(b"scan")
        background_tasks.add_task(remove_file, str(upload))
        background_tasks.add_task(kept.write_bytes, b"not a removal")
        if refuse:
            raise RequestError(422, "refused")
        return {"image": image}

    checked = _removes_uploads_on_error(endpoint)
    tasks = BackgroundTasks()
    assert checked(tasks, "a", refuse=False) == {"image": "a"}
    assert upload.exists() and len(tasks.tasks) == 2, "an answered request leaves the removal to FastAPI"
    tasks = BackgroundTasks()
    with pytest.raises(RequestError):
        checked(tasks, image="a", refuse=True)
    assert not upload.exists()
    assert not kept.exists(), "only the removals are run"


def test_infers_run_at_most_infer_concurrency_at_once() -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from appcore.app import RequestChecks

    running, peak, lock = [0], [0], threading.Lock()

    class Base:
        def infer(self, request, datastore=None):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return {"image": request["image"]}

    class App(RequestChecks, Base):
        settings = SimpleNamespace(infer_concurrency=2)

        def infer_wsi(self, request, datastore=None):  # as the pathology app's: a slot, and infers inside it
            with self._infer_slot():
                return self.infer(request, datastore)

    app = App()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: app.infer({"image": i}), range(8)))
        wsi = list(pool.map(lambda i: app.infer_wsi({"image": i}), range(4)))
    assert [a["image"] for a in answers] == list(range(8)) and len(wsi) == 4
    assert peak[0] == 2, "two at once, never more (and a WSI infer's own infer does not wait for a slot)"
