from __future__ import annotations

from pathlib import Path

import pytest
import torch

from appcore import weights
from appcore.weights import load_state_dict, save_weights_atomically


def test_roundtrip(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0)}
    path = save_weights_atomically(state, tmp_path / "m.pt")
    assert torch.equal(load_state_dict(path)["w"], state["w"])


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_weights_atomically({"w": torch.zeros(2)}, tmp_path / "m.pt")
    before = path.read_bytes()

    def crash(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(weights.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_weights_atomically({"w": torch.ones(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
