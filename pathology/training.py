"""The training loop shared by offline training and the server's trainer: random crops, flips, colour jitter."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from appcore.precision import training_autocast
from pathology.data import targets, to_input
from pathology.spec import NucleiSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training image with precomputed targets."""

    input: np.ndarray  # (3, H, W) float32 network input
    target: np.ndarray  # (2, H, W) float32 foreground and distance

    @classmethod
    def of(cls, rgb: np.ndarray, mask: np.ndarray) -> Example:
        if rgb.shape[:2] != mask.shape:
            raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
        return cls(to_input(rgb), targets(mask))


@dataclass(frozen=True)
class Augment:
    """Random changes of a training crop beyond flips and 90-degree rotations.

    The defaults are the server trainer's (H&E tiles at one magnification); offline training on
    several microscopes widens them.

    Args:
        zoom: range of the zoom factor, sampled log-uniformly (2.0 shows nuclei twice as large).
        gain: range of the per-channel gain.
        shift: largest per-channel offset, in the network's [-1, 1] units.
        contrast: range of the global contrast factor.
        invert: chance of inverting the crop (bright nuclei on dark, as in fluorescence, and back).
        grey: chance of replacing the channels by their mean (greyscale brightfield).
    """

    zoom: tuple[float, float] = (1.0, 1.0)
    gain: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.08
    contrast: tuple[float, float] = (0.8, 1.2)
    invert: float = 0.0
    grey: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be a range 0 < low <= high, got {self.zoom}")
        for name in ("invert", "grey"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """(C, h, w) float32 to (C, size, size), bilinear (antialiased when shrinking)."""
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    shrink = x.shape[1] > size
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)[0].numpy()


def random_crop(
    example: Example, size: int, rng: np.random.Generator, augment: Augment = Augment()
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` crop (padded where the image is smaller), zoomed, flipped, rotated and recoloured.

    With a zoom other than 1 a square of ``size / zoom`` pixels is cut and resized to ``size``; the
    normalised distance target does not depend on scale, so it is resized like the image.
    """
    _, h, w = example.input.shape
    zoom = 1.0
    if augment.zoom != (1.0, 1.0):
        zoom = float(np.exp(rng.uniform(np.log(augment.zoom[0]), np.log(augment.zoom[1]))))
    src = max(int(round(size / zoom)), 8)
    ph, pw = max(src - h, 0), max(src - w, 0)
    x, t = example.input, example.target
    if ph or pw:
        # Pad with the image's own background (white glass for H&E, black for fluorescence).
        fill = np.median(x.reshape(3, -1), axis=1)
        x = np.concatenate(
            [np.pad(x[c : c + 1], ((0, 0), (0, ph), (0, pw)), constant_values=fill[c]) for c in range(3)]
        )
        t = np.pad(t, ((0, 0), (0, ph), (0, pw)))
    y0 = int(rng.integers(0, x.shape[1] - src + 1))
    x0 = int(rng.integers(0, x.shape[2] - src + 1))
    x, t = x[:, y0 : y0 + src, x0 : x0 + src], t[:, y0 : y0 + src, x0 : x0 + src]
    if src != size:
        x, t = _resize(x, size), _resize(t, size)
    k = int(rng.integers(0, 4))
    x, t = np.rot90(x, k, axes=(1, 2)), np.rot90(t, k, axes=(1, 2))
    if rng.random() < 0.5:
        x, t = x[:, :, ::-1], t[:, :, ::-1]
    # Stain and scanner variation: per-channel gain and offset, and a global contrast change.
    gain = rng.uniform(*augment.gain, size=(3, 1, 1)).astype(np.float32)
    shift = rng.uniform(-augment.shift, augment.shift, size=(3, 1, 1)).astype(np.float32)
    contrast = np.float32(rng.uniform(*augment.contrast))
    x = np.clip((x * gain + shift) * contrast, -1.0, 1.0)
    if augment.grey and rng.random() < augment.grey:
        x = np.repeat(x.mean(axis=0, keepdims=True), 3, axis=0)
    if augment.invert and rng.random() < augment.invert:
        x = -x
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(t, dtype=np.float32)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice on foreground, mean squared error on the distance map."""
    fg_logit, dist_logit = logits[:, 0], logits[:, 1]
    fg, dist = target[:, 0], target[:, 1]
    bce = F.binary_cross_entropy_with_logits(fg_logit, fg)
    p = torch.sigmoid(fg_logit)
    soft_dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
    mse = F.mse_loss(torch.sigmoid(dist_logit), dist)
    return bce + soft_dice + 2.0 * mse


def lr_at(progress: float, peak: float, warmup: float = 0.05) -> float:
    """Linear warm-up to ``peak`` over the first ``warmup`` share, then cosine decay to zero."""
    if progress < warmup:
        return peak * (progress + 1e-3) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train_steps(
    network: torch.nn.Module,
    spec: NucleiSpec,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    on_step: Callable[[int, float], bool | None] | None = None,
    log_every: int = 50,
    time_budget_s: float | None = None,
    augment: Augment = Augment(),
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Train ``network`` in place (AdamW, warm-up then cosine LR); returns the loss per step.

    Progress is the larger of ``step / steps`` and, with ``time_budget_s``, the elapsed share of that
    budget: on a shared CPU the schedule then still anneals to zero when time, not steps, runs out.
    ``on_step(step, loss)`` returning ``True`` stops early (a stop request from the server).
    ``weights`` (one per example) make sampling proportional to them instead of uniform, to balance
    sources of different sizes.
    """
    if not examples:
        raise ValueError("no training examples")
    p = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(examples),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights need one finite value >= 0 per example ({len(examples)}), not all 0")
        p = w / w.sum()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    network.to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        progress = (step - 1) / steps
        if time_budget_s:
            progress = max(progress, (time.perf_counter() - start) / time_budget_s)
        if progress >= 1.0:
            logger.info("time budget spent after %d steps", step - 1)
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, lr)
        picks = (
            rng.choice(len(examples), size=batch_size, p=p)
            if p is not None
            else rng.integers(len(examples), size=batch_size)
        )
        batch = [random_crop(examples[int(i)], spec.patch, rng, augment) for i in picks]
        x = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
        t = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
        optimizer.zero_grad(set_to_none=True)
        with training_autocast(device, cpu_bf16=False):  # bfloat16 on CUDA; float32 on the CPU, as measured
            out = network(x)
        loss = loss_fn(out.float(), t)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if step % log_every == 0 or step == steps:
            recent = float(np.mean(losses[-log_every:]))
            logger.info("step %d/%d loss %.4f (%.1f s)", step, steps, recent, time.perf_counter() - start)
        if on_step is not None and on_step(step, losses[-1]):
            logger.info("stopped at step %d", step)
            break
    network.eval()
    return losses
