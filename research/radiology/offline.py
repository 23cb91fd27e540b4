"""Train a model's shipped weights from an MSD-layout folder: ``python -m research.radiology.offline --help``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DeepSupervisionLoss
from monai.transforms import Compose
from monai.utils import set_determinism

from appcore.weights import save_weights_atomically
from radiology import recipe
from radiology.registry import MODELS
from radiology.spec import ModelSpec
from radiology.transforms import class_index, training_transforms, validation_transforms
from research.radiology.batch_augment import BatchAugment, pad_to
from research.radiology.deep_supervision import DeepSupervision
from research.radiology.splits import Case, msd_cases, split_cases

logger = logging.getLogger(__name__)

DEFAULT_EPOCHS = 150  # of per-sample training, when --epochs is not given

_CALIBRATION_STEPS = 25


def dice_per_class(pred: np.ndarray, truth: np.ndarray, class_ids: tuple[int, ...]) -> dict[int, float]:
    """Dice of each class; a class absent from both volumes counts as 1.0 (nothing to find, nothing found)."""
    scores = {}
    for c in class_ids:
        p, t = pred == c, truth == c
        denom = int(p.sum()) + int(t.sum())
        scores[c] = 1.0 if denom == 0 else 2.0 * float(np.logical_and(p, t).sum()) / denom
    return scores


def _records(cases: list[Case]) -> list[dict[str, str]]:
    return [{"image": str(c.image), "label": str(c.label)} for c in cases]


def amp_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    clip: float | None = None,
) -> torch.Tensor:
    """One optimiser step, under autocast and ``scaler`` on CUDA (both off on the CPU); returns the loss.

    ``clip`` caps the gradients' global norm (after unscaling), as nnU-Net does for its SGD.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(image.device.type, enabled=image.device.type == "cuda"):
        loss = loss_fn(model(image), label)
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    return loss


@torch.inference_mode()
def validate(spec: ModelSpec, model: torch.nn.Module, dataset: CacheDataset, device: torch.device) -> dict[int, float]:
    """Mean Dice per class over ``dataset`` in the model's pre-processed space."""
    model.eval()
    totals = {c: 0.0 for c in spec.labels.ids}
    for item in dataset:
        image = item["image"][None].to(device)
        logits = recipe.validation_window(spec, sw_batch_size=4)(image, model)
        pred = class_index(logits, 1)[0, 0].cpu().numpy()
        truth = item["label"][0].cpu().numpy().round().astype(np.int64)
        for c, d in dice_per_class(pred, truth, spec.labels.ids).items():
            totals[c] += d
    return {c: v / len(dataset) for c, v in totals.items()}


def train(
    spec: ModelSpec,
    train_cases: list[Case],
    val_cases: list[Case],
    *,
    out: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    val_every: int,
    workers: int = 0,
    deadline: float | None = None,
) -> dict:
    """Train from scratch, keep the best validation checkpoint in ``out``; returns the history.

    ``workers`` loader processes run the random augmentation (0: in this process). ``deadline``
    (a ``time.monotonic()`` value) ends training after the epoch that passes it, with a last
    validation; the history then says ``stopped_early``.
    """
    set_determinism(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_ds = CacheDataset(_records(train_cases), Compose(training_transforms(spec)), progress=False)
    val_ds = CacheDataset(_records(val_cases), Compose(validation_transforms(spec)), progress=False)
    loader = DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )

    model = spec.network().to(device)
    optimizer = recipe.optimizer(model.parameters(), lr)
    steps = epochs * math.ceil(len(train_ds) * spec.samples_per_image / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    loss_fn = recipe.loss()
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: dict = {"epochs": [], "best": None, "device": str(device), "stopped_early": False}
    best = -1.0
    for epoch in range(1, epochs + 1):
        model.train()
        start, total, n = time.perf_counter(), 0.0, 0
        for batch in loader:
            loss = amp_step(model, optimizer, scaler, loss_fn, batch["image"].to(device), batch["label"].to(device))
            scheduler.step()
            total, n = total + float(loss), n + 1
        record = {"epoch": epoch, "loss": total / max(n, 1), "seconds": round(time.perf_counter() - start, 2)}
        out_of_time = deadline is not None and time.monotonic() > deadline and epoch < epochs
        if epoch % val_every == 0 or epoch == epochs or out_of_time:
            dice = validate(spec, model, val_ds, device)
            record["val_dice"] = {spec.labels.labels[i].name: round(d, 4) for i, d in enumerate(dice.values())}
            mean = float(np.mean(list(dice.values())))
            record["val_mean_dice"] = round(mean, 4)
            if mean > best:
                best = mean
                save_weights_atomically(model.state_dict(), out)
                history["best"] = record
        history["epochs"].append(record)
        logger.info(json.dumps(record))
        if out_of_time:
            history["stopped_early"] = True
            logger.warning("deadline passed: stopped after epoch %d of %d", epoch, epochs)
            break
    return history


def batched_data(
    spec: ModelSpec, train_cases: list[Case], val_cases: list[Case], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, CacheDataset]:
    """Training volumes and labels pre-processed and padded to ``spec.roi_size`` as two tensors on
    ``device`` (``[N, 1, *roi]``), and the validation cases as a cached dataset."""
    load = Compose(validation_transforms(spec))
    items = [load(r) for r in _records(train_cases)]
    images = pad_to([i["image"].as_tensor() for i in items], spec.roi_size).to(device)
    labels = pad_to([i["label"].as_tensor().round() for i in items], spec.roi_size).to(device)
    return images, labels, CacheDataset(_records(val_cases), load, progress=False)


OPTIMIZERS = ("adamw", "sgd")
SGD_CLIP = 12.0  # nnU-Net's gradient-norm cap for its SGD


def make_optimizer(kind: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``adamw`` (this project's recipe) or ``sgd``: nnU-Net's SGD, Nesterov momentum 0.99, weight decay 3e-5."""
    if kind == "adamw":
        return recipe.optimizer(params, lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")


def make_schedule(
    kind: str, optimizer: torch.optim.Optimizer, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One cycle up to ``lr`` for ``adamw``; nnU-Net's polynomial decay from ``lr`` for ``sgd``."""
    if kind == "sgd":
        for group in optimizer.param_groups:  # a calibration may have left a lower rate there
            group["lr"] = group["initial_lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - min(step, steps) / steps) ** 0.9)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)


def train_batched(
    spec: ModelSpec,
    train_cases: list[Case],
    val_cases: list[Case],
    *,
    out: Path,
    steps: int | None,
    minutes: float | None,
    batch_size: int,
    lr: float,
    seed: int,
    val_every: int,
    augment: BatchAugment,
    deep_supervision: int = 0,
    optimizer_kind: str = "adamw",
) -> dict:
    """Train from scratch with whole volumes kept on the device and augmented a batch at a time.

    For models whose every training volume fits in ``spec.roi_size`` (the hippocampus crops): the
    pre-processed volumes are padded into one tensor on the GPU, and ``augment`` changes a whole
    batch with a few tensor operations, so the network, not per-sample CPU transforms, sets the
    pace. Either ``steps`` is given, or ``minutes``: then the first ``_CALIBRATION_STEPS`` steps are
    timed and the remaining steps sized to fill the time (validation included). The learning rate
    follows one cycle over all steps. ``val_every`` counts steps; the best validation checkpoint
    goes to ``out``, as in ``train``. ``deep_supervision`` > 0 adds a loss on that many coarser
    decoder levels (``research.radiology.deep_supervision``); the weights written are the UNet's alone.
    ``optimizer_kind`` ``sgd`` swaps the AdamW one-cycle recipe for nnU-Net's SGD with polynomial
    decay and gradient clipping (``make_optimizer``, ``make_schedule``).
    """
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps and minutes")
    if not train_cases or not val_cases:
        raise ValueError(
            f"need at least one training and one validation case, got {len(train_cases)} and {len(val_cases)}"
        )
    started = time.monotonic()
    set_determinism(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels, val_ds = batched_data(spec, train_cases, val_cases, device)
    generator = torch.Generator(device=device).manual_seed(seed)

    model = spec.network().to(device)
    trained: torch.nn.Module = model
    loss_fn: torch.nn.Module = recipe.loss()
    if deep_supervision:
        trained = DeepSupervision(model, extra_levels=deep_supervision).to(device)
        # Weights 1, 0.5, 0.25, ... from the finest output down.
        loss_fn = DeepSupervisionLoss(loss_fn, weight_mode="exp")
    optimizer = make_optimizer(optimizer_kind, trained.parameters(), lr)
    clip = SGD_CLIP if optimizer_kind == "sgd" else None
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def step_once() -> torch.Tensor:
        index = torch.randint(len(images), (batch_size,), device=device, generator=generator)
        image, label = augment(images[index], labels[index], generator)
        if deep_supervision:
            label = label.float()  # the loss resizes the label for the coarser outputs: no integer interpolation
        # The loss stays on the device: reading it every step would wait for the GPU each time.
        return amp_step(trained, optimizer, scaler, loss_fn, image, label, clip).detach()

    history: dict = {
        "steps": [],
        "best": None,
        "device": str(device),
        "volumes": len(images),
        "deep_supervision": deep_supervision,
    }
    if steps is None:
        # Calibrate at a low, constant learning rate (a warm-up), then plan the cycle.
        for group in optimizer.param_groups:
            group["lr"] = lr / 25
        trained.train()
        for _ in range(_CALIBRATION_STEPS // 5):
            step_once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.monotonic()
        for _ in range(_CALIBRATION_STEPS):
            step_once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.monotonic() - tick) / _CALIBRATION_STEPS
        left = 60 * minutes - (time.monotonic() - started)
        # Leave room for the validations: one volume's forward pass costs well under one training
        # step of a batch (forward and backward), so two steps per validation volume is ample.
        checks = max(1, 1 + int(left / per_step) // val_every)
        steps = max(val_every, int((left - checks * len(val_ds) * 2 * per_step) / per_step))
        history["calibration"] = {"seconds_per_step": round(per_step, 5), "planned_steps": steps}
        logger.info(json.dumps(history["calibration"]))
    scheduler = make_schedule(optimizer_kind, optimizer, lr, steps)
    history["optimizer"] = optimizer_kind

    best, total, tick = -1.0, torch.zeros((), device=device), time.perf_counter()
    for step in range(1, steps + 1):
        trained.train()
        total += step_once()
        scheduler.step()
        if step % val_every == 0 or step == steps:
            done = step % val_every or val_every
            dice = validate(spec, model, val_ds, device)
            mean = float(np.mean(list(dice.values())))
            record = {
                "step": step,
                "epoch": round(step * batch_size / len(images), 1),
                "loss": float(total) / done,
                "seconds": round(time.perf_counter() - tick, 2),
                "val_dice": {spec.labels.labels[i].name: round(d, 4) for i, d in enumerate(dice.values())},
                "val_mean_dice": round(mean, 4),
            }
            if mean > best:
                best = mean
                save_weights_atomically(model.state_dict(), out)
                history["best"] = record
            history["steps"].append(record)
            logger.info(json.dumps(record))
            total, tick = torch.zeros((), device=device), time.perf_counter()
    save_weights_atomically(model.state_dict(), out.with_suffix(".last.pt"))
    return history


def parse_augment(text: str, *, flip_axes: tuple[int, ...]) -> BatchAugment:
    """``BatchAugment`` with ``flip_axes`` and the ``name=value`` pairs of ``text`` (ranges as ``low:high``)."""
    fields = {f.name for f in dataclasses.fields(BatchAugment)} - {"flip_axes"}
    changes: dict = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = pair.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--augment: expected name=value with a name among {sorted(fields)}, got {pair!r}")
        try:
            changes[name] = tuple(float(v) for v in value.split(":")) if ":" in value else float(value)
        except ValueError:
            raise ValueError(f"--augment: {pair!r}: the value must be a number or a range low:high") from None
    return BatchAugment(flip_axes=flip_axes, **changes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=sorted(MODELS), help="registered model name")
    parser.add_argument("--data", type=Path, required=True, help="MSD-layout folder (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the weights (.pt)")
    parser.add_argument("--epochs", type=int, help=f"epochs of per-sample training (default {DEFAULT_EPOCHS})")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--channels", help="override the model's UNet channels, e.g. 24,48,96,192 (for experiments)")
    parser.add_argument(
        "--flip-axes", help="override the model's mirroring axes, e.g. 0 or '' for none (for experiments)"
    )
    parser.add_argument("--samples-per-image", type=int, help="override the patches drawn per volume and epoch")
    parser.add_argument("--workers", type=int, help="loader processes for augmentation (default 0)")
    parser.add_argument("--deadline-minutes", type=float, help="stop after the epoch that passes this many minutes")
    batched = parser.add_argument_group(
        "batched training",
        "whole volumes on the device, augmented a batch at a time (research.radiology.batch_augment)",
    )
    batched.add_argument("--batched", action="store_true", help="use it (every volume must fit in the patch)")
    batched.add_argument("--steps", type=int, help="optimiser steps (instead of --epochs)")
    batched.add_argument("--minutes", type=float, help="or: as many steps as fit in this time, measured")
    batched.add_argument(
        "--augment",
        default="",
        help="override BatchAugment settings, e.g. 'p_spatial=0.7,rotate=0.5,scale=0.8:1.25'",
    )
    batched.add_argument(
        "--deep-supervision",
        type=int,
        default=0,
        metavar="LEVELS",
        help="also supervise this many coarser decoder levels (training only; the weights stay a plain UNet)",
    )
    batched.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw: AdamW with one cycle up to --lr (the recipe); sgd: nnU-Net's SGD (Nesterov momentum "
        "0.99, polynomial decay from --lr, gradient norm capped at 12)",
    )
    parser.add_argument(
        "--include-val",
        action="store_true",
        help="train on the validation cases too (a final model): validation Dice is then not held out, "
        "so use the last weights (<out>.last.pt with --batched), not the best-by-validation ones",
    )
    args = parser.parse_args(argv)
    if args.batched and (args.steps is None) == (args.minutes is None):
        parser.error("--batched needs exactly one of --steps and --minutes")
    if not args.batched and (
        args.steps is not None
        or args.minutes is not None
        or args.augment
        or args.deep_supervision
        or args.optimizer != "adamw"
    ):
        parser.error(
            "--steps, --minutes, --augment, --optimizer and --deep-supervision apply to --batched training only"
        )
    per_sample_only = {
        "--epochs": args.epochs,
        "--workers": args.workers,
        "--deadline-minutes": args.deadline_minutes,
        "--samples-per-image": args.samples_per_image,
    }
    given = [flag for flag, value in per_sample_only.items() if value is not None]
    if args.batched and given:
        parser.error(f"{', '.join(given)} apply to per-sample training only: --batched takes --steps or --minutes")
    if args.include_val and not args.batched:
        parser.error("--include-val needs --batched: only it writes the last weights, which a final model keeps")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    # One network per run: a model that serves several (``members``) combines separately trained
    # runs with ``python -m research.radiology.combine``.
    spec = dataclasses.replace(MODELS[args.model], members=1)
    if args.channels:
        spec = dataclasses.replace(spec, channels=tuple(int(c) for c in args.channels.split(",")))
    if args.flip_axes is not None:
        spec = dataclasses.replace(spec, flip_axes=tuple(int(a) for a in args.flip_axes.split(",") if a.strip()))
    if args.samples_per_image is not None:
        spec = dataclasses.replace(spec, samples_per_image=args.samples_per_image)
    augment = None
    if args.batched:
        try:
            augment = parse_augment(args.augment, flip_axes=spec.flip_axes)
        except ValueError as error:
            parser.error(str(error))
    deadline = time.monotonic() + 60 * args.deadline_minutes if args.deadline_minutes else None
    split = split_cases(msd_cases(args.data))
    if args.include_val:
        split["train"] = split["train"] + split["val"]
    logger.info("split: %s", {k: len(v) for k, v in split.items()})
    common = {
        "out": args.out,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "val_every": args.val_every,
    }
    if augment is not None:
        history = train_batched(
            spec,
            split["train"],
            split["val"],
            steps=args.steps,
            minutes=args.minutes,
            augment=augment,
            deep_supervision=args.deep_supervision,
            optimizer_kind=args.optimizer,
            **common,
        )
        history["augment"] = dataclasses.asdict(augment)
    else:
        history = train(
            spec,
            split["train"],
            split["val"],
            epochs=DEFAULT_EPOCHS if args.epochs is None else args.epochs,
            workers=0 if args.workers is None else args.workers,
            deadline=deadline,
            **common,
        )
    history["spec"] = {
        "channels": spec.channels,
        "flip_axes": spec.flip_axes,
        "samples_per_image": spec.samples_per_image,
    }
    history["split"] = {k: [c.id for c in v] for k, v in split.items()}
    history["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.with_suffix(".history.json").write_text(json.dumps(history, indent=1))


if __name__ == "__main__":
    main()
