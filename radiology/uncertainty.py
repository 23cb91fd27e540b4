"""Uncertainty of a volume under a model: Monte Carlo dropout (predictive entropy, BALD), test-time
augmentation disagreement, and a feature embedding for diversity-aware selection.

One scoring pass computes every measure, so each strategy reuses the same stored scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose

from appcore.networks import bottleneck
from appcore.precision import autocast
from appcore.validation import check_affine, check_infer_memory, check_resampled_size, check_scalar_voxels
from appcore.weights import NewestWeights, load_state_dict
from radiology.ensemble import members_of, spread_over_members
from radiology.modality import wrong_modality
from radiology.spec import ModelSpec
from radiology.transforms import preprocess
from radiology.windows import OVERLAP, infer_window
from strategies.scores import NotForThisModel

_EPS = 1e-8
_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.Dropout3d)


def enable_dropout_only(network: torch.nn.Module) -> None:
    """Eval mode everywhere except dropout layers, which keep sampling masks."""
    network.eval()
    for module in network.modules():
        if isinstance(module, _DROPOUT):
            module.train()


@contextmanager
def dropout_off(network: torch.nn.Module):
    """Temporarily switch dropout layers to eval mode (deterministic passes)."""
    layers = [m for m in network.modules() if isinstance(m, _DROPOUT)]
    modes = [m.training for m in layers]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


_MASK_LEVELS = 1 << 16  # dropout probabilities are rounded to multiples of 1/65536


def _numpy_dropout(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, rng: np.random.Generator
) -> torch.Tensor:
    """Forward hook on an eval-mode dropout layer: apply a mask drawn from ``rng`` (inverted dropout)."""
    x = inputs[0]
    # Element-wise for Dropout; one draw per sample and channel for Dropout2d/3d.
    shape = x.shape if type(module) is torch.nn.Dropout else (*x.shape[:2], *([1] * (x.dim() - 2)))
    drop_below = round(module.p * _MASK_LEVELS)
    drop = torch.from_numpy(rng.integers(0, _MASK_LEVELS, size=shape, dtype=np.uint16) < drop_below)
    return x.masked_fill(drop.to(x.device), 0).mul_(1.0 / (1.0 - module.p))


def torch_seeded_rng() -> np.random.Generator:
    """A NumPy generator for ``numpy_dropout``, seeded from torch's: ``torch.manual_seed`` (and so
    MONAI's ``set_determinism``) still makes a run that uses it reproducible."""
    return np.random.default_rng(int(torch.randint(2**62, ())))


@contextmanager
def numpy_dropout(network: torch.nn.Module, rng: np.random.Generator):
    """Dropout layers in training mode draw their masks from ``rng`` (NumPy's PCG64) instead of torch.

    On the CPU torch's ``bernoulli_`` runs on one thread at about 16 ns per element, and the masks
    were 40% of a hippocampus volume's scoring time; NumPy's bounded integers are about ten times
    faster. Each layer is switched to eval mode (where its own forward is the identity) and a forward
    hook applies the mask; both are undone on exit. Layers with ``p`` 0 or in eval mode are untouched.
    """
    layers = [m for m in network.modules() if isinstance(m, _DROPOUT) and m.training and 0 < m.p < 1]
    hooks = []
    try:
        for m in layers:
            m.eval()
            hooks.append(m.register_forward_hook(partial(_numpy_dropout, rng=rng)))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for m in layers:
            m.train()


@dataclass(frozen=True)
class Augment:
    """A test-time augmentation: ``forward`` changes the input, ``inverse`` maps the output back."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _roll(shift: int) -> Augment:
    dims = (2, 3, 4)
    return Augment(
        f"roll{shift:+d}",
        lambda x: torch.roll(x, (shift,) * 3, dims),
        lambda y: torch.roll(y, (-shift,) * 3, dims),
    )


def _gain(factor: float) -> Augment:
    return Augment(f"gain{factor}", lambda x: x * factor, _identity)


# Mild, label-preserving changes of the kind seen in training (intensity scaling, small shifts).
# Flips are left out on purpose: several labels here depend on side or direction.
TTA_AUGMENTS: tuple[Augment, ...] = (
    Augment("identity", _identity, _identity),
    _roll(2),
    _gain(1.1),
    _roll(-2),
    _gain(0.9),
    Augment("offset+0.1", lambda x: x + 0.1, _identity),
)


def _mutual_information(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean probabilities and expected entropy over the first axis of ``p`` ``[S, B, C, ...]``."""
    mean = p.mean(0)
    expected_entropy = -(p * torch.log(p + _EPS)).sum(2).mean(0).unsqueeze(1)
    return mean, expected_entropy


def mc_window(
    network: torch.nn.Module, samples: int, rng: np.random.Generator | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A window predictor returning ``[mean class probabilities..., expected entropy]`` as channels.

    All ``samples`` passes run as one batch, which is much faster than a loop on CPU and GPU alike.
    With ``rng``, dropout masks come from it (``numpy_dropout``, for the CPU) instead of torch. An
    ensemble's members share the samples out in turn (``spread_over_members``): the samples then
    come from several networks and their dropout, at the cost of ``samples`` passes of one network.
    """

    def predict(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        with numpy_dropout(network, rng) if rng is not None else nullcontext():
            logits = spread_over_members(network, [x] * samples)
        p = torch.softmax(logits.float(), dim=1).reshape(samples, b, *logits.shape[1:])
        return torch.cat(_mutual_information(p), dim=1)

    return predict


def tta_window(
    network: torch.nn.Module, augments: tuple[Augment, ...], features: list[torch.Tensor] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A window predictor over test-time augmentations, dropout off, one batched pass.

    Returns ``[mean class probabilities..., expected entropy]`` across the augmentations. When
    ``features`` is a list, the UNet bottleneck of the un-augmented input, averaged over space, is
    appended to it once per window (the image's embedding for diversity). An ensemble's members
    take the augmentations in turn (``spread_over_members``); the un-augmented input goes through
    member 0, whose bottleneck gives the embedding.
    """
    layer = bottleneck(members_of(network)[0]) if features is not None else None

    def predict(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        captured: list[torch.Tensor] = []
        hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) if layer else None
        try:
            with dropout_off(network):
                logits = spread_over_members(network, [a.forward(x) for a in augments])
        finally:
            if hook:
                hook.remove()
        if captured and features is not None:
            # The identity augmentation comes first: its ``b`` rows are the plain input.
            features.append(captured[0][:b].float().flatten(2).mean(2).mean(0))
        chunks = logits.float().split(b, dim=0)
        p = torch.stack([torch.softmax(a.inverse(c), dim=1) for a, c in zip(augments, chunks, strict=True)])
        return torch.cat(_mutual_information(p), dim=1)

    return predict


def uncertainty_from_outputs(out: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Scores from ``mc_window`` outputs (``[C + 1, ...]``), normalised to ``[0, 1]`` by ``log C``.

    Averaged over the voxels where any foreground class has at least 5% mean probability, so a
    small structure is not drowned by confident background; the whole volume if there are none.
    With ``tta_window`` outputs appended (``[2C + 2, ...]``), ``tta`` is the mutual information
    between the prediction and the augmentation, over the same voxels.
    """
    mean, expected_entropy = out[:num_classes], out[num_classes]
    predictive = -(mean * torch.log(mean + _EPS)).sum(0)
    bald = (predictive - expected_entropy).clamp_min(0)
    region = (1.0 - mean[0]) > 0.05
    if not bool(region.any()):
        region = torch.ones_like(region)
    norm = math.log(num_classes)
    scores = {
        "entropy": float(predictive[region].mean() / norm),
        "bald": float(bald[region].mean() / norm),
        "foreground_fraction": float(region.float().mean()),
    }
    if out.shape[0] >= 2 * (num_classes + 1):
        tta_mean, tta_expected = out[num_classes + 1 : 2 * num_classes + 1], out[2 * num_classes + 1]
        tta_predictive = -(tta_mean * torch.log(tta_mean + _EPS)).sum(0)
        scores["tta"] = float((tta_predictive - tta_expected).clamp_min(0)[region].mean() / norm)
    return scores


class MCDropoutScorer(NewestWeights):
    """Uncertainty of images under the weights a model serves now.

    Args:
        spec: the model.
        weight_paths: candidates oldest first, as for the infer task; the last existing one is used.
        samples: dropout passes per image.
        tta_samples: test-time augmentations per image (0 turns ``tta`` and the embedding off).
        device: ``"cuda"`` or ``"cpu"``; CUDA runs with mixed precision.
        cpu_bf16: on the CPU, run the network in bfloat16 where the CPU computes it natively
            (``appcore.precision``); probabilities and measures are computed in float32.
        others: the app's other served models: an image of another modality that one of them is
            for is skipped as ``NotForThisModel`` (handed out unranked), not as unusable.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weight_paths: list[str],
        *,
        others: Sequence[ModelSpec] = (),
        samples: int = 8,
        tta_samples: int = 4,
        device: str | None = None,
        cpu_bf16: bool = True,
        memory_budget_mb: int | None = None,
    ):
        if not 0 <= tta_samples <= len(TTA_AUGMENTS):
            raise ValueError(f"tta_samples must be between 0 and {len(TTA_AUGMENTS)}, got {tta_samples}")
        self.spec = spec
        self.others = [other for other in others if other.modality != spec.modality]
        self.weight_paths = [Path(p) for p in weight_paths]
        self.samples = samples
        self.augments = TTA_AUGMENTS[:tta_samples]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cpu_bf16 = cpu_bf16
        self.memory_budget_mb = memory_budget_mb
        self._network: torch.nn.Module | None = None
        self._pre = Compose(preprocess(spec, with_label=False))

    def network(self) -> torch.nn.Module:
        if self._network is None:
            network = self.spec.network()
            path = self.weights()
            if path is not None:
                network.load_state_dict(load_state_dict(path))
            self.use_network(network)
        return self._network

    def use_network(self, network: torch.nn.Module) -> None:
        """Score with ``network`` (already holding its weights) instead of loading from disk."""
        enable_dropout_only(network)
        self._network = network.to(self.device)

    def score(self, image_path: str) -> dict[str, Any]:
        self._refuse_what_infer_refuses(image_path)
        load, *rest = self._pre.transforms
        data = load({"image": image_path})
        voxels = torch.as_tensor(data["image"]).numpy()
        why = wrong_modality(voxels, self.spec)
        if why is not None:  # a CT under an MR model is out of distribution: it would top every ranking
            meant_for = [other.name for other in self.others if wrong_modality(voxels, other) is None]
            if meant_for:  # ... but the annotators of another served model still label it
                others = ", ".join(meant_for)
                raise NotForThisModel(f"{why}: strategies rank images for {self.spec.name}; handed out for {others}")
            raise ValueError(f"{why}: strategies rank images for {self.spec.name}")
        image = Compose(rest)(data)["image"]
        if image.ndim != 4:
            raise ValueError(f"not a 3D volume (shape {tuple(image.shape[1:])})")
        if float(image.max()) == float(image.min()):
            # z-scored to zeros: an uncertainty measured here says nothing about the data
            raise ValueError("the image is constant: there is nothing to segment")
        return self.score_tensor(image)

    def _refuse_what_infer_refuses(self, image_path: str) -> None:
        """The 4xx infer gives a NIfTI file whose header it refuses (complex or RGB voxels, an unusable
        affine, a grid too large once resampled or for ``memory_budget_mb``): scoring skips the image
        with that reason and never ranks it. A header that cannot be read is left to the loader to report."""
        if not image_path.endswith((".nii", ".nii.gz")):
            return
        try:
            header = nib.load(image_path)
        except Exception:
            return
        check_scalar_voxels(header, "image")
        if len(header.shape) in (3, 4):
            check_affine(header, "image")
            check_resampled_size(header.shape, header.affine, self.spec.spacing, "image")
            if self.memory_budget_mb is not None:
                spec = self.spec
                check_infer_memory(header, spec.spacing, spec.num_classes, self.memory_budget_mb, "image")

    @torch.no_grad()
    def score_tensor(self, image: torch.Tensor) -> dict[str, Any]:
        """Measures of one pre-processed image ``[1, H, W, D]``.

        Returns ``entropy``, ``bald``, ``foreground_fraction`` and, with test-time augmentation,
        ``tta`` and ``embedding`` (the mean bottleneck features, a list of floats).
        """
        x = image[None].to(self.device)
        network = self.network()
        enable_dropout_only(network)
        features: list[torch.Tensor] = []
        # On the CPU, dropout masks from NumPy; on CUDA torch's own dropout is fast.
        rng = torch_seeded_rng() if self.device.type == "cpu" else None
        mc = mc_window(network, self.samples, rng)
        if self.augments:
            tta = tta_window(network, self.augments, features)

            def predictor(w: torch.Tensor) -> torch.Tensor:
                return torch.cat([mc(w), tta(w)], dim=1)
        else:
            predictor = mc
        with autocast(self.device, cpu_bf16=self.cpu_bf16):
            # The same per-volume window as /infer: fewer, larger windows than the training patch.
            roi = infer_window(
                tuple(x.shape[2:]),
                self.spec.roi_size,
                overlap=OVERLAP,
                max_scale=self.spec.max_window_scale,
                multiple=self.spec.size_multiple,
            )
            out = sliding_window_inference(x, roi, 1, predictor, overlap=OVERLAP, mode="gaussian")
        measures: dict[str, Any] = uncertainty_from_outputs(out[0].float(), self.spec.num_classes)
        if features:
            measures["embedding"] = [round(float(v), 4) for v in torch.stack(features).mean(0).cpu()]
        return measures
