"""Reading and publishing model weights so that a reader never sees a half-written file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from appcore.files import replacing


def save_weights_atomically(state_dict: dict[str, Any], path: Path | str) -> Path:
    """Write ``{"model": state_dict}`` to ``path`` through a temporary file in the same folder and a rename.

    ``os.replace`` is atomic on POSIX within one file system, so a reader (the infer task) sees either
    the old file or the complete new one, and a process killed mid-write leaves the old file intact.
    """
    with replacing(path) as f:
        torch.save({"model": {k: v.detach().cpu() for k, v in state_dict.items()}}, f)
    return path


def load_state_dict(path: Path | str) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("model", checkpoint)


def checked_state_dict(path: Path | str, network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights in ``path`` if they fit ``network`` exactly; a 422 that says why not otherwise.

    Accepted: a ``torch.save`` file of a state dict, bare or under ``"model"`` (as this project
    writes them), read with ``weights_only`` (no code runs), with the network's parameter names
    and shapes, floating-point values where the network has them (any precision), and only finite
    values.
    """
    from appcore.errors import unprocessable

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unprocessable(
            f"The weights are not a PyTorch checkpoint readable without running code ({type(e).__name__})"
        ) from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise unprocessable("The checkpoint holds no state dict: expected {name: tensor}, bare or under 'model'")
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    served, given = _networks_in(expected), _networks_in(state)
    if served != given and _one_network(state) == _one_network(expected):
        if served > 1:
            todo = f"combine {served} networks into one file first (radiology: python -m research.radiology.combine)"
        else:
            todo = "upload one network"
        raise unprocessable(f"The model serves {_count(served)} and the file holds {_count(given)}: {todo}")
    if missing or unexpected:
        raise unprocessable(
            f"The weights are for another network: {len(missing)} of its {len(expected)} tensors missing "
            f"(first {missing[:3]}), {len(unexpected)} unknown (first {unexpected[:3]})"
        )
    for key, want in expected.items():
        if state[key].shape != want.shape:
            raise unprocessable(
                f"The weights are for another network: {key!r} has shape {tuple(state[key].shape)}, "
                f"the served network's {tuple(want.shape)}"
            )
        if want.is_floating_point() and not state[key].is_floating_point():
            raise unprocessable(
                f"The weights are for another network: {key!r} holds {state[key].dtype} values, "
                "the served network's are floating point"
            )
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise unprocessable(f"The weights hold NaN or infinite values (in {key!r})")
    return state


# The keys of an ensemble's weights (``radiology.ensemble.MeanOfMembers``): ``members.<i>.<key>``.
MEMBER_KEY = re.compile(r"^members\.(\d+)\.")


def member_numbers(state: dict[str, Any]) -> set[int]:
    """The member numbers in an ensemble's state dict; empty for a plain network's."""
    return {int(m.group(1)) for key in state if (m := MEMBER_KEY.match(key))}


def _networks_in(state: dict[str, Any]) -> int:
    """How many networks averaged a state dict holds (1 for a plain network)."""
    return len(member_numbers(state)) or 1


def _one_network(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one network of ``state``: member 0's for an ensemble, all for a plain one."""
    prefix = "members.0." if member_numbers(state) else ""
    return {k.removeprefix(prefix): tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}


def _count(networks: int) -> str:
    return "one network" if networks == 1 else f"{networks} networks averaged"


class NewestWeights:
    """Mixin of a scorer reading the newest existing file of ``weight_paths`` (oldest first: the
    shipped weights, then the published ones), and naming it as its scores' version."""

    weight_paths: list[Path]

    def weights(self) -> Path | None:
        existing = [p for p in self.weight_paths if p.exists()]
        return existing[-1] if existing else None

    def version(self) -> str:
        """``<file>:<mtime ns>:<size>`` of the weights scored with (``untrained`` without any)."""
        path = self.weights()
        if path is None:
            return "untrained"
        st = os.stat(path)
        return f"{path.name}:{st.st_mtime_ns}:{st.st_size}"
