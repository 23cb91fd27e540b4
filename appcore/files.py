"""Files written beside their destination and renamed onto it, with the mode a plain ``open`` gives.

Every file the server replaces (labels, weights, records, history copies) goes through ``replacing``:
a reader sees the old file or the whole new one, and a process killed mid-write leaves the old one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

# A staged file or folder names the process writing it (host and pid): a start-up sweep
# (``remove_stale_staged``) then removes what a process killed mid-write (``kill -9``) left, and
# never what a live process, here or on another host sharing the folder, is still writing.
_STAGED = re.compile(r"~(?P<host>[^~/]*)~(?P<pid>\d+)~")
# Another host's staged files are removed once this old: its process cannot be asked whether it lives.
FOREIGN_STAGED_S = 24 * 3600.0


def staging_owner() -> str:
    """The part of a staged name that says which process writes it (``~host~pid~``)."""
    return f"~{socket.gethostname().replace('~', '-')}~{os.getpid()}~"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def remove_stale_staged(folder: Path | str, *, recursive: bool = False) -> list[Path]:
    """Remove the staged files and folders in ``folder`` (``staged_beside``, the label staging
    folders) of processes that ended before renaming them into place; returns what was removed."""
    folder, removed, host = Path(folder), [], socket.gethostname().replace("~", "-")
    if not folder.is_dir():
        return removed
    for path in list(folder.rglob(".*") if recursive else folder.glob(".*")):
        match = _STAGED.search(path.name)
        if match is None or not path.name.startswith("."):
            continue
        try:
            if match["host"] == host:
                stale = not _alive(int(match["pid"]))
            else:
                stale = time.time() - path.lstat().st_mtime > FOREIGN_STAGED_S
            if stale:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path)
        except FileNotFoundError:  # removed meanwhile (by its writer's rename, or another sweep)
            continue
    if removed:
        logger.info("Removed %d staged files of writes that never ended in %s", len(removed), folder)
    return removed


def staged_beside(dest: Path | str, infix: str = "") -> tuple[int, str]:
    """A new, empty temporary file in ``dest``'s folder, to be renamed onto ``dest``: its descriptor
    (open for writing) and its path.

    Its mode is 0666 less the process's umask, as for any file the server writes with ``open``, and
    not ``tempfile.mkstemp``'s 0600: an uploaded image, published weights or a label renamed into place
    are then readable as the studies and app folders' other files are (by a backup, a second service).
    """
    dest = Path(dest)
    while True:
        tmp = dest.parent / f".{dest.name}.{infix}{staging_owner()}{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:  # 48 random bits: practically never
            continue


@contextmanager
def replacing(dest: Path | str, mode: str = "wb", *, later_mtime: bool = False) -> Iterator[IO[Any]]:
    """A file open for writing that replaces ``dest`` when the block ends: written beside it, flushed
    to disk, then renamed onto it; removed, leaving ``dest`` as it was, if the block raises.

    Args:
        dest: the file to replace (its folder is created).
        mode: ``"wb"`` or ``"w"``.
        later_mtime: give the new file a modification time later than the one it replaces, even
            within one clock tick: MONAI Label's infer tasks reload weights when ``st_mtime`` changes.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    before = dest.stat().st_mtime_ns if later_mtime and dest.exists() else 0
    fd, staged = staged_beside(dest)
    try:
        with os.fdopen(fd, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if later_mtime:
            stamp = max(time.time_ns(), before + 1_000_000)
            os.utime(staged, ns=(stamp, stamp))
        os.replace(staged, dest)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def copy_replacing(src: Path | str, dest: Path | str, *, later_mtime: bool = False) -> None:
    """``dest`` becomes a copy of ``src`` by one rename (``replacing``)."""
    with replacing(dest, later_mtime=later_mtime) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, 1 << 20)


def write_json(path: Path | str, obj: object) -> None:
    """Replace ``path`` with ``obj`` as JSON (``replacing``)."""
    with replacing(path, "w") as f:
        json.dump(obj, f, indent=1)
