"""The project's state in one SQLite database in the model folder.

Label versions, reviews, tombstones, the audit log and reservations are kept here. SQLite in WAL
mode lets the server's request threads, a training child and a scoring child read while
one of them writes, and a process killed with ``kill -9`` leaves the last committed transaction
intact (the WAL is replayed by the next connection). Each thread of each process opens its own
connection (a connection is never shared across threads or inherited over ``fork``), waits up to
``BUSY_TIMEOUT_S`` for another writer, and changes the state inside ``transaction()``
(``BEGIN IMMEDIATE``: the write lock is taken first, so two writers never both read a stale version
number).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DB_NAME = "project.db"  # in the app's model folder
BUSY_TIMEOUT_S = 30.0

# Each entry brings the schema from version i to i + 1 (``PRAGMA user_version``).
_SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE label_versions (
        image TEXT NOT NULL,
        tag TEXT NOT NULL,
        version INTEGER NOT NULL,
        file TEXT NOT NULL,              -- relative to the history folder
        sha256 TEXT NOT NULL,
        user TEXT NOT NULL,
        client TEXT,
        ts REAL NOT NULL,
        origin TEXT NOT NULL,            -- save, restore, pacs, found, migrated
        restored_from INTEGER,
        proposal_model TEXT,
        proposal_version INTEGER,
        info TEXT NOT NULL DEFAULT '{}', -- the label's save parameters (JSON)
        state TEXT NOT NULL DEFAULT 'submitted',
        reviewer TEXT,
        reviewed_ts REAL,
        comment TEXT,
        PRIMARY KEY (image, tag, version)
    );
    CREATE TABLE reviews (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image TEXT NOT NULL, tag TEXT NOT NULL, version INTEGER NOT NULL,
        state TEXT NOT NULL, user TEXT NOT NULL, ts REAL NOT NULL, comment TEXT
    );
    CREATE TABLE tombstones (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,              -- label or image
        image TEXT NOT NULL,
        tag TEXT,                        -- a label's tag
        version INTEGER,                 -- the label version removed
        file TEXT,                       -- an image's kept file, relative to the history folder
        info TEXT NOT NULL DEFAULT '{}', -- an image's info and its labels' versions (JSON)
        user TEXT NOT NULL,
        ts REAL NOT NULL,
        restored_ts REAL,
        restored_by TEXT
    );
    CREATE INDEX tombstones_image ON tombstones (image);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        user TEXT NOT NULL,
        client TEXT,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        query TEXT NOT NULL,
        status INTEGER NOT NULL,
        duration_ms REAL NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    CREATE TABLE reservations (
        item TEXT PRIMARY KEY,           -- an image id, or a pathology patch
        until REAL NOT NULL,             -- seconds since the epoch
        client TEXT NOT NULL
    );
    """,
)


class ProjectDB:
    """One SQLite file, a connection per thread and process, and its schema brought up to date.

    Args:
        path: the database file (``<model folder>/project.db``); its folder is created.

    Examples:
        >>> db = ProjectDB(tmp / "project.db")
        >>> with db.transaction() as c:
        ...     c.execute("INSERT INTO meta VALUES ('k', 'v')")
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (a new one in a child process: connections do not survive ``fork``)."""
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL with NORMAL: a commit survives the process being killed (kill -9, the OOM killer) and the
        # file is never corrupted; a power cut may roll back the last commits (a version's file, synced
        # before its row, is then taken in as "found" at the next start). FULL cost 7 ms per commit here.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._local.held = (os.getpid(), conn)
        self._ensure_schema(conn)
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            conn.execute("BEGIN IMMEDIATE")  # two processes starting at once: one creates, the other waits
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for step in range(version, len(_SCHEMA)):
                    # one by one: executescript would commit the transaction first
                    for statement in filter(str.strip, _SCHEMA[step].split(";")):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {len(_SCHEMA)}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._schema_ready = True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on leaving, rolled back on an error."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        """Rows of one read (a consistent snapshot of the last committed state)."""
        return self.connection().execute(sql, params).fetchall()

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str, conn: sqlite3.Connection | None = None) -> None:
        sql, params = "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)
        if conn is not None:
            conn.execute(sql, params)
            return
        with self.transaction() as c:
            c.execute(sql, params)

    def integrity(self) -> str:
        """SQLite's ``integrity_check``: ``ok`` for an intact file."""
        return self.query("PRAGMA integrity_check")[0][0]

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            held[1].close()
        self._local.held = None


_OPEN: dict[str, ProjectDB] = {}
_OPEN_LOCK = threading.Lock()


def project_db(model_dir: str | Path) -> ProjectDB:
    """The project database of the model folder ``model_dir``, one object per file in a process."""
    path = str((Path(model_dir) / DB_NAME).resolve())
    with _OPEN_LOCK:
        if path not in _OPEN:
            _OPEN[path] = ProjectDB(path)
        return _OPEN[path]
