"""The nuclei network and everything infer, training and post-processing agree on, defined once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet

from appcore.labels import Label, LabelSet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

NUCLEUS = Label("nucleus", 1, (0, 200, 80))
NUCLEI_LABELS = LabelSet((NUCLEUS,))


@dataclass(frozen=True)
class NucleiSpec:
    """The nuclei network: a 2D UNet with two output maps per pixel.

    Channel 0 is the foreground logit (nucleus or not); channel 1 is the logit of the distance to the
    nucleus border, normalised to [0, 1] within each nucleus, whose peaks seed the watershed that
    splits touching nuclei.

    Args:
        channels: feature maps per UNet level.
        strides: downsampling per level (one fewer than ``channels``).
        num_res_units: residual units per level.
        patch: training crop size and inference tile size, in pixels.
        fg_threshold: foreground probability above which a pixel is a nucleus.
        seed_threshold: normalised distance above which a pixel belongs to a watershed seed.
        min_area: smallest nucleus kept, in pixels at the tile's resolution.
        shipped_weights: file name in ``pathology/weights``.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    patch: int = 256
    fg_threshold: float = 0.6
    seed_threshold: float = 0.4
    min_area: int = 12
    shipped_weights: str = "nuclei.pt"

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("need len(strides) == len(channels) - 1")
        if self.patch % self.divisor:
            raise ValueError(f"patch {self.patch} must be divisible by {self.divisor}")

    @property
    def divisor(self) -> int:
        factor = 1
        for s in self.strides:
            factor *= s
        return factor

    @property
    def shipped_weights_path(self) -> Path:
        return WEIGHTS_DIR / self.shipped_weights

    def network(self) -> torch.nn.Module:
        """A fresh, untrained network."""
        return UNet(**self.unet_args())

    def unet_args(self) -> dict[str, Any]:
        """The arguments of MONAI's ``UNet`` (an exported bundle's ``network_def`` has them too)."""
        return {
            "spatial_dims": 2,
            "in_channels": 3,
            "out_channels": 2,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "num_res_units": self.num_res_units,
            "norm": "batch",
        }


NUCLEI = NucleiSpec()
