"""Train a model's click-conditioned network (``radiology.clicknet``) with simulated clicks, DeepEdit-style.

``python -m research.radiology.clicks_training hippocampus --data ../shared/data/hippocampus_mr
--out work/clicks.pt --minutes 55 --threads 1``

Starts from one member of the automatic model's weights, the guidance channels' first-layer
weights zero (``radiology.clicknet.widen_input``). Each step draws a batch of training volumes
(pre-processed, padded to the model's patch, augmented a batch at a time by
``research.radiology.batch_augment``) and gives each sample clicks:

- with probability ``--no-click`` none at all (so the no-click answer stays the automatic one's);
- otherwise, with probability ``--random-clicks``, 0 to ``--max-initial`` clicks per class drawn
  inside that class (background near the foreground), then 0 to ``--max-iterations`` rounds of
  clicks from the network's own errors, the same number for the whole batch: each round runs the
  network on the clicks so far and adds one click per sample, the standard annotator's (centre of
  the largest wrong region) or, with probability ``--random-error``, a random one in the errors.

The loss (Dice + cross-entropy) is taken on the final clicks; the input layer, whose guidance
weights start at 0, learns ``--input-lr-scale`` times faster. Only the training split is trained
on; the checkpoint is chosen on the validation split, by the mean Dice after 1, 3 and 5 clicks of
the standard annotator (``research.radiology.annotator``) in the model's grid, among the trained
checkpoints (not the starting weights, which ignore clicks). The test split is left
to ``research.radiology.clicks_evaluate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism
from scipy import ndimage

from appcore.precision import training_autocast
from appcore.weights import load_state_dict, save_weights_atomically
from radiology import recipe
from radiology.clicknet import SIGMA, click_network, guidance_maps, member_state, widen_input
from radiology.registry import MODELS
from radiology.spec import ModelSpec
from research.radiology.annotator import (
    mean_foreground_dice,
    random_error_click,
    random_interior_voxel,
    standard_click,
)
from research.radiology.batch_augment import BatchAugment, pad_to
from research.radiology.offline import batched_data
from research.radiology.splits import msd_cases, split_cases

logger = logging.getLogger(__name__)

Points = list[list[tuple[int, int, int]]]  # per class, the clicks of one sample
VALIDATION_CLICKS = (1, 3, 5)
BACKGROUND_BAND = 6  # background clicks are drawn within this many voxels of the foreground


def batch_guidance(points: list[Points], shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    """``[B, C, *shape]`` guidance maps of a batch's clicks."""
    return torch.stack([guidance_maps([torch.tensor(p, dtype=torch.float32) for p in s], shape, sigma) for s in points])


def initial_clicks(label: np.ndarray, classes: int, most: int, rng: np.random.Generator) -> Points:
    """0 to ``most`` clicks per class, inside the class; background ones near the foreground."""
    points: Points = [[] for _ in range(classes)]
    foreground = label > 0
    band = ndimage.binary_dilation(foreground, iterations=BACKGROUND_BAND) & ~foreground
    for c in range(classes):
        mask = band if c == 0 else label == c
        for _ in range(int(rng.integers(0, most + 1))):
            voxel = random_interior_voxel(mask, rng)
            if voxel is not None:
                points[c].append(voxel)
    return points


@torch.inference_mode()
def predict(network: torch.nn.Module, image: torch.Tensor, points: list[Points], sigma: float) -> np.ndarray:
    """Class maps ``[B, *spatial]`` of the network for a batch and its clicks (eval mode, bfloat16
    where native)."""
    was_training = network.training
    network.eval()
    x = torch.cat([image, batch_guidance(points, tuple(image.shape[2:]), sigma)], dim=1)
    with training_autocast(image.device):
        logits = network(x)
    network.train(was_training)
    return logits.float().argmax(1).cpu().numpy()


def simulate(
    network: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    classes: int,
    rng: np.random.Generator,
    args: argparse.Namespace,
) -> list[Points]:
    """The clicks of one training batch (see the module's description)."""
    truth = label[:, 0].cpu().numpy()
    n = len(truth)
    silent = rng.random(n) < args.no_click
    points: list[Points] = []
    for b in range(n):
        if not silent[b] and rng.random() < args.random_clicks:
            points.append(initial_clicks(truth[b], classes, args.max_initial, rng))
        else:
            points.append([[] for _ in range(classes)])
    rounds = int(rng.integers(0, args.max_iterations + 1))
    for _ in range(rounds if not silent.all() else 0):
        pred = predict(network, image, points, args.sigma)
        for b in range(n):
            if silent[b]:
                continue
            if rng.random() < args.random_error:
                click = random_error_click(pred[b], truth[b], classes, rng)
            else:
                click = standard_click(pred[b], truth[b], classes)
            if click is not None:
                points[b][click[0]].append(click[1])
    return points


def validate(
    network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: int, sigma: float
) -> dict[str, float]:
    """Mean foreground Dice after 0 to 5 standard clicks on the validation volumes (model grid)."""
    truth = labels[:, 0].cpu().numpy()
    points: list[Points] = [[[] for _ in range(classes)] for _ in range(len(truth))]
    curve: dict[str, float] = {}
    for k in range(max(VALIDATION_CLICKS) + 1):
        pred = np.concatenate(
            [predict(network, images[i : i + 4], points[i : i + 4], sigma) for i in range(0, len(truth), 4)]
        )
        curve[str(k)] = round(
            float(np.mean([mean_foreground_dice(p, t, classes) for p, t in zip(pred, truth, strict=True)])), 4
        )
        for b in range(len(truth)):
            click = standard_click(pred[b], truth[b], classes)
            if click is not None:
                points[b][click[0]].append(click[1])
    curve["score"] = round(float(np.mean([curve[str(k)] for k in VALIDATION_CLICKS])), 4)
    return curve


def train(spec: ModelSpec, args: argparse.Namespace) -> dict:
    started = time.monotonic()
    set_determinism(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cpu")
    split = split_cases(msd_cases(args.data))
    images, labels, val_ds = batched_data(spec, split["train"], split["val"], device)
    val_images = pad_to([item["image"].as_tensor() for item in val_ds], spec.roi_size)
    val_labels = pad_to([item["label"].as_tensor().round() for item in val_ds], spec.roi_size).long()
    generator = torch.Generator().manual_seed(args.seed)
    augment = BatchAugment()
    classes = spec.num_classes

    network = click_network(spec)
    network.load_state_dict(widen_input(member_state(load_state_dict(args.init), args.member), network))
    # The tensors that read the input (where the guidance weights start at 0) learn faster.
    first = {k for k, v in network.state_dict().items() if v.ndim == 5 and v.shape[1] == 1 + classes}
    named = dict(network.named_parameters())
    groups = [
        {"params": [named[k] for k in sorted(first)], "scale": args.input_lr_scale},
        {"params": [p for k, p in named.items() if k not in first], "scale": 1.0},
    ]
    optimizer = recipe.optimizer(groups, args.lr)  # AdamW over the two groups, each keeping its scale
    loss_fn = recipe.loss()
    budget = 60 * args.minutes

    history: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "validations": [], "best": None}
    record = {"step": 0, "seconds": 0.0, **validate(network, val_images, val_labels, classes, args.sigma)}
    history["validations"].append(record)
    logger.info(json.dumps(record))
    # The starting weights are no candidate: they ignore the clicks by construction, and the shipped
    # automatic weights were trained on the validation cases too, so they score high there.
    best = -1.0
    step, losses = 0, []
    while time.monotonic() - started < budget:
        step += 1
        # Cosine decay over the wall-clock budget: the run ends when the time does.
        for group in optimizer.param_groups:
            group["lr"] = (
                group["scale"]
                * args.lr
                * 0.5
                * (1 + math.cos(math.pi * min(1.0, (time.monotonic() - started) / budget)))
            )
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        image, label = augment(images[index], labels[index], generator)
        points = simulate(network, image, label, classes, rng, args)
        x = torch.cat([image, batch_guidance(points, tuple(image.shape[2:]), args.sigma)], dim=1)
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with training_autocast(device):
            loss = loss_fn(network(x).float(), label)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % args.val_every == 0:
            record = {
                "step": step,
                "seconds": round(time.monotonic() - started, 1),
                "loss": round(float(np.mean(losses)), 4),
                **validate(network, val_images, val_labels, classes, args.sigma),
            }
            losses = []
            history["validations"].append(record)
            logger.info(json.dumps(record))
            if record["score"] > best:
                best = record["score"]
                history["best"] = record
                save_weights_atomically(network.state_dict(), args.out)
    history["steps"] = step
    history["seconds"] = round(time.monotonic() - started, 1)
    save_weights_atomically(network.state_dict(), args.out.with_suffix(".last.pt"))
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--data", type=Path, required=True, help="MSD-layout folder (the fixed split is taken from it)")
    parser.add_argument("--out", type=Path, required=True, help="best checkpoint (by validation); .last.pt beside")
    parser.add_argument("--init", type=Path, help="automatic weights to start from (default: the shipped ones)")
    parser.add_argument("--member", type=int, default=0, help="which ensemble member of --init to start from")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget, validations included")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--input-lr-scale", type=float, default=3.0, help="learning-rate factor of the input layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=60, help="steps between validations")
    parser.add_argument("--sigma", type=float, default=SIGMA, help="guidance Gaussian width, voxels")
    parser.add_argument("--no-click", type=float, default=0.15, help="probability of a sample with no clicks")
    parser.add_argument("--random-clicks", type=float, default=0.5, help="probability of random initial clicks")
    parser.add_argument("--max-initial", type=int, default=2, help="most random initial clicks per class")
    parser.add_argument("--max-iterations", type=int, default=4, help="most rounds of clicks on the errors")
    parser.add_argument("--random-error", type=float, default=0.3, help="probability a round's click is random")
    parser.add_argument("--history", type=Path, help="write the run's history (JSON) here")
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    args.init = args.init or spec.shipped_weights_path
    if args.init is None:
        parser.error(f"{args.model} ships no weights: pass --init")
    if args.out.is_dir() or not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: give a file in an existing folder")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    history = train(spec, args)
    if args.history:
        args.history.write_text(json.dumps(history, indent=1))
    print(json.dumps({"best": history["best"], "steps": history["steps"], "seconds": history["seconds"]}))


if __name__ == "__main__":
    main()
