"""Reading and publishing model weights so that a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_weights_atomically(state_dict: dict[str, Any], path: Path | str) -> Path:
    """Write ``{"model": state_dict}`` to ``path`` through a temporary file in the same folder and a rename.

    ``os.replace`` is atomic on POSIX within one file system, so a reader (the infer task) sees either
    the old file or the complete new one, and a process killed mid-write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"model": {k: v.detach().cpu() for k, v in state_dict.items()}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state_dict(path: Path | str) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("model", checkpoint)
