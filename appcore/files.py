"""Files written beside their destination and renamed onto it, with the mode a plain ``open`` gives."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def staged_beside(dest: Path | str, infix: str = "") -> tuple[int, str]:
    """A new, empty temporary file in ``dest``'s folder, to be renamed onto ``dest``: its descriptor
    (open for writing) and its path.

    Its mode is 0666 less the process's umask, as for any file the server writes with ``open``, and
    not ``tempfile.mkstemp``'s 0600: an uploaded image, published weights or a label renamed into place
    are then readable as the studies and app folders' other files are (by a backup, a second service).
    """
    dest = Path(dest)
    while True:
        tmp = dest.parent / f".{dest.name}.{infix}{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:  # 48 random bits: practically never
            continue


def write_json(path: Path | str, obj: object) -> None:
    """Replace ``path`` with ``obj`` as JSON through a temporary file beside it and a rename: a
    reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = staged_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
