"""Does weight averaging polish trained hippocampus weights? ``python -m benchmarks.hippocampus_swa --help``.

Stochastic weight averaging, tried for issue 2 on the CPU: continue from trained weights with the
shipped recipe's augmentation (``research.radiology.batch_augment``) at a constant learning rate, and average
the weights every ``--every`` steps after ``--start``. Every 100 steps it prints validation Dice of
the current and of the averaged weights, against the starting weights' line. Judge on weights
trained on the train split only (validation is then held out); the averaged weights go to ``--out``.
The network has instance normalisation only, so averaged weights need no statistics recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from torch.optim.swa_utils import AveragedModel

from appcore.precision import training_autocast
from appcore.weights import load_state_dict, save_weights_atomically
from radiology.registry import MODELS
from research.radiology.offline import batched_data, parse_augment, validate
from research.radiology.splits import msd_cases, split_cases

# The shipped weights' augmentation (model card, "Training").
SHIPPED_AUGMENT = "p_spatial=0.8,rotate=0.5,scale=0.75:1.3,translate=6,p_gamma=0.4,p_noise=0.2"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="hippocampus MSD folder")
    parser.add_argument("--weights", type=Path, required=True, help="the weights to start from")
    parser.add_argument("--out", type=Path, required=True, help="where the averaged weights go")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=4e-4, help="constant learning rate (the recipe peaked at 2e-3)")
    parser.add_argument("--start", type=int, default=100, help="first step that is averaged")
    parser.add_argument("--every", type=int, default=25, help="steps between averaged snapshots")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_determinism(args.seed)
    spec = dataclasses.replace(MODELS["hippocampus"], members=1)  # averages the snapshots of one network
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = split_cases(msd_cases(args.data))
    images, labels, val_ds = batched_data(spec, parts["train"], parts["val"], device)
    augment = parse_augment(SHIPPED_AUGMENT, flip_axes=spec.flip_axes)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    model = spec.network().to(device)
    model.load_state_dict(load_state_dict(args.weights))
    averaged = AveragedModel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def dice(network: torch.nn.Module) -> str:
        per_class = list(validate(spec, network, val_ds, device).values())
        return f"{np.mean(per_class):.4f} {[round(d, 4) for d in per_class]}"

    print(f"start weights: validation {dice(model)}", flush=True)
    started, total = time.monotonic(), 0.0
    for step in range(1, args.steps + 1):
        model.train()
        index = torch.randint(len(images), (args.batch_size,), device=device, generator=generator)
        image, label = augment(images[index], labels[index], generator)
        optimizer.zero_grad(set_to_none=True)
        with training_autocast(device):
            loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        if step >= args.start and step % args.every == 0:
            averaged.update_parameters(model)
        if step % 100 == 0 or step == args.steps:
            print(
                f"step {step}: loss {total / (step % 100 or 100):.4f}, {time.monotonic() - started:.0f} s; "
                f"validation now {dice(model)}, averaged ({int(averaged.n_averaged)}) {dice(averaged.module)}",
                flush=True,
            )
            total = 0.0
    save_weights_atomically(averaged.module.state_dict(), args.out)


if __name__ == "__main__":
    main()
