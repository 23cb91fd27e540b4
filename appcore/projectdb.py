"""The project's state in one database: SQLite in the model folder, or PostgreSQL shared by servers.

Label versions, reviews, tombstones, the audit log, reservations and uncertainty scores are kept
here. By default in one SQLite file, ``<model folder>/project.db``; with ``--conf database_url
postgresql://...`` in a PostgreSQL database that several server processes share. One code path
serves both engines: the statements are written once (``?`` and ``:name`` placeholders, ``INSERT
... ON CONFLICT`` upserts, ``RETURNING``), and a thin dialect (``SQLite``, ``Postgres``) says how to
connect, how to take the write lock and how a statement's placeholders are spelt. SQLite in WAL
mode lets the server's request threads, a training child and a scoring child read while
one of them writes, and a process killed with ``kill -9`` leaves the last committed transaction
intact (the WAL is replayed by the next connection). Each thread of each process opens its own
connection (a connection is never shared across threads or inherited over ``fork``), waits up to
``BUSY_TIMEOUT_S`` for another writer, and changes the state inside ``transaction()``
(``BEGIN IMMEDIATE``: the write lock is taken first, so two writers never both read a stale version
number). On PostgreSQL a write transaction takes one transaction-level advisory lock first: writers
are serialized the same way, across every server on the database.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
        "user" TEXT NOT NULL,
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
        state TEXT NOT NULL, "user" TEXT NOT NULL, ts REAL NOT NULL, comment TEXT
    );
    CREATE TABLE tombstones (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,              -- label or image
        image TEXT NOT NULL,
        tag TEXT,                        -- a label's tag
        version INTEGER,                 -- the label version removed
        file TEXT,                       -- an image's kept file, relative to the history folder
        info TEXT NOT NULL DEFAULT '{}', -- an image's info and its labels' versions (JSON)
        "user" TEXT NOT NULL,
        ts REAL NOT NULL,
        restored_ts REAL,
        restored_by TEXT
    );
    CREATE INDEX tombstones_image ON tombstones (image);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        "user" TEXT NOT NULL,
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
    """
    CREATE TABLE scores (
        store TEXT NOT NULL,             -- which ranking: scores_<al_model>, scores_tiles
        image TEXT NOT NULL,
        value REAL,                      -- NULL for NaN (SQLite stores no NaN)
        model_version TEXT NOT NULL,
        ts REAL NOT NULL,                -- when its computation began
        extra TEXT NOT NULL DEFAULT '{}', -- further measures and the embedding (JSON)
        PRIMARY KEY (store, image)
    );
    CREATE TABLE unusable (
        store TEXT NOT NULL,
        image TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (store, image)
    );
    CREATE TABLE score_forgotten (
        store TEXT NOT NULL,
        image TEXT NOT NULL,
        ts REAL NOT NULL,                -- a score begun before this is of another file
        PRIMARY KEY (store, image)
    );
    CREATE TABLE score_changes (
        store TEXT PRIMARY KEY,
        n INTEGER NOT NULL               -- bumped by every change: readers parse the scores again
    );
    """,
    """
    CREATE TABLE out_of_scope (          -- images another served model is for (strategies.scoring)
        store TEXT NOT NULL,
        image TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (store, image)
    );
    """,
)

POSTGRES_SCHEMES = ("postgresql", "postgres")
# The key of the advisory lock every PostgreSQL write transaction takes ("mlpd").
_PG_WRITE_LOCK = 0x6D6C7064


class Dialect(Protocol):
    """What differs between the engines; everything else is one code path."""

    def connect(self) -> Any: ...

    def begin_write(self) -> tuple[str, ...]: ...

    def statement(self, sql: str) -> str: ...

    def ddl(self, sql: str) -> str: ...

    def schema_version(self, conn: Any) -> int: ...

    def set_schema_version(self, conn: Any, version: int) -> None: ...

    def integrity(self, conn: Any) -> str: ...

    def usable(self, conn: Any) -> bool: ...


class SQLite:
    """One file; the write lock is ``BEGIN IMMEDIATE``; statements are written in its own spelling."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Made with the mode any file the server writes has (0666 less the umask), not SQLite's 0644:
        # its WAL files take the same, and a second service (a backup) reads it as it reads the labels.
        # Only when it is absent: closing any descriptor of the file drops every POSIX lock this
        # process holds on it (SQLite's included), and another connection then deleted the WAL
        # index under this process's open ones ("disk I/O error" on every later request).
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):  # another process or thread made it first
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _use_wal(conn)
        # WAL with NORMAL: a commit survives the process being killed (kill -9, the OOM killer) and the
        # file is never corrupted; a power cut may roll back the last commits (a version's file, synced
        # before its row, is then taken in as "found" at the next start). FULL cost 7 ms per commit here.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def begin_write(self) -> tuple[str, ...]:
        return ("BEGIN IMMEDIATE",)

    def statement(self, sql: str) -> str:
        return sql

    def ddl(self, sql: str) -> str:
        return sql

    def schema_version(self, conn: Any) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, conn: Any, version: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(version)}")

    def integrity(self, conn: Any) -> str:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])

    def usable(self, conn: Any) -> bool:
        return True


class Row(dict):
    """A PostgreSQL row read as ``sqlite3.Row`` reads: by column name, or by position."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def _pg_rows(cursor: Any) -> Any:
    names = [c.name for c in cursor.description or ()]
    return lambda values: Row(zip(names, values, strict=True))


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    """``sql`` with SQLite's ``?`` and ``:name`` placeholders as psycopg's ``%s`` and ``%(name)s``
    (and a literal ``%`` doubled); quoted text is left as it is."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(sql):
        ch = sql[i]
        if quote is not None:
            out.append("%%" if ch == "%" else ch)
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        elif ch == ":" and (m := re.match(r":([A-Za-z_]\w*)", sql[i:])) and sql[i - 1 : i] != ":":
            out.append(f"%({m[1]})s")
            i += len(m[0])
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


class Postgres:
    """A PostgreSQL database shared by several servers (``--conf database_url``); needs ``psycopg``.

    Statements are bound on the client (psycopg's ``ClientCursor``), as SQLite binds them, so a
    parameter's type is its value's (``? IS NULL`` works); every connection is in autocommit, and a
    write transaction is ``BEGIN`` and the advisory lock ``_PG_WRITE_LOCK``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self) -> Any:
        try:
            import psycopg
        except ImportError as e:
            raise RuntimeError(
                "--conf database_url postgresql://... needs the psycopg driver, which is not installed: "
                "pip install -r requirements.txt (it pins psycopg[binary])"
            ) from e
        try:
            return psycopg.connect(
                self.url, autocommit=True, cursor_factory=psycopg.ClientCursor, row_factory=_pg_rows, connect_timeout=10
            )
        except psycopg.OperationalError as e:
            where = redacted(self.url)
            raise RuntimeError(f"Cannot connect to the project database {where} (--conf database_url): {e}") from e

    def begin_write(self) -> tuple[str, ...]:
        return ("BEGIN", f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")

    def statement(self, sql: str) -> str:
        return _pyformat(sql)

    def ddl(self, sql: str) -> str:
        sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
        return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)  # PostgreSQL's REAL has 4 bytes: no timestamps

    def schema_version(self, conn: Any) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS project_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM project_schema").fetchone()
        if row is None:
            conn.execute("INSERT INTO project_schema VALUES (0)")
            return 0
        return int(row["version"])

    def set_schema_version(self, conn: Any, version: int) -> None:
        conn.execute("UPDATE project_schema SET version = %s", (version,))

    def integrity(self, conn: Any) -> str:
        return "ok" if conn.execute("SELECT 1 AS one").fetchone()["one"] == 1 else "no answer"

    def usable(self, conn: Any) -> bool:
        return not conn.closed and not conn.broken


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (kept in the file: done once, by its first connection).

    Switching takes the database's exclusive lock, and SQLite answers "database is locked" at once
    (without waiting ``busy_timeout``) when other connections opening the new file at the same time
    hold it: the switch is retried until it is done or ``BUSY_TIMEOUT_S`` has passed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return  # switched, or a file system without WAL kept the mode it had (as before)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def redacted(url: str) -> str:
    """A database URL without its password (for logs and messages)."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and not any(k.lower() == "password" for k, _ in pairs):
        return url
    netloc = parts.netloc if parts.password is None else parts.netloc.replace(f":{parts.password}@", ":***@")
    query = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def is_database_url(target: str | Path) -> bool:
    return isinstance(target, str) and urlsplit(target).scheme in POSTGRES_SCHEMES


def normal_database_url(url: str) -> str:
    """``--conf database_url``: empty (the SQLite file of the model folder) or a PostgreSQL URL.

    The URL holds no password: MONAI Label writes the ``--conf`` values to its log at start
    (``USING:: conf = ...``, and again as it builds the app) and the process list shows them to every
    user of the machine. libpq reads the password from ``PGPASSWORD`` or a password file
    (``~/.pgpass``, ``PGPASSFILE``) instead.

    Raises:
        ValueError: any other scheme, a URL that names no database, or one that holds a password.
    """
    if not url:
        return url
    how = "expected postgresql://user@host:port/database, or nothing for model/project.db"
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ValueError(f"{how}; got {redacted(url)!r}, whose scheme {parts.scheme or 'none'!r} is not PostgreSQL's")
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise ValueError(f"{how}; got {redacted(url)!r}, which names no database")
    if parts.password is not None or any(k.lower() == "password" for k, _ in parse_qsl(parts.query)):
        raise ValueError(
            f"{how}; got {redacted(url)!r}, which holds a password: MONAI Label logs the --conf values and "
            "the process list shows them. Give the URL without it and the password in PGPASSWORD or a "
            "password file (~/.pgpass, or the file PGPASSFILE names), which the PostgreSQL driver reads; "
            "change the password if this URL was used before"
        )
    return url


class Connection:
    """A connection whose statements are written once for both engines (``?`` placeholders)."""

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self.raw = raw
        self._dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """Run one statement; the cursor answers ``fetchone``, ``fetchall`` and iteration."""
        return self.raw.execute(self._dialect.statement(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any] | dict[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            self.raw.cursor().executemany(self._dialect.statement(sql), rows)

    def close(self) -> None:
        self.raw.close()


class ProjectDB:
    """The project database: a connection per thread and process, and its schema brought up to date.

    Args:
        target: the SQLite file (``<model folder>/project.db``; its folder is created), or a
            ``postgresql://user:password@host:port/database`` URL (``--conf database_url``).

    Examples:
        >>> db = ProjectDB(tmp / "project.db")
        >>> with db.transaction() as c:
        ...     c.execute("INSERT INTO meta VALUES ('k', 'v')")
    """

    def __init__(self, target: str | Path) -> None:
        if is_database_url(target):
            self.path: Path | None = None
            self.where = redacted(str(target))
            self.dialect: Dialect = Postgres(str(target))
        else:
            self.path = Path(target)
            self.where = str(self.path)
            self.dialect = SQLite(self.path)
        self._local = threading.local()
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    @property
    def engine(self) -> str:
        return "sqlite" if self.path is not None else "postgresql"

    def connection(self) -> Connection:
        """This thread's connection (a new one in a child process: connections do not survive ``fork``)."""
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid() and self.dialect.usable(held[1].raw):
            return held[1]
        conn = Connection(self.dialect.connect(), self.dialect)
        self._local.held = (os.getpid(), conn)
        self._ensure_schema(conn)
        return conn

    def _ensure_schema(self, conn: Connection) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            for statement in self.dialect.begin_write():  # two processes starting at once: one creates
                conn.raw.execute(statement)
            try:
                version = self.dialect.schema_version(conn.raw)
                for step in range(version, len(_SCHEMA)):
                    # one by one: executescript would commit the transaction first
                    for statement in filter(str.strip, _SCHEMA[step].split(";")):
                        conn.raw.execute(self.dialect.ddl(statement))
                if version != len(_SCHEMA):
                    self.dialect.set_schema_version(conn.raw, len(_SCHEMA))
                conn.raw.execute("COMMIT")
            except BaseException:
                conn.raw.execute("ROLLBACK")
                raise
            self._schema_ready = True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction (the write lock taken first), committed on leaving, rolled back on an error."""
        conn = self.connection()
        for statement in self.dialect.begin_write():
            conn.raw.execute(statement)
        try:
            yield conn
        except BaseException:
            conn.raw.execute("ROLLBACK")
            raise
        conn.raw.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """Rows of one read (a consistent snapshot of the last committed state)."""
        return self.connection().execute(sql, params).fetchall()

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str, conn: Connection | None = None) -> None:
        sql = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        if conn is not None:
            conn.execute(sql, (key, value))
            return
        with self.transaction() as c:
            c.execute(sql, (key, value))

    def integrity(self) -> str:
        """``ok`` for an intact database (SQLite's ``integrity_check``)."""
        return self.dialect.integrity(self.connection().raw)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            held[1].close()
        self._local.held = None


_OPEN: dict[str, ProjectDB] = {}
_OPEN_LOCK = threading.Lock()


def project_db(model_dir: str | Path, database_url: str = "") -> ProjectDB:
    """The project database: ``database_url`` (``--conf database_url``) when given, else the SQLite
    file of the model folder ``model_dir``; one object per database in a process."""
    target = database_url or str((Path(model_dir) / DB_NAME).resolve())
    with _OPEN_LOCK:
        if target not in _OPEN:
            _OPEN[target] = ProjectDB(target)
        return _OPEN[target]
