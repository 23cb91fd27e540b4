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


def random_crop(example: Example, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` crop (zero-padded where the image is smaller), flipped and rotated at random."""
    _, h, w = example.input.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    x, t = example.input, example.target
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, ph), (0, pw)), constant_values=1.0)  # white, like empty glass
        t = np.pad(t, ((0, 0), (0, ph), (0, pw)))
    y0 = int(rng.integers(0, x.shape[1] - size + 1))
    x0 = int(rng.integers(0, x.shape[2] - size + 1))
    x, t = x[:, y0 : y0 + size, x0 : x0 + size], t[:, y0 : y0 + size, x0 : x0 + size]
    k = int(rng.integers(0, 4))
    x, t = np.rot90(x, k, axes=(1, 2)), np.rot90(t, k, axes=(1, 2))
    if rng.random() < 0.5:
        x, t = x[:, :, ::-1], t[:, :, ::-1]
    # Stain and scanner variation: per-channel gain and offset, and a global contrast change.
    gain = rng.uniform(0.9, 1.1, size=(3, 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.08, 0.08, size=(3, 1, 1)).astype(np.float32)
    contrast = np.float32(rng.uniform(0.8, 1.2))
    x = np.clip((x * gain + shift) * contrast, -1.0, 1.0)
    return np.ascontiguousarray(x), np.ascontiguousarray(t)


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
) -> list[float]:
    """Train ``network`` in place (AdamW, warm-up then cosine LR); returns the loss per step.

    Progress is the larger of ``step / steps`` and, with ``time_budget_s``, the elapsed share of that
    budget: on a shared CPU the schedule then still anneals to zero when time, not steps, runs out.
    ``on_step(step, loss)`` returning ``True`` stops early (a stop request from the server).
    """
    if not examples:
        raise ValueError("no training examples")
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
        batch = [random_crop(examples[int(rng.integers(len(examples)))], spec.patch, rng) for _ in range(batch_size)]
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
