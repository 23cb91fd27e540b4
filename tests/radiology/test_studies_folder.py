"""What the radiology app takes from a studies folder: NIfTI volumes only, and it says when there are none."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radiology.app import RadiologyApp
from tests.apps import unwatched_app


def _app(root: Path, files: dict[str, bytes | None]) -> RadiologyApp:
    studies = root / "studies"
    studies.mkdir()
    for name, content in files.items():
        if content is None:  # a small real NIfTI volume
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), studies / name)
        else:
            (studies / name).write_bytes(content)
    conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    return unwatched_app(root / "app", studies, conf)


def test_only_nifti_files_are_images(tmp_path: Path) -> None:
    files = {"a.nii.gz": None, "b.nii": None, "photo.jpg": b"\xff\xd8jpeg", "slide.tif": b"II*\x00", "c.nrrd": b"x"}
    assert sorted(_app(tmp_path, files).datastore().list_images()) == ["a", "b"]


def test_a_folder_without_nifti_says_so_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="radiology.app"):
        app = _app(tmp_path, {"IM0001.dcm": b"\x00" * 132 + b"DICM", "IM0002.dcm": b"\x00" * 132 + b"DICM"})
    assert app.datastore().list_images() == []
    (message,) = [r.getMessage() for r in caplog.records if "holds no NIfTI image" in r.getMessage()]
    assert "2 other files (such as IM000" in message and "PACS" in message
