"""Weight versions (``appcore.versions``): publish, rollback, pruning, concurrent publishers, and the
``/model`` routes over a real server."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from appcore.errors import RequestError
from appcore.settings import AppSettings
from appcore.versions import SHIPPED, VersionStore, store_beside
from appcore.weights import load_state_dict, save_weights_atomically
from radiology.registry import MODELS
from tests.conftest import HIPPO, requires_shared
from tests.servers import monailabel_server


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def _store(tmp_path: Path, *, keep: int = 5, shipped: bool = True) -> VersionStore:
    ship = tmp_path / "shipped.pt"
    if shipped:
        save_weights_atomically(_weights(0.0), ship)
    return store_beside(tmp_path / "model" / "m.pt", "m", ship if shipped else None, keep=keep)


def _publish(store: VersionStore, value: float, **record: object) -> dict:
    return store.publish(lambda path: save_weights_atomically(_weights(value), path), {"source": "test", **record})


def _served_value(store: VersionStore) -> float | None:
    path = store.published if store.published.exists() else store.shipped
    return None if path is None else float(load_state_dict(path)["w"][0])


def test_a_publish_is_a_served_version_with_its_record(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.served_version() == SHIPPED
    record = _publish(store, 1.0, started_by="ann", parent=0, trained_images=["a", "b"])
    assert record["version"] == 1 and record["replaced"] == 0 and record["parent"] == 0
    assert record["started_by"] == "ann" and record["trained_images"] == ["a", "b"] and record["published_at"]
    assert store.served_version() == 1 and _served_value(store) == 1.0
    assert [(r["version"], r["served"]) for r in store.versions()] == [(0, False), (1, True)]
    assert _publish(store, 2.0)["started_by"] == "anonymous"


def test_rollback_and_back_without_restart(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _publish(store, 1.0)
    _publish(store, 2.0)
    stamps = [store.published.stat().st_mtime_ns]
    for version, value in [(1, 1.0), (SHIPPED, 0.0), (2, 2.0), (1, 1.0)]:
        assert store.serve(version)["served"] is True
        assert store.served_version() == version and _served_value(store) == value
        if store.published.exists():
            stamps.append(store.published.stat().st_mtime_ns)
    # Infer tasks reload on a new modification time: each change has a later one, even within a clock tick.
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert _publish(store, 3.0)["version"] == 3, "numbers are never reused after a rollback"


@pytest.mark.parametrize(
    ("version", "match"),
    [(7, "has no version 7: unknown; versions with weights: \\[0, 1\\]"), (-1, "has no version -1")],
)
def test_an_unknown_version_is_a_404(tmp_path: Path, version: int, match: str) -> None:
    store = _store(tmp_path)
    _publish(store, 1.0)
    with pytest.raises(RequestError, match=match) as caught:
        store.serve(version)
    assert caught.value.status_code == 404
    assert store.served_version() == 1


def test_no_shipped_weights_means_no_version_0(tmp_path: Path) -> None:
    store = _store(tmp_path, shipped=False)
    assert store.served_version() is None and store.versions() == []
    with pytest.raises(RequestError, match="has no weights: no shipped weights and nothing published"):
        store.served_record()
    _publish(store, 1.0)
    with pytest.raises(RequestError, match="has no version 0"):
        store.serve(SHIPPED)


def test_only_the_newest_versions_keep_their_weights(tmp_path: Path) -> None:
    store = _store(tmp_path, keep=2)
    for value in (1.0, 2.0, 3.0):
        _publish(store, value)
    store.serve(2)
    _publish(store, 4.0)  # keeps 3 and 4 (the newest two); 2 was served until now but no longer is
    kept = {r["version"]: r["weights_kept"] for r in store.versions()}
    assert kept == {0: True, 1: False, 2: False, 3: True, 4: True}, "records stay, the shipped weights too"
    with pytest.raises(RequestError, match="its weights were removed \\(only the newest --conf keep_versions"):
        store.serve(1)
    store.serve(3)
    _publish(store, 5.0)
    _publish(store, 6.0)
    assert {r["version"] for r in store.versions() if r["weights_kept"]} == {0, 5, 6}


def test_a_served_old_version_is_not_pruned(tmp_path: Path) -> None:
    store = _store(tmp_path, keep=1)
    _publish(store, 1.0)
    store.serve(1)
    store._prune(served=1)
    assert store.weights_path(1).exists()


def test_published_weights_written_before_versions_are_taken_in(tmp_path: Path) -> None:
    store = _store(tmp_path)
    save_weights_atomically(_weights(9.0), store.published)  # as a server before this change published
    assert store.served_version() is None
    record = store.served_record()
    assert record["version"] == 1 and record["source"] == "found"
    new = _publish(store, 2.0)
    assert new["version"] == 2 and new["replaced"] == 1
    store.serve(1)
    assert _served_value(store) == 9.0


def test_withdraw_serves_the_shipped_weights_and_keeps_the_file(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _publish(store, 1.0)
    assert store.withdraw() == 1
    assert store.served_version() == SHIPPED and not store.published.exists()
    assert len(list(store.published.parent.glob("m.pt.*.deleted"))) == 1
    with pytest.raises(RequestError, match="has no published weights to delete"):
        store.withdraw()
    store.serve(1)  # the withdrawn version can be served again
    assert _served_value(store) == 1.0


def _publish_many(folder: str, start: float, count: int) -> None:
    store = store_beside(Path(folder) / "model" / "m.pt", "m", None, keep=100)
    for i in range(count):
        _publish(store, start + i)


def test_concurrent_publishers_lose_no_version(tmp_path: Path) -> None:
    # A training run (child process) and an upload (the server) publishing at the same moment.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_publish_many, args=(str(tmp_path), base, 6)) for base in (100.0, 200.0)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    store = _store(tmp_path, shipped=False, keep=100)
    versions = store.versions()
    assert [r["version"] for r in versions] == list(range(1, 13))
    values = sorted(float(load_state_dict(store.weights_path(r["version"]))["w"][0]) for r in versions)
    assert values == [*(100.0 + i for i in range(6)), *(200.0 + i for i in range(6))]
    assert store.served_version() == 12 and _served_value(store) == float(
        load_state_dict(store.weights_path(12))["w"][0]
    )


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("1", 1)])
def test_keep_versions_option(value: str, expected: int) -> None:
    assert AppSettings.from_conf({"keep_versions": value}, ["m"]).keep_versions == expected


@pytest.mark.parametrize(("value", "match"), [("0", "must be at least 1"), ("x", "expected an integer")])
def test_keep_versions_option_refused(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=f"--conf keep_versions: {match}"):
        AppSettings.from_conf({"keep_versions": value}, ["m"])


def test_keep_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        _store(tmp_path, keep=0)


def test_a_record_file_is_json_written_whole(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _publish(store, 1.0)
    assert json.loads((store.folder / "1.json").read_text())["version"] == 1
    assert not list(store.folder.glob(".*.tmp")), "no staged file left behind"


# -- over HTTP -------------------------------------------------------------------------------------
CASE = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"


def _wait_idle(client: httpx.Client, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/train/").json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"training still running after {timeout} s")


@requires_shared
def test_versions_rollback_and_export_over_http(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copyfile(CASE, studies / CASE.name)
    conf = {"models": "hippocampus", "score_on_start": "false", "score_after_train": "false", "max_epochs": "1"}
    with monailabel_server(tmp_path, str(studies), conf) as server:
        http, app_dir = server.http, tmp_path / "app"
        published = app_dir / "model" / "hippocampus.pt"
        shipped = MODELS["hippocampus"].shipped_weights_path
        assert shipped is not None
        r = http.get("/model/hippocampus/versions")
        assert r.status_code == 200 and r.json()["served_version"] == 0, r.text
        assert [v["source"] for v in r.json()["versions"]] == ["shipped"]

        # An upload is version 1, started by the request's user (anonymous: authentication is off;
        # client_id names the client only); /info lists it as served.
        upload = {"file": ("w.pt", shipped.read_bytes())}
        r = http.put("/model/hippocampus", params={"client_id": "alice"}, files=upload)
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        info = http.get("/info/").json()["models"]["hippocampus"]
        assert info["served_version"] == 1
        assert [(v["version"], v["source"], v["started_by"], v["served"]) for v in info["versions"]] == [
            (0, "shipped", None, False),
            (1, "upload", "anonymous", True),
        ]
        assert info["versions"][1]["client"] == "alice"

        # Rollback to the shipped weights and back, no restart; infer answers throughout.
        for version in (0, 1, 0):
            r = http.put("/model/hippocampus/serve", params={"version": version})
            assert r.status_code == 200 and r.json()["version"] == version, r.text
            assert published.exists() == (version != 0)
            r = http.post("/infer/hippocampus", params={"image": "hippocampus_001", "output": "image"})
            assert r.status_code == 200, r.text
        assert http.get("/model/hippocampus", params={"format": "raw", "version": 0}).content == shipped.read_bytes()

        # Unknown models, versions and formats.
        for method, path, params, status, words in [
            ("PUT", "/model/hippocampus/serve", {"version": 9}, 404, "has no version 9: unknown; versions with"),
            ("GET", "/model/hippocampus", {"format": "bundle", "version": 9}, 404, "has no version 9"),
            ("GET", "/model/nope/versions", {}, 404, "Unknown model 'nope'; served models: \\['hippocampus'\\]"),
            ("PUT", "/model/nope/serve", {"version": 0}, 404, "Unknown model 'nope'"),
            ("GET", "/model/nope", {"format": "bundle"}, 404, "Unknown model 'nope'"),
            ("GET", "/model/hippocampus", {"format": "onnx"}, 422, "'raw' or 'bundle'"),
        ]:
            r = http.request(method, path, params=params)
            assert r.status_code == status and re.search(words, r.text), (path, params, r.text)

        # A training run: rollback is refused while it runs (not queued); an export meanwhile is of
        # a published version; the run's version records its data, user and starting version.
        label = HIPPO / "labelsTr" / CASE.name
        r = http.put(
            "/datastore/label",
            params={"image": "hippocampus_001", "tag": "final", "params": json.dumps({"model": "hippocampus"})},
            files={"label": (CASE.name, label.read_bytes())},
        )
        assert r.status_code == 200, r.text
        r = http.post("/train/hippocampus", json={"max_epochs": 1, "train_batch_size": 1, "client_id": "bob"})
        assert r.status_code == 200, r.text
        r = http.put("/model/hippocampus/serve", params={"version": 1})
        assert r.status_code == 409 and "refused, not queued" in r.json()["detail"], r.text
        r = http.get("/model/hippocampus", params={"format": "bundle"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
        bundle = zipfile.ZipFile(io.BytesIO(r.content))
        names = set(bundle.namelist())
        for member in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model.ts"):
            assert f"hippocampus/{member}" in names
        metadata = json.loads(bundle.read("hippocampus/configs/metadata.json"))
        assert metadata["served_version"] in (0, 2), "the served version then: the shipped one, or the run's"
        assert _wait_idle(http)["status"] == "DONE"
        r = http.get("/model/hippocampus/versions")
        run = r.json()["versions"][-1]
        assert run["source"] == "training" and run["version"] == 2 and run["served"], r.text
        assert run["started_by"] == "anonymous" and run["parent"] == 0 and run["trained_images"] == ["hippocampus_001"]
        r = http.put("/model/hippocampus/serve", params={"version": 1})
        assert r.status_code == 200, r.text

        # DELETE /model withdraws the published weights as before: the shipped ones are served.
        assert http.delete("/model/hippocampus").status_code == 200
        assert http.get("/model/hippocampus/versions").json()["served_version"] == 0
        assert http.delete("/model/hippocampus").status_code == 404


class _Models:
    """What ``RequestChecks.training_running`` reads of an app: its models and their version stores."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._infers = {"hippocampus": None, "organs_ct": None, "nuclei": None, "nuclick": None}

    def version_store(self, model: str) -> VersionStore:
        published = "nuclei" if model in ("nuclei", "nuclick") else model  # the pathology models share one file
        return store_beside(self.root / f"{published}.pt", model, None)


@pytest.mark.parametrize(
    ("trained", "status", "rolled_back", "refused"),
    [
        ("hippocampus", "RUNNING", "hippocampus", "a training of hippocampus .* is running"),
        ("hippocampus", "SUBMITTED", "hippocampus", "a training of hippocampus .* is submitted"),
        (None, "RUNNING", "organs_ct", "a training of every model"),
        ("nuclick", "RUNNING", "nuclei", "a training of nuclick"),  # the same weights
        ("organs_ct", "RUNNING", "hippocampus", None),  # another model's weights
        ("hippocampus", "DONE", "hippocampus", None),
    ],
)
def test_rollback_is_refused_only_while_its_weights_train(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trained: str | None,
    status: str,
    rolled_back: str,
    refused: str | None,
) -> None:
    from monailabel.utils.async_tasks import utils

    from appcore.app import RequestChecks

    request = {"model": trained} if trained else {}
    task = {"id": "t", "status": status, "request": request, "start_ts": "2026-12-07 10:00:00"}
    monkeypatch.setitem(utils.background_tasks, "train", [task])
    why = RequestChecks.training_running(_Models(tmp_path), rolled_back)  # type: ignore[arg-type]
    assert why is None if refused is None else re.search(refused, why or "")
