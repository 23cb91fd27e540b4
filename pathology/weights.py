"""Loading nuclei weights; writing goes through ``appcore.weights.save_weights_atomically``."""

from __future__ import annotations

from pathlib import Path

import torch

from appcore.weights import load_state_dict, save_weights_atomically
from pathology.spec import NucleiSpec

__all__ = ["load_network", "save_weights_atomically"]


def load_network(spec: NucleiSpec, path: str | Path, device: str = "cpu") -> torch.nn.Module:
    network = spec.network()
    network.load_state_dict(load_state_dict(path), strict=True)
    return network.to(device).eval()


def serving_device() -> str:
    """Where the served network runs: the first CUDA device when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
