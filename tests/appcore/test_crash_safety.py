"""What a process killed mid-write (``kill -9``) leaves behind: the datastore's records file, staged files.

The end-to-end check, a real server killed while clients save, is ``test_kill_during_saves.py``;
these are the pieces it found, each on its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from appcore import files
from appcore.datastore import CheckedLocalDatastore
from appcore.files import remove_stale_staged, staged_beside, staging_owner
from tests.conftest import write_nifti

RECORDS = "datastore_v2.json"


def _studies(tmp_path: Path) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir()
    write_nifti(studies / "case1.nii.gz", np.zeros((6, 6, 6), np.float32))
    return studies


def _store(studies: Path, **kwargs: object) -> CheckedLocalDatastore:
    return CheckedLocalDatastore(str(studies), allowed_values=lambda params: {0, 1}, **kwargs)


def _save(store: CheckedLocalDatastore, tmp_path: Path, info: dict) -> None:
    store.save_label("case1", str(write_nifti(tmp_path / "l.nii.gz", np.ones((6, 6, 6), np.uint8))), "final", info)


@pytest.mark.parametrize("content", ["", '{"name": "new-dataset", "objects": {"case1": {"ima', "\0" * 64])
def test_a_records_file_cut_short_is_set_aside_and_the_datastore_rebuilt(tmp_path: Path, content: str) -> None:
    """MONAI Label wrote its records in place: a server killed meanwhile left a cut-off file, and
    the next start failed on it. It is now set aside; the images and labels are found again."""
    studies = _studies(tmp_path)
    _save(_store(studies), tmp_path, {"client_id": "a"})
    (studies / RECORDS).write_text(content)
    again = _store(studies)
    assert again.get_labeled_images("final") == ["case1"]
    assert (studies / f"{RECORDS}.damaged").read_text() == content
    assert "case1" in json.loads((studies / RECORDS).read_text())["objects"], "written anew, whole"


def test_the_records_are_renamed_into_place_never_written_in_it(tmp_path: Path, monkeypatch) -> None:
    """A writer that dies before its rename leaves the previous records whole (and only a staged file)."""
    studies = _studies(tmp_path)
    store = _store(studies)
    _save(store, tmp_path, {"client_id": "first"})
    before = (studies / RECORDS).read_text()

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # the process ends here

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.update_image_info("case1", {"note": "lost"})
    monkeypatch.undo()
    assert (studies / RECORDS).read_text() == before
    assert not [p.name for p in studies.iterdir() if p.name.endswith(".tmp")], "the staged file is removed"
    assert _store(studies).get_label_info("case1", "final")["client_id"] == "first"


def test_another_process_s_records_are_read_by_the_watcher(tmp_path: Path) -> None:
    """Renamed into place, another process's records arrive as a move, not a modification: the
    folder watcher reads them again all the same."""
    studies = _studies(tmp_path)
    watching = _store(studies, auto_reload=True)
    try:
        _store(studies).update_image_info("case1", {"note": "from another process"})
        deadline = time.monotonic() + 60
        while watching.get_image_info("case1").get("note") != "from another process":
            assert time.monotonic() < deadline, "the watcher did not read the other process's records"
            time.sleep(0.2)
    finally:
        watching._observer.stop()


_DIES_WHILE_STAGING = """
import os, sys
from appcore.files import staged_beside
fd, path = staged_beside(sys.argv[1])
os.write(fd, b"half")
print(path, flush=True)
os._exit(0)  # as a process killed before its rename
"""


def test_staged_files_of_ended_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dest = tmp_path / "labels" / "final" / "case1.nii.gz"
    dest.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}
    dead = subprocess.run(
        [sys.executable, "-c", _DIES_WHILE_STAGING, str(dest)], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    fd, live = staged_beside(dest)  # this process's, being written
    os.close(fd)
    staging = dest.parent / f".incoming{staging_owner().replace(str(os.getpid()), dead.split('~')[-2])}abc"
    staging.mkdir()  # a label staging folder of the dead process
    (staging / "case1.nii.gz").write_bytes(b"half")
    other_host = dest.parent / ".case1.nii.gz.~elsewhere~1~0123456789ab.tmp"
    other_host.write_bytes(b"being written on another host")
    unrelated = dest.parent / ".hidden"
    unrelated.write_bytes(b"not ours")
    removed = remove_stale_staged(tmp_path / "labels", recursive=True)
    assert sorted(removed) == sorted([Path(dead), staging])
    assert Path(live).exists() and other_host.exists() and unrelated.exists()
    old = time.time() - files.FOREIGN_STAGED_S - 60
    os.utime(other_host, (old, old))
    assert remove_stale_staged(tmp_path / "labels", recursive=True) == [other_host]
    assert f"~{socket.gethostname()}~{os.getpid()}~" in Path(live).name


def test_a_datastore_sweeps_what_a_killed_save_left(tmp_path: Path) -> None:
    studies = _studies(tmp_path)
    store = _store(studies)
    _save(store, tmp_path, {})
    left = studies / "labels" / "final" / f".incoming~{socket.gethostname()}~999999999~x"
    left.mkdir()
    (left / "case1.nii.gz").write_bytes(b"half")
    assert store.sweep_staged() == 1 and not left.exists()
    assert store.get_labeled_images("final") == ["case1"]


_OTHER_PROCESS = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM audit").fetchone()
conn.close()  # the last connection SQLite can see: it checkpoints and removes the WAL files
"""


def test_a_new_thread_s_connection_keeps_the_process_s_locks_on_the_database(tmp_path: Path) -> None:
    """A connection a new thread opens must not drop the locks the process's other connections
    hold: closing any descriptor of the file drops them (POSIX), and another process's connection
    closing then removed the WAL index under them ("disk I/O error" on every later request)."""
    import threading

    from appcore.projectdb import ProjectDB

    db = ProjectDB(tmp_path / "project.db")
    db.query("SELECT count(*) FROM audit")  # this thread's connection, holding its lock on the WAL index
    opened = threading.Thread(target=lambda: db.query("SELECT 1"))  # another thread's new connection
    opened.start()
    opened.join()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "project.db")], check=True, env=env)
    assert (tmp_path / "project.db-shm").exists(), "another process removed the WAL index this process uses"
    with db.transaction() as c:
        c.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
    assert db.query("SELECT value FROM meta WHERE key = 'k'")[0]["value"] == "v"


def test_connections_opening_a_new_database_at_once_all_get_in(tmp_path: Path) -> None:
    """The first connections to a new database each switch it to WAL, which takes its exclusive lock;
    SQLite answers "database is locked" at once to the others (no busy wait), and a scoring run's
    writers starting together lost their scores that way. Each switch now waits its turn."""
    import threading

    from appcore.projectdb import ProjectDB

    openers, rounds = 12, 120
    for n in range(rounds):
        path = tmp_path / f"project{n}.db"
        start, failed = threading.Barrier(openers), []

        def open_and_write(k: int, path: Path = path, start: threading.Barrier = start, failed: list = failed) -> None:
            db = ProjectDB(path)  # each its own, as each process has
            start.wait()
            try:
                db.set_meta(f"k{k}", "v")
            except Exception as e:  # noqa: BLE001 - what a writer met is the finding
                failed.append(repr(e))

        threads = [threading.Thread(target=open_and_write, args=(k,)) for k in range(openers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failed, f"round {n}: {failed}"
        assert len(ProjectDB(path).query("SELECT key FROM meta WHERE key LIKE 'k%'")) == openers
        assert ProjectDB(path).query("PRAGMA journal_mode")[0][0] == "wal"
