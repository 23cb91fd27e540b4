"""The description of one segmentation model: labels, geometry, intensity handling and network."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet

from appcore.labels import LabelSet
from radiology.ensemble import MeanOfMembers

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class CTWindow:
    """Clip Hounsfield units to ``[low, high]`` and scale them to ``[0, 1]``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if self.high <= self.low:
            raise ValueError(f"CT window needs low < high, got [{self.low}, {self.high}]")


@dataclass(frozen=True)
class ZScore:
    """Normalise each image to zero mean and unit variance (MR, whose intensities have no unit)."""

    nonzero: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything infer, training, validation and scoring need to agree on, defined once per model.

    Args:
        name: the model's name in ``/info``, ``/infer/<name>`` and ``--conf models``.
        description: one line shown to clients.
        labels: the model's classes.
        modality: DICOM modality of the images it is meant for (``"CT"``, ``"MR"``).
        spacing: target voxel spacing in mm, in RAS order; images are resampled to it and back.
        roi_size: training patch and sliding-window size, in voxels at ``spacing``.
        intensity: how raw intensities become network input.
        channels: feature maps per UNet level.
        strides: downsampling per UNet level (one fewer than ``channels``).
        dropout: dropout probability; needed for Monte Carlo dropout uncertainty.
        shipped_weights: file name in ``radiology/weights`` of trained weights, or ``None`` if the
            model starts untrained.
        learning_rate: AdamW learning rate for fine-tuning in the server.
        samples_per_image: random patches drawn per labelled volume and training step.
        max_window_scale: at inference, a sliding window may grow up to this many times ``roi_size``
            per axis when that covers the volume with fewer windows (less work for the same overlap);
            1 keeps the training patch size. See ``radiology.windows.infer_window``.
        flip_axes: RAS axes (0 left-right, 1 posterior-anterior, 2 inferior-superior) along which
            training mirrors patches (each with probability 0.5). Only axes whose mirroring keeps
            every label's meaning may be listed: never left-right for ``organs_ct`` (left and right
            kidney), never anterior-posterior for the hippocampus. Empty for both registered models:
            left-right mirroring of the hippocampus was tried on a GPU and did not help
            (``benchmarks/RESULTS.md``).
        members: how many such UNets the model serves, their class probabilities averaged
            (``radiology.ensemble.MeanOfMembers``); 1 serves a plain UNet. Training in the server
            fine-tunes them together; offline training (``research.radiology.offline``) trains one at a time.
        training_data: what the shipped weights were trained on and its licence (an exported
            bundle's metadata says it); ``None`` for a model that ships no weights.
    """

    name: str
    description: str
    labels: LabelSet
    modality: str
    spacing: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    intensity: CTWindow | ZScore
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    dropout: float = 0.1
    shipped_weights: str | None = None
    learning_rate: float = 1e-3
    samples_per_image: int = 2
    max_window_scale: float = 1.5
    flip_axes: tuple[int, ...] = ()
    members: int = 1
    training_data: str | None = None

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"{self.name}: need len(strides) == len(channels) - 1")
        factor = self.size_multiple
        if any(r % factor for r in self.roi_size):
            raise ValueError(f"{self.name}: roi_size {self.roi_size} must be divisible by {factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")
        if self.max_window_scale < 1.0:
            raise ValueError(f"{self.name}: max_window_scale must be at least 1, got {self.max_window_scale}")
        if any(a not in (0, 1, 2) for a in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ValueError(f"{self.name}: flip_axes must be distinct axes among 0, 1, 2, got {self.flip_axes}")
        if self.members < 1:
            raise ValueError(f"{self.name}: members must be at least 1, got {self.members}")

    @property
    def size_multiple(self) -> int:
        """Every network input side must be a multiple of this (the product of the strides)."""
        return math.prod(self.strides)

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    @property
    def shipped_weights_path(self) -> Path | None:
        return WEIGHTS_DIR / self.shipped_weights if self.shipped_weights else None

    def network(self) -> torch.nn.Module:
        """A fresh, untrained network for this model: one UNet, or ``members`` of them averaged."""
        if self.members > 1:
            return MeanOfMembers([self.unet() for _ in range(self.members)])
        return self.unet()

    def unet(self) -> torch.nn.Module:
        """One fresh, untrained UNet of this model's architecture."""
        return UNet(**self.unet_args())

    def unet_args(self) -> dict[str, Any]:
        """The arguments of MONAI's ``UNet`` for one network of this model (an exported bundle's
        ``network_def`` has them too)."""
        return {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": self.num_classes,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "num_res_units": 2,
            "dropout": self.dropout,
        }
