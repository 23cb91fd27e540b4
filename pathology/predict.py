"""Running the nuclei network on an RGB array of any size and turning its maps into instances."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from appcore.precision import autocast
from pathology.data import to_input
from pathology.postprocess import instances_from_maps
from pathology.spec import NucleiSpec


@dataclass(frozen=True)
class Maps:
    """Per-pixel network output for one image: foreground probability and normalised distance."""

    foreground: np.ndarray
    distance: np.ndarray


def _padded_input(spec: NucleiSpec, rgb: np.ndarray) -> np.ndarray:
    """Network input (3, H', W') for ``rgb``, padded at the bottom and right to the UNet's divisor."""
    h, w = rgb.shape[:2]
    d = spec.divisor
    ph, pw = (-h) % d, (-w) % d
    x = to_input(rgb)
    if ph or pw:
        mode = "reflect" if h > ph and w > pw else "edge"
        x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode=mode)
    return x


@torch.inference_mode()
def predict_maps(network: torch.nn.Module, spec: NucleiSpec, rgb: np.ndarray, *, cpu_bf16: bool = False) -> Maps:
    """The network's maps for ``rgb`` (H, W, 3 uint8), padded by reflection to the UNet's divisor.

    Runs where the network's weights are: on CUDA in mixed precision (float16), on the CPU in
    float32 (the held-out figures were measured so), or bfloat16 with ``cpu_bf16`` where the CPU
    computes it natively. The maps are float32 either way.
    """
    out = _forward(network, _padded_input(spec, rgb)[None], cpu_bf16)[0, :, : rgb.shape[0], : rgb.shape[1]]
    return Maps(out[0], out[1])


@torch.inference_mode()
def foreground_passes(network: torch.nn.Module, spec: NucleiSpec, rgb: np.ndarray, passes: int) -> np.ndarray:
    """Foreground probabilities (passes, H, W) of ``passes`` copies of ``rgb`` run as one batch.

    The copies differ only if the network is stochastic in evaluation mode (Monte Carlo dropout);
    precision as :func:`predict_maps`.
    """
    x = np.repeat(_padded_input(spec, rgb)[None], passes, axis=0)
    return _forward(network, x, False)[:, 0, : rgb.shape[0], : rgb.shape[1]]


def _forward(network: torch.nn.Module, batch: np.ndarray, cpu_bf16: bool) -> np.ndarray:
    network.eval()
    device = next(network.parameters()).device
    with autocast(device, cpu_bf16=cpu_bf16):
        logits = network(torch.from_numpy(batch).to(device))
    return torch.sigmoid(logits.float()).cpu().numpy()


def instances(spec: NucleiSpec, maps: Maps) -> np.ndarray:
    return instances_from_maps(
        maps.foreground,
        maps.distance,
        fg_threshold=spec.fg_threshold,
        seed_threshold=spec.seed_threshold,
        min_area=spec.min_area,
    )


def predict_instances(network: torch.nn.Module, spec: NucleiSpec, rgb: np.ndarray) -> np.ndarray:
    """Instance mask (int32, 0 background, 1..N) of ``rgb``, computed where the network is."""
    return instances(spec, predict_maps(network, spec, rgb))
