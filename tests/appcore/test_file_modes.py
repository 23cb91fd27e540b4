"""Files the server renames into place get the mode a plain ``open`` gives (0666 less the umask),
like the files beside them, and not the 0600 of ``tempfile.mkstemp``."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from appcore.datastore import CheckedLocalDatastore
from appcore.files import staged_beside
from appcore.weights import save_weights_atomically
from strategies.scores import Score, ScoreStore
from tests.conftest import write_nifti


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_what_the_server_writes_has_the_umask_s_mode(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    studies = tmp_path / "studies"
    studies.mkdir()
    write_nifti(studies / "case1.nii.gz", np.zeros((4, 5, 6), np.float32))
    store = CheckedLocalDatastore(str(studies), allowed_values=lambda params: {0, 1})
    upload = write_nifti(tmp_path / "upload.nii.gz", np.ones((4, 5, 6), np.float32))
    store.add_image("case2", str(upload), {})
    assert _mode(store.get_image_uri("case2")) == expected

    weights = save_weights_atomically({"w": torch.zeros(2)}, tmp_path / "model" / "m.pt")
    assert _mode(weights) == expected

    scores = ScoreStore(tmp_path / "model" / "scores.json")
    scores.update({"case1": Score(0.5, "v", 0.0, {})})
    assert _mode(scores.db.path) == expected  # the project database they are kept in

    fd, staged = staged_beside(tmp_path / "x.bin")
    os.close(fd)
    assert _mode(staged) == expected and Path(staged).parent == tmp_path and Path(staged).name.startswith(".x.bin.")
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.endswith(".tmp")]
