"""Monte Carlo dropout uncertainty of a volume: predictive entropy and BALD (mutual information)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose

from radiology.spec import ModelSpec
from radiology.transforms import preprocess
from radiology.weights import load_state_dict

_EPS = 1e-8


def enable_dropout_only(network: torch.nn.Module) -> None:
    """Eval mode everywhere except dropout layers, which keep sampling masks."""
    network.eval()
    for module in network.modules():
        if isinstance(module, torch.nn.Dropout | torch.nn.Dropout2d | torch.nn.Dropout3d):
            module.train()


def mc_window(network: torch.nn.Module, samples: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A window predictor returning ``[mean class probabilities..., expected entropy]`` as channels.

    All ``samples`` passes run as one batch, which is much faster than a loop on CPU and GPU alike.
    """

    def predict(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        logits = network(x.repeat(samples, *([1] * (x.dim() - 1))))
        p = torch.softmax(logits.float(), dim=1).reshape(samples, b, *logits.shape[1:])
        mean = p.mean(0)
        expected_entropy = -(p * torch.log(p + _EPS)).sum(2).mean(0, keepdim=False).unsqueeze(1)
        return torch.cat([mean, expected_entropy], dim=1)

    return predict


def uncertainty_from_outputs(out: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Scores from ``mc_window`` outputs (``[C + 1, ...]``), normalised to ``[0, 1]`` by ``log C``.

    Averaged over the voxels where any foreground class has at least 5% mean probability, so a
    small structure is not drowned by confident background; the whole volume if there are none.
    """
    mean, expected_entropy = out[:num_classes], out[num_classes]
    predictive = -(mean * torch.log(mean + _EPS)).sum(0)
    bald = (predictive - expected_entropy).clamp_min(0)
    region = (1.0 - mean[0]) > 0.05
    if not bool(region.any()):
        region = torch.ones_like(region)
    norm = math.log(num_classes)
    return {
        "entropy": float(predictive[region].mean() / norm),
        "bald": float(bald[region].mean() / norm),
        "foreground_fraction": float(region.float().mean()),
    }


class MCDropoutScorer:
    """Uncertainty of images under the weights a model serves now.

    Args:
        spec: the model.
        weight_paths: candidates oldest first, as for the infer task; the last existing one is used.
        samples: dropout passes per image.
        device: ``"cuda"`` or ``"cpu"``; CUDA runs with mixed precision.
    """

    def __init__(self, spec: ModelSpec, weight_paths: list[str], *, samples: int = 8, device: str | None = None):
        self.spec = spec
        self.weight_paths = [Path(p) for p in weight_paths]
        self.samples = samples
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._network: torch.nn.Module | None = None
        self._pre = Compose(preprocess(spec, with_label=False))

    def weights(self) -> Path | None:
        existing = [p for p in self.weight_paths if p.exists()]
        return existing[-1] if existing else None

    def version(self) -> str:
        path = self.weights()
        if path is None:
            return "untrained"
        st = os.stat(path)
        return f"{path.name}:{st.st_mtime_ns}:{st.st_size}"

    def network(self) -> torch.nn.Module:
        if self._network is None:
            network = self.spec.network()
            path = self.weights()
            if path is not None:
                network.load_state_dict(load_state_dict(path))
            enable_dropout_only(network)
            self._network = network.to(self.device)
        return self._network

    @torch.no_grad()
    def score(self, image_path: str) -> dict[str, float]:
        image = self._pre({"image": image_path})["image"][None].to(self.device)
        predictor = mc_window(self.network(), self.samples)
        with torch.autocast("cuda", enabled=self.device.type == "cuda"):
            out = sliding_window_inference(image, self.spec.roi_size, 1, predictor, overlap=0.25, mode="gaussian")
        return uncertainty_from_outputs(out[0].float(), self.spec.num_classes)
