"""Loading nuclei weights; writing goes through ``radiology.weights.save_weights_atomically``."""

from __future__ import annotations

from pathlib import Path

import torch

from pathology.spec import NucleiSpec
from radiology.weights import load_state_dict, save_weights_atomically

__all__ = ["load_network", "save_weights_atomically"]


def load_network(spec: NucleiSpec, path: str | Path, device: str = "cpu") -> torch.nn.Module:
    network = spec.network()
    network.load_state_dict(load_state_dict(path), strict=True)
    return network.to(device).eval()
