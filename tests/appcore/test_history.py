"""Label history, review states, tombstones and the project database (``appcore.history``, ``appcore.projectdb``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from appcore import history as history_module
from appcore import seam
from appcore.datastore import CheckedLocalDatastore
from appcore.errors import RequestError
from appcore.history import HISTORY_DIR, LabelHistory, Origin, ServedProposals, TrainOn, not_served, sha256_of
from appcore.history_routes import _AuditLog
from appcore.identity import User, current_user
from appcore.projectdb import ProjectDB
from appcore.settings import AppSettings
from strategies.reservations import ReservationBook
from tests.conftest import ROOT, write_nifti

SHAPE = (10, 12, 8)


@pytest.fixture
def history(tmp_path: Path) -> LabelHistory:
    model = tmp_path / "model"
    return LabelHistory(ProjectDB(model / "project.db"), model / HISTORY_DIR)


def _studies(tmp_path: Path, affine: np.ndarray, ids: tuple[str, ...] = ("case1",)) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir(exist_ok=True)
    for i, image_id in enumerate(ids):
        data = np.random.default_rng(i).normal(size=SHAPE).astype(np.float32)
        write_nifti(studies / f"{image_id}.nii.gz", data, affine)
    return studies


@pytest.fixture
def store(tmp_path: Path, oblique_affine: np.ndarray, history: LabelHistory) -> CheckedLocalDatastore:
    studies = _studies(tmp_path, oblique_affine)
    return CheckedLocalDatastore(
        str(studies), allowed_values=lambda params: {0, 1, 2}, max_upload_mb=1, history=history, auto_reload=False
    )


@pytest.fixture
def as_user() -> Iterator:
    """Sets ``appcore.identity.current_user`` as the auth layer does for a request."""
    tokens = []

    def become(name: str) -> None:
        tokens.append(current_user.set(User(name)))

    yield become
    for token in reversed(tokens):
        current_user.reset(token)


def _label(tmp_path: Path, affine: np.ndarray, value: int, name: str = "upload.nii.gz") -> str:
    data = np.zeros(SHAPE, np.uint8)
    data[1 : 2 + value, 2:5, 1:4] = value
    return str(write_nifti(tmp_path / name, data, affine))


def _voxels(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_two_annotators_saving_one_case_keep_both_versions(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, as_user
) -> None:
    as_user("alice")
    store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {"client_id": "slicer"})
    first = _voxels(store.get_label_uri("case1", "final"))
    as_user("bob")
    proposal = {"model": "hippocampus", "version": 3}
    store.save_label("case1", _label(tmp_path, oblique_affine, 2), "final", {"proposal": proposal})

    versions = store.history.versions("case1", "final")
    assert [(v["version"], v["user"], v["origin"]) for v in versions] == [(1, "alice", "save"), (2, "bob", "save")]
    assert versions[0]["client"] == "slicer" and versions[1]["proposal"] == proposal
    assert all(v["review"]["state"] == "submitted" for v in versions)
    np.testing.assert_array_equal(_voxels(store.history.file("case1", "final", 1)), first)
    assert sha256_of(store.history.file("case1", "final", 2)) == sha256_of(store.get_label_uri("case1", "final"))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> ServedProposals:
    """A fresh record of the proposals served, so that no other test's infers are in it."""
    fresh = ServedProposals(keep=3)
    monkeypatch.setattr(history_module, "SERVED", fresh)
    return fresh


def test_a_save_naming_no_proposal_records_the_last_one_served_to_its_user(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, as_user, served: ServedProposals
) -> None:
    """3D Slicer's module and OHIF's Export name no proposal: the version says which infer the
    server last served its user for that image, and that the server (not the client) said so."""
    served.note("case1", "hippocampus", 2, who=User("alice"))
    served.note("case1", "hippocampus", 3, who=User("alice"))  # the last one counts
    served.note("case1", "organs_ct", 7, who=User("carol"))  # another user's infer is not alice's
    as_user("alice")
    store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {"client_id": "slicer"})
    as_user("bob")  # was served nothing
    store.save_label("case1", _label(tmp_path, oblique_affine, 2), "final", {})
    as_user("carol")  # names its own: the client's word is kept
    mine = {"model": "hippocampus", "version": 1}
    store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {"proposal": mine})

    alice, bob, carol = store.history.versions("case1", "final")
    assert (alice["proposal"], alice["proposal_from"]) == ({"model": "hippocampus", "version": 3}, "server")
    assert (bob["proposal"], bob["proposal_from"]) == (None, None)
    assert (carol["proposal"], carol["proposal_from"]) == (mine, "client")


def test_a_client_cannot_claim_the_server_noted_its_proposal(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, as_user, served: ServedProposals
) -> None:
    as_user("alice")
    proposal = {"model": "hippocampus", "version": 1}
    store.save_label(
        "case1", _label(tmp_path, oblique_affine, 1), "final", {"proposal": proposal, "proposal_from": "server"}
    )
    (version,) = store.history.versions("case1", "final")
    assert (version["proposal"], version["proposal_from"]) == (proposal, "client")
    assert "proposal_from" not in version["info"]


def test_proposals_computed_ahead_are_not_served_and_the_record_is_bounded(served: ServedProposals) -> None:
    alice = User("alice")
    with not_served():
        served.note("a", "hippocampus", 1, who=alice)
    assert served.last("a", alice) is None
    for image in ("a", "b", "c", "d"):  # keep=3: the oldest pair goes
        served.note(image, "hippocampus", 4, who=alice)
    assert served.last("a", alice) is None and served.last("d", alice) == ("hippocampus", 4)


def test_restore_is_a_save_of_the_old_version(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, as_user
) -> None:
    as_user("alice")
    store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {"model": "m1"})
    store.save_label("case1", _label(tmp_path, oblique_affine, 2), "final", {})
    as_user("carol")
    restored = store.restore_label("case1", "final", 1)
    assert (restored["version"], restored["origin"], restored["restored_from"], restored["user"]) == (
        3,
        "restore",
        1,
        "carol",
    )
    np.testing.assert_array_equal(
        _voxels(store.get_label_uri("case1", "final")), _voxels(store.history.file("case1", "final", 1))
    )
    assert store.get_label_info("case1", "final")["model"] == "m1"  # the version's save parameters too


@pytest.mark.parametrize(
    ("call", "status", "match"),
    [
        (lambda s: s.restore_label("case1", "final", 9), 404, r"has no version 9; versions kept: \[1\]"),
        (lambda s: s.restore_label("nope", "final", 1), 404, "not in the datastore"),
        (lambda s: s.restore_removed("case1", "final"), 404, "No removal of the 'final' label"),
        (lambda s: s.restore_removed("case1"), 404, "No removal of image 'case1'"),
        (lambda s: s.restore_removed("../x"), 400, "Image id"),
        (lambda s: s.history.review("case1", "final", 1, "maybe"), 422, r"one of \['approved', 'rejected'\]"),
        (lambda s: s.history.review("case1", "final", 5, "approved"), 404, "has no version 5"),
        (lambda s: s.history.review("case1", "other", None, "approved"), 404, "no version to review"),
        (lambda s: s.history.file("case1", "final", 2), 404, "has no version 2"),
    ],
)
def test_history_refusals(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, call, status: int, match: str
) -> None:
    store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {})
    with pytest.raises(RequestError, match=match) as e:
        call(store)
    assert e.value.status_code == status


@pytest.mark.parametrize(
    ("proposal", "match"),
    [
        ("hippocampus", "got 'hippocampus'"),
        ({"model": 3}, "its model is 3"),
        ({"version": -1}, "its version is -1"),
        ({"version": True}, "its version is True"),
        ({"model": "x", "weights": 1}, "got"),
    ],
)
def test_a_malformed_proposal_is_refused_before_anything_is_stored(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, proposal: object, match: str
) -> None:
    with pytest.raises(RequestError, match=match) as e:
        store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {"proposal": proposal})
    assert e.value.status_code == 422
    assert store.history.versions("case1", "final") == [] and store.get_label_uri("case1", "final") == ""


def test_removed_label_and_image_come_back_from_their_tombstones(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, as_user
) -> None:
    as_user("alice")
    store.save_label("case1", _label(tmp_path, oblique_affine, 2), "final", {})
    saved = _voxels(store.get_label_uri("case1", "final"))
    image_bytes = Path(store.get_image_uri("case1")).read_bytes()
    as_user("admin")
    store.remove_label("case1", "final")
    assert store.get_label_uri("case1", "final") == ""
    [tomb] = store.history.tombstones("case1")
    assert (tomb["kind"], tomb["tag"], tomb["version"], tomb["user"]) == ("label", "final", 1, "admin")
    store.restore_removed("case1", "final")
    np.testing.assert_array_equal(_voxels(store.get_label_uri("case1", "final")), saved)
    assert store.history.tombstones("case1") == [] and store.history.tombstones("case1", restored=True)[0]["restored"]

    store.remove_image("case1")
    assert "case1" not in store.list_images()
    with pytest.raises(RequestError, match="No removal of image 'other'"):
        store.restore_removed("other")
    answer = store.restore_removed("case1")
    assert answer == {"image": "case1", "labels": {"final": 3}}  # restored as a new version
    assert Path(store.get_image_uri("case1")).read_bytes() == image_bytes
    np.testing.assert_array_equal(_voxels(store.get_label_uri("case1", "final")), saved)


def test_an_image_uploaded_again_is_not_overwritten_by_a_restore(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray
) -> None:
    upload = tmp_path / "again.nii.gz"
    upload.write_bytes(Path(store.get_image_uri("case1")).read_bytes())
    store.remove_image("case1")
    store.add_image("case1", str(upload), {})
    with pytest.raises(RequestError, match="exists again") as e:
        store.restore_removed("case1")
    assert e.value.status_code == 409


@pytest.mark.parametrize(
    ("decisions", "train_on", "left_out"),
    [
        ([], TrainOn.submitted, None),
        ([], TrainOn.approved, "its current version 1 is submitted, not approved"),
        ([(1, "approved")], TrainOn.approved, None),
        ([(1, "rejected")], TrainOn.submitted, "its current version 1 was rejected by reviewer: wrong side"),
        ([(1, "rejected"), (1, "approved")], TrainOn.approved, None),
    ],
)
def test_review_decides_what_training_uses(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray, as_user, decisions, train_on, left_out
) -> None:
    store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {})
    as_user("reviewer")
    for version, state in decisions:
        record = store.history.review("case1", "final", version, state, "wrong side" if state == "rejected" else None)
        assert (record["review"]["state"], record["review"]["reviewer"]) == (state, "reviewer")
    reason = store.history.not_for_training("case1", train_on)
    assert reason == left_out if left_out is None else left_out in reason
    assert [r["state"] for r in store.history.reviews("case1", "final")] == [s for _, s in decisions]


def test_a_new_save_needs_a_new_approval(
    store: CheckedLocalDatastore, tmp_path: Path, oblique_affine: np.ndarray
) -> None:
    store.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {})
    store.history.review("case1", "final", None, "approved")
    store.save_label("case1", _label(tmp_path, oblique_affine, 2), "final", {})
    assert "its current version 2 is submitted" in store.history.not_for_training("case1", TrainOn.approved)


@pytest.mark.parametrize(("value", "expected"), [("approved", TrainOn.approved), ("Submitted", TrainOn.submitted)])
def test_train_on_setting(value: str, expected: TrainOn) -> None:
    assert AppSettings.from_conf({"train_on": value}, ["m"]).train_on is expected
    assert AppSettings.from_conf({}, ["m"]).train_on is TrainOn.submitted


def test_train_on_refuses_other_values() -> None:
    with pytest.raises(ValueError, match=r"--conf train_on: expected one of \['submitted', 'approved'\]"):
        AppSettings.from_conf({"train_on": "all"}, ["m"])


def test_labels_saved_before_history_migrate_at_start(
    tmp_path: Path, oblique_affine: np.ndarray, history: LabelHistory
) -> None:
    studies = _studies(tmp_path, oblique_affine, ("case1", "case2"))
    plain = CheckedLocalDatastore(str(studies), allowed_values=lambda p: {0, 1, 2}, auto_reload=False)
    plain.save_label("case1", _label(tmp_path, oblique_affine, 1), "final", {"model": "m"})
    plain.update_label_info("case1", "final", {"user": "dora"})  # MONAI Label's info endpoint records a user
    saved_ts = plain.get_label_info("case1", "final")["ts"]
    seam.local_index(plain).objects["case1"].labels["final"].info["proposal"] = "v3"  # an older client's
    plain._update_datastore_file()

    again = CheckedLocalDatastore(str(studies), allowed_values=lambda p: {0, 1, 2}, history=history, auto_reload=False)
    assert again.take_in_labels() == 1
    [record] = history.versions("case1", "final")
    assert (record["version"], record["origin"], record["user"], record["ts"]) == (1, "migrated", "dora", saved_ts)
    assert record["info"]["model"] == "m" and record["proposal"] is None
    assert again.take_in_labels() == 0  # nothing new on the next start
    # A label written over behind the server's back (or by a process killed before it recorded) is "found".
    Path(again.get_label_uri("case1", "final")).write_bytes(Path(_label(tmp_path, oblique_affine, 2)).read_bytes())
    assert again.take_in_labels() == 1
    assert history.latest("case1", "final")["origin"] == Origin.found


_WRITER = """
import sys, numpy as np, nibabel as nib
from appcore.datastore import CheckedLocalDatastore
from appcore.history import LabelHistory
from appcore.projectdb import ProjectDB
studies, model, affine = sys.argv[1], sys.argv[2], np.array(eval(sys.argv[3]))
store = CheckedLocalDatastore(studies, allowed_values=lambda p: {0, 1, 2}, auto_reload=False,
                              history=LabelHistory(ProjectDB(model + "/project.db"), model + "/label_history"))
i = 0
while True:
    i += 1
    data = np.zeros((10, 12, 8), np.uint8)
    data[i % 10, :, :] = 1 + i % 2
    nib.save(nib.Nifti1Image(data, affine), studies + "/../upload.nii.gz")
    store.save_label("case1", studies + "/../upload.nii.gz", "final", {"n": i})
    print(i, flush=True)
"""


def test_kill_9_during_saves_leaves_every_version_readable(
    tmp_path: Path, oblique_affine: np.ndarray, history: LabelHistory
) -> None:
    studies = _studies(tmp_path, oblique_affine)
    model = history.root.parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", _WRITER, str(studies), str(model), repr(oblique_affine.tolist())]
    rng = np.random.default_rng(0)
    for _ in range(3):  # killed three times, at random moments, each after a few saves
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        saves, deadline = 0, time.monotonic() + 120
        while saves < 3 + int(rng.integers(0, 5)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            saves += bool(proc.stdout.readline())
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    rows = sqlite3.connect(model / "project.db").execute("PRAGMA integrity_check").fetchall()
    assert rows == [("ok",)]
    store = CheckedLocalDatastore(str(studies), allowed_values=lambda p: {0, 1, 2}, history=history, auto_reload=False)
    store.take_in_labels()  # at start: a label stored but not yet recorded when the writer died
    versions = history.versions("case1", "final")
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1)) and len(versions) >= 9
    for v in versions:  # every version's file is there, whole, with the content its row names
        path = history.file("case1", "final", v["version"])
        assert sha256_of(path) == v["sha256"]
        assert _voxels(path).shape == SHAPE
    assert versions[-1]["sha256"] == sha256_of(store.get_label_uri("case1", "final"))


def test_the_database_is_shared_by_threads_and_processes(tmp_path: Path) -> None:
    db = ProjectDB(tmp_path / "project.db")
    assert db.integrity() == "ok"
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    code = (
        "import sys; from appcore.projectdb import ProjectDB; db = ProjectDB(sys.argv[1])\n"
        "for i in range(50):\n"
        "    with db.transaction() as c: c.execute('INSERT INTO meta VALUES (?, ?)', (sys.argv[2] + str(i), 'x'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db.path), name], env=env) for name in ("a", "b", "c")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert db.query("SELECT count(*) FROM meta")[0][0] == 150
    assert json.loads(json.dumps([dict(r) for r in db.query("SELECT * FROM meta LIMIT 1")]))


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_reservations_of_an_older_server_move_into_the_database(tmp_path: Path) -> None:
    clock, path = _Clock(), tmp_path / "model" / "reservations.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"a": [clock.now + 30, "alice"], "b": [clock.now - 1, "bob"]}))  # b's hold ended
    db = ProjectDB(tmp_path / "model" / "project.db")
    book = ReservationBook(60, clock=clock, path=path, db=db)
    assert book.reserved() == {"a": "alice"}
    assert not path.exists() and path.with_name("reservations.json.migrated").exists()
    assert book.pick(["a", "b", "c"], lambda free: free[:1], "carol") == ["b"]
    restarted = ReservationBook(60, clock=clock, path=path, db=ProjectDB(db.path))  # a new server process
    assert restarted.reserved() == {"a": "alice", "b": "carol"}
    clock.now += 31
    assert restarted.pick(["a", "b"], lambda free: free, "dan") == ["a"]
    restarted.release("b")
    assert book.reserved() == {"a": "dan"}


def _asgi_call(app, method: str, path: str, who: str) -> list[dict]:
    scope = {"type": "http", "method": method, "path": path, "query_string": b"image=a&client_id=c1", "headers": []}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        await app({**scope, "who": who}, receive, send)

    asyncio.run(run())
    return sent


@pytest.mark.parametrize(
    ("method", "path", "who", "recorded"),
    [
        ("PUT", "/datastore/label", "alice", ("alice", "c1", 201)),
        ("DELETE", "/datastore/image", "anonymous", ("anonymous", "c1", 200)),
        ("POST", "/refused", "bob", ("anonymous", "c1", 401)),  # refused before the user is known
        ("GET", "/datastore/label", "alice", None),
        ("HEAD", "/datastore/label", "alice", None),
    ],
)
def test_the_audit_layer_records_who_changed_what_and_the_result(
    tmp_path: Path, method: str, path: str, who: str, recorded: tuple | None
) -> None:
    db = ProjectDB(tmp_path / "project.db")

    async def endpoint(scope, receive, send) -> None:
        status = 401 if scope["path"] == "/refused" else 201 if scope["method"] == "PUT" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def auth(scope, receive, send) -> None:  # an auth layer inside, setting the request's user
        if scope["path"] == "/refused":
            return await endpoint(scope, receive, send)
        token = current_user.set(User(scope["who"]))
        try:
            await endpoint(scope, receive, send)
        finally:
            current_user.reset(token)

    _asgi_call(_AuditLog(auth, db), method, path, who)
    rows = [(r["user"], r["client"], r["status"]) for r in db.query("SELECT * FROM audit")]
    assert rows == ([] if recorded is None else [recorded])
    if recorded:
        (entry,) = db.query("SELECT * FROM audit")
        assert (entry["method"], entry["path"], entry["query"]) == (method, path, "image=a&client_id=c1")


def test_a_request_that_fails_is_recorded_as_a_500(tmp_path: Path) -> None:
    db = ProjectDB(tmp_path / "project.db")

    async def failing(scope, receive, send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _asgi_call(_AuditLog(failing, db), "POST", "/train/x", "alice")
    assert [(r["path"], r["status"]) for r in db.query("SELECT * FROM audit")] == [("/train/x", 500)]


def test_a_removal_that_fails_leaves_no_tombstone(store: CheckedLocalDatastore, monkeypatch) -> None:
    from monailabel.datastore.local import LocalDatastore

    def fail(self, image_id: str) -> None:
        raise PermissionError("read-only studies folder")

    monkeypatch.setattr(LocalDatastore, "remove_image", fail)
    with pytest.raises(PermissionError, match="read-only"):
        store.remove_image("case1")
    assert "case1" in store.list_images() and store.history.tombstones("case1") == []
