from __future__ import annotations

from pathlib import Path

import pytest
import torch

from appcore import weights
from appcore.errors import RequestError
from appcore.weights import checked_state_dict, load_state_dict, save_weights_atomically


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


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))


def _saved(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "upload.pt"
    torch.save(obj, path)
    return path


def _state(**change: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**_net().state_dict(), **change}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00garbage", "not a PyTorch checkpoint"),
        ([1, 2], "no state dict"),
        ({"model": {"0.weight": "text"}}, "no state dict"),
        ({k: v for k, v in _state().items() if k != "1.bias"}, "1 of its 4 tensors missing"),
        (_state(extra=torch.zeros(1)), "1 unknown"),
        (_state(**{"0.weight": torch.zeros(2, 1, 5, 5, 5)}), "has shape"),
        (_state(**{"1.weight": torch.tensor([1.0, float("nan")])}), "NaN or infinite"),
        (_state(**{"0.weight": torch.zeros(2, 1, 3, 3, 3, dtype=torch.int64)}), "holds torch.int64 values"),
        ({"model": _state(**{"0.bias": torch.tensor([float("inf"), 0.0])})}, "NaN or infinite"),
    ],
)
def test_weights_that_do_not_fit_the_network_are_a_422(tmp_path: Path, content: object, match: str) -> None:
    if isinstance(content, bytes):
        path = tmp_path / "upload.pt"
        path.write_bytes(content)
    else:
        path = _saved(tmp_path, content)
    with pytest.raises(RequestError, match=match) as e:
        checked_state_dict(path, _net())
    assert e.value.status_code == 422


@pytest.mark.parametrize("nested", [True, False])
def test_fitting_weights_are_returned(tmp_path: Path, nested: bool) -> None:
    state = _state()
    loaded = checked_state_dict(_saved(tmp_path, {"model": state} if nested else state), _net())
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def _members(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {f"members.{i}.{key}": v for i in range(k) for key, v in state.items()}


class _Other(torch.nn.Module):
    """A network with other layers than ``_net``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 1)


class _Pair(torch.nn.Module):
    """Two of ``_net`` side by side, named as an ensemble's members are."""

    def __init__(self) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList([_net(), _net()])


@pytest.mark.parametrize(
    ("network", "content", "match"),
    [
        (
            _Pair,
            _state(),
            "serves 2 networks averaged and the file holds one network: combine 2 networks into one file first",
        ),
        (_net, _members(_state(), 2), "serves one network and the file holds 2 networks averaged: upload one network"),
        (_Pair, _members(_state(), 3), "serves 2 networks averaged and the file holds 3 networks averaged"),
        # Other networks altogether: their count is not the point.
        (_Other, _members(_state(), 2), "for another network"),
        (_Pair, _Other().state_dict(), "for another network"),
    ],
)
def test_one_network_for_an_ensemble_or_the_reverse_is_named(
    tmp_path: Path, network: type, content: dict, match: str
) -> None:
    with pytest.raises(RequestError, match=match) as e:
        checked_state_dict(_saved(tmp_path, content), network())
    assert e.value.status_code == 422
    assert checked_state_dict(_saved(tmp_path, _members(_state(), 2)), _Pair()).keys() == _Pair().state_dict().keys()
