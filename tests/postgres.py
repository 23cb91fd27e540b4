"""A throw-away PostgreSQL server for the tests of ``--conf database_url`` (Debian's ``postgresql`` package).

``postgres_server`` runs ``initdb`` and ``pg_ctl`` on a temporary folder and a free port on
127.0.0.1 (as the ``postgres`` system user when the tests run as root, which PostgreSQL refuses),
and stops it at the end; ``new_database`` makes an empty database on it for one test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port


def _pg_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, or Debian's ``/usr/lib/postgresql/<n>/bin``."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _has_driver() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


PG_BIN = _pg_bin()
requires_postgres = pytest.mark.skipif(
    PG_BIN is None or not _has_driver(),
    reason="PostgreSQL is not installed (Debian's postgresql package: initdb, pg_ctl) or the psycopg driver is "
    "absent (requirements.txt); `make test` installs both",
)


def _as_postgres_user() -> list[str]:
    """PostgreSQL will not run as root: as root, its commands run as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres system user to run PostgreSQL as")
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 and a free port; yields its URL without a database name."""
    assert PG_BIN is not None
    prefix = _as_postgres_user()
    # Not under pytest's tmp_path: its folders are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="pg-test-"))
    data, port = root / "data", free_port()
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    try:
        subprocess.run(
            [*prefix, str(PG_BIN / "initdb"), "-D", str(data), "-U", "test", "--auth=trust", "-E", "UTF8", "--no-sync"],
            **run,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(
            [*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
            **run,
        )
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"PostgreSQL did not start: {e.stdout}\n{e.stderr}") from e
    try:
        yield f"postgresql://test@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], **run)
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A new, empty database on ``server_url``; its URL."""
    import psycopg

    name = f"project_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server_url}/{name}"
