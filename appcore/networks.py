"""Looking inside the networks the apps serve (MONAI UNets)."""

from __future__ import annotations

import torch
from monai.networks.layers import SkipConnection


def bottleneck(network: torch.nn.Module) -> torch.nn.Module | None:
    """The deepest layer of a MONAI UNet (inside its innermost skip connection), or ``None``."""
    skips = [m for m in network.modules() if isinstance(m, SkipConnection)]
    return skips[-1].submodule if skips else None
