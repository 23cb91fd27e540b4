"""The project database on both engines: SQLite (the default) and PostgreSQL (``--conf database_url``).

Every test runs on each engine through the one code path (``appcore.projectdb``); the PostgreSQL
ones run on a server the module starts (``tests/postgres.py``) and are skipped, with the reason,
where PostgreSQL or its driver is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from appcore.history import LabelHistory, Origin, record_request
from appcore.identity import User
from appcore.projectdb import ProjectDB, _pyformat, normal_database_url, project_db, redacted
from appcore.settings import RadiologySettings
from strategies.reservations import ReservationBook
from strategies.scores import Score, ScoreStore
from tests.conftest import ROOT
from tests.postgres import new_database, postgres_server, requires_postgres


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=requires_postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh project database of each engine: a file path, or a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "model" / "project.db")
    return new_database(request.getfixturevalue("pg_server"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _label(path: Path, value: int) -> Path:
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.uint8), np.eye(4)), str(path))
    return path


def test_label_versions_reviews_tombstones_and_audit(target: str, tmp_path: Path) -> None:
    history = LabelHistory(ProjectDB(target), tmp_path / "history")
    alice, bob = User("alice", client="slicer"), User("bob")
    first = history.record("case1", "final", _label(tmp_path / "a.nii.gz", 1), who=alice, info={"proposal": None})
    second = history.record("case1", "final", _label(tmp_path / "b.nii.gz", 2), who=bob, origin=Origin.restore)
    assert (first["version"], first["user"], first["client"]) == (1, "alice", "slicer")
    assert (second["version"], second["user"], second["origin"]) == (2, "bob", "restore")
    assert history.record("case1", "final", tmp_path / "b.nii.gz", who=bob, unless_same=True)["version"] == 2
    assert [v["version"] for v in history.versions("case1", "final")] == [1, 2]
    assert history.file("case1", "final", 1).read_bytes() == (tmp_path / "a.nii.gz").read_bytes()
    assert isinstance(history.latest("case1", "final")["ts"], float)
    tomb = history.tombstone_label("case1", "final", 2)
    assert (tomb["kind"], tomb["version"], tomb["restored"]) == ("label", 2, None)
    image = history.tombstone_image("case1", tmp_path / "a.nii.gz", {"k": "v"}, {"final": 2})
    assert image["info"] == {"info": {"k": "v"}, "labels": {"final": 2}} and image["id"] > tomb["id"]
    assert [t["kind"] for t in history.tombstones("case1")] == ["image", "label"]
    record_request(
        history.db,
        {"ts": time.time(), "user": "alice", "client": None, "method": "PUT", "path": "/x", "query": "a=50%"}
        | {"status": 200, "duration_ms": 1.5},
    )
    [entry] = history.audit(limit=5)
    assert (entry["user"], entry["query"], entry["status"]) == ("alice", "a=50%", 200)
    assert history.audit(limit=5, before=entry["id"]) == []
    assert history.db.integrity() == "ok"


_PICKER = """
import sys
from appcore.projectdb import ProjectDB
from strategies.reservations import ReservationBook
book = ReservationBook(600, db=ProjectDB(sys.argv[1]))
got = []
for _ in range(8):
    got += book.pick([f"img{i}" for i in range(40)], lambda free: free[:1], sys.argv[2])
print(",".join(got))
"""


def test_processes_on_one_database_never_hand_out_one_image_twice(target: str) -> None:
    ProjectDB(target).integrity()  # the schema first: the processes race for the images, not for it
    procs = [
        subprocess.Popen([sys.executable, "-c", _PICKER, target, name], env=_env(), stdout=subprocess.PIPE, text=True)
        for name in ("s1", "s2", "s3")
    ]
    handed = [out.strip().split(",") for out, _ in (p.communicate(timeout=300) for p in procs)]
    every = [image for images in handed for image in images]
    assert [len(images) for images in handed] == [8, 8, 8] and len(set(every)) == 24
    owners = ReservationBook(600, db=ProjectDB(target)).reserved()
    assert {owners[image] for image in handed[1]} == {"s2"}


_SCORER = """
import sys
from appcore.projectdb import ProjectDB
from strategies.scores import Score, ScoreStore
store = ScoreStore(sys.argv[2], db=ProjectDB(sys.argv[1]))
for i in range(20):
    store.update({f"{sys.argv[3]}_{i}": Score(0.5, "v", 0.0, {"embedding": [float(i)] * 4})})
    if i % 4 == 0:
        store.forget(f"{sys.argv[3]}_{i}")
"""


def test_scoring_processes_write_scores_at_once(target: str, tmp_path: Path) -> None:
    path = tmp_path / "scores_hippocampus.json"
    procs = [subprocess.Popen([sys.executable, "-c", _SCORER, target, str(path), name], env=_env()) for name in "pqr"]
    store = ScoreStore(path, db=ProjectDB(target))
    store.set_unusable({"x": "EOFError"})
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert set(store.load()) == {f"{n}_{i}" for n in "pqr" for i in range(20) if i % 4}
    assert store.unusable() == {"x": "EOFError"} and store.embeddings()["p_1"] == [1.0] * 4
    store.update({"nan": Score(float("nan"), "v", 0.0, {})})
    assert np.isnan(ScoreStore(path, db=ProjectDB(target)).load()["nan"].value)


def test_the_schema_is_made_once_and_kept(target: str) -> None:
    first = ProjectDB(target)
    first.set_meta("k", "1")
    first.set_meta("k", "2")  # the upsert
    again = ProjectDB(target)  # a restarted server: its schema is there, nothing is made again
    assert again.meta("k") == "2" and again.meta("absent") is None


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM t WHERE a = ? AND b = ?", "SELECT * FROM t WHERE a = %s AND b = %s"),
        ("INSERT INTO t VALUES (:ts, :user)", "INSERT INTO t VALUES (%(ts)s, %(user)s)"),
        ("SELECT '?', 'a:b', '50%' FROM t WHERE x LIKE ?", "SELECT '?', 'a:b', '50%%' FROM t WHERE x LIKE %s"),
        ('SELECT "user" FROM t WHERE q = ?', 'SELECT "user" FROM t WHERE q = %s'),
    ],
)
def test_placeholders_are_spelt_for_postgresql(sql: str, expected: str) -> None:
    assert _pyformat(sql) == expected


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("mysql://u:secret@h/db", r"scheme 'mysql' is not PostgreSQL's"),
        ("/var/lib/project.db", r"scheme 'none' is not PostgreSQL's"),
        ("postgresql://u:secret@h:5432/", r"names no database"),
        ("postgresql://u:secret@h:5432/project", r"holds a password: .*PGPASSWORD or a password file"),
        ("postgresql://u@h/project?sslmode=require&PassWord=secret", r"holds a password"),
        ("postgresql://u:@h/project", r"holds a password"),  # an empty one too: it belongs in PGPASSWORD
    ],
)
def test_a_database_url_that_is_not_postgresql_is_refused(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        normal_database_url(url)
    assert "secret" not in str(e.value), "the password is not repeated in a message"
    with pytest.raises(ValueError, match=rf"--conf database_url: .*{match}"):
        RadiologySettings.from_conf({"database_url": url}, ["hippocampus"])


def test_database_url_default_and_accepted_values(tmp_path: Path) -> None:
    assert RadiologySettings.from_conf({}, ["hippocampus"]).database_url == ""
    url = "postgresql://u@db.example:5432/project?sslmode=require"
    assert RadiologySettings.from_conf({"database_url": url}, ["hippocampus"]).database_url == url
    assert project_db(tmp_path).path == (tmp_path / "project.db").resolve()
    assert project_db(tmp_path, url).where == url and project_db(tmp_path, url).path is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@db.example:5432/project", "postgresql://u:***@db.example:5432/project"),
        (
            "postgresql://u@h/project?sslmode=require&password=pw",
            "postgresql://u@h/project?sslmode=require&password=***",
        ),
        ("postgresql://u@h/project?dbname=a%20b", "postgresql://u@h/project?dbname=a%20b"),  # nothing to hide: as given
    ],
)
def test_a_password_is_never_shown(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_an_unreachable_database_says_which_and_how(tmp_path: Path) -> None:
    pytest.importorskip("psycopg", reason="the psycopg driver (requirements.txt) is not installed")
    from tests.servers import free_port

    db = ProjectDB(
        f"postgresql://u:secret@127.0.0.1:{free_port()}/project"
    )  # ProjectDB takes it; the option refuses it
    with pytest.raises(RuntimeError, match=r"Cannot connect to the project database postgresql://u:\*\*\*@") as e:
        db.query("SELECT 1")
    assert "--conf database_url" in str(e.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (
            "postgresql://u@127.0.0.1:{port}/project",
            r"Cannot connect to the project database postgresql://u@127\.0\.0\.1",
        ),
        ("postgresql://u:secret@127.0.0.1:{port}/project", r"--conf database_url: .*holds a password"),
    ],
    ids=["unreachable", "password in the URL"],
)
def test_a_server_whose_database_is_unusable_does_not_start(tmp_path: Path, url: str, said: str) -> None:
    """The server stops at start, saying why, instead of answering requests that fail later."""
    pytest.importorskip("psycopg", reason="the psycopg driver (requirements.txt) is not installed")
    from tests.servers import free_port

    studies = tmp_path / "studies"
    studies.mkdir()
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "main.py").write_text((ROOT / "apps" / "radiology" / "main.py").read_text())
    launcher = Path(sys.executable).parent / "monailabel"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(app_dir), "--studies", str(studies), "--host", "127.0.0.1"]
    cmd += ["--port", str(free_port()), "--conf", "models", "hippocampus", "--conf", "score_on_start", "false"]
    cmd += ["--conf", "database_url", url.format(port=free_port())]
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "MONAI_LABEL_TRACKING_ENABLED": "false"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert re.search(said, output), output[-3000:]
    assert "Application startup failed" in output, output[-3000:]
