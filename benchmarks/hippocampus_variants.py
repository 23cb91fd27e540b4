"""Validation Dice of hippocampus weights alone, averaged in every subset, and under test-time augmentation.

The variants of issue 2 that were judged on the validation split before any test scoring (model
card, "How the recipe was chosen")::

    .venv/bin/python -m benchmarks.hippocampus_variants --data ../shared/data/hippocampus_mr \
        --weights b_base=work/gpu3/b_base.pt b_wide=work/gpu3/b_wide.pt:24,48,96,192 ... \
        --shift-tta b_strong --time-scoring --foreground-weights 0.6,0.8,0.9,1.1,1.25,1.5,2 --flip-tta --affine-tta

Each volume goes through the validation pre-processing and one sliding window (the window the
server uses for these crops); probabilities are averaged before the argmax.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from monai.inferers import sliding_window_inference
from monai.transforms import Compose

from appcore.weights import load_state_dict
from radiology.ensemble import members_in
from radiology.registry import MODELS
from radiology.transforms import class_index, validation_transforms
from radiology.uncertainty import MCDropoutScorer
from research.radiology.offline import dice_per_class
from research.radiology.splits import msd_cases, split_cases
from research.radiology.tta import AffineTTA

SHIFT = 2  # voxels, along each axis both ways


def parse_weights(text: str) -> tuple[str, Path, tuple[int, ...] | None]:
    """``name=path`` or ``name=path:16,32,64,128`` (UNet channels, when not the model's own)."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected name=path[:channels], got {text!r}")
    path, _, channels = rest.partition(":")
    return name, Path(path), tuple(int(c) for c in channels.split(",")) if channels else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=parse_weights, nargs="+", required=True)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--shift-tta", help="name of one model to also score with test-time shifts")
    parser.add_argument(
        "--flip-tta",
        action="store_true",
        help="also score every model with left-right mirroring at test time (the mean of the plain and "
        "the mirrored pass), and print each model's gain over its plain score",
    )
    parser.add_argument(
        "--affine-tta",
        action="store_true",
        help="also score every model with test-time rotations and zooms (research.radiology.tta.AffineTTA: the "
        "identity, +-0.15 rad about each axis, zooms 0.9 and 1.1; 9 passes), and print each model's gain",
    )
    parser.add_argument("--top", type=int, default=8, help="how many subsets to print")
    parser.add_argument(
        "--foreground-weights",
        type=lambda text: [float(w) for w in text.split(",")],
        default=[],
        help="also score each model with its foreground probabilities multiplied by each of these "
        "comma-separated weights before the argmax (below 1 shrinks the segmentation), and print how "
        "its predicted volumes compare with the labels'",
    )
    parser.add_argument(
        "--time-scoring",
        action="store_true",
        help="also time epistemic scoring (8 MC passes + 4 TTA, as the server scores) per model on 5 cases, twice",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    spec = MODELS["hippocampus"]
    cases = split_cases(msd_cases(args.data))[args.split]
    items = list(
        Dataset([{"image": str(c.image), "label": str(c.label)} for c in cases], Compose(validation_transforms(spec)))
    )
    truths = [item["label"][0].numpy().round().astype(np.int64) for item in items]

    networks = {}
    for name, path, channels in args.weights:
        model = dataclasses.replace(spec, channels=channels) if channels else spec
        model = dataclasses.replace(model, members=members_in(load_state_dict(path)))
        if args.time_scoring:
            scorer = MCDropoutScorer(model, [str(path)], samples=8)
            scorer.score(str(cases[0].image))  # loads the weights
            seconds = []
            for case in cases[1:6] * 2:
                start = time.perf_counter()
                scorer.score(str(case.image))
                seconds.append(time.perf_counter() - start)
            print(f"scoring   {name}: median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s per volume")
        network = model.network()
        network.load_state_dict(load_state_dict(path))
        networks[name] = network.eval()

    def window(image: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """Logits of one sliding window pass (argument order as ``AffineTTA`` calls it)."""
        return sliding_window_inference(image, spec.roi_size, 1, network, overlap=0.25, mode="gaussian")

    @torch.inference_mode()
    def probabilities(network: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(window(image, network), 1)[0]

    probs = {name: [probabilities(net, item["image"][None]) for item in items] for name, net in networks.items()}

    def score(per_case: list[torch.Tensor]) -> tuple[float, list[float]]:
        dice = [
            list(dice_per_class(class_index(p)[0].numpy(), t, spec.labels.ids).values())
            for p, t in zip(per_case, truths, strict=True)
        ]
        classes = np.mean(dice, axis=0)
        return float(classes.mean()), [round(float(d), 4) for d in classes]

    def averaged(names: tuple[str, ...]) -> list[torch.Tensor]:
        return [sum(probs[n][i] for n in names) / len(names) for i in range(len(items))]

    print(f"{len(items)} {args.split} cases")
    for name in networks:
        print(f"alone     {name}: {score(probs[name])}")
    subsets = [c for k in range(2, len(networks) + 1) for c in itertools.combinations(networks, k)]
    ranked = sorted(((score(averaged(c)), c) for c in subsets), key=lambda r: -r[0][0])
    print(f"all {len(networks)} averaged: {score(averaged(tuple(networks)))}")
    for result, names in ranked[: args.top]:
        print(f"subset    {'+'.join(names)}: {result}")

    foreground = [label.id for label in spec.labels]
    for name in networks if args.foreground_weights else []:
        ratio = np.mean(
            [
                [(class_index(p)[0].numpy() == c).sum() / max(1, (t == c).sum()) for c in foreground]
                for p, t in zip(probs[name], truths, strict=True)
            ],
            axis=0,
        )
        print(f"volume    {name}: predicted / labelled, per class {[round(float(r), 3) for r in ratio]}")
        for weight in args.foreground_weights:
            factor = torch.ones(spec.num_classes, 1, 1, 1)
            factor[foreground] = weight
            print(f"weighted  {name} x{weight}: {score([p * factor for p in probs[name]])}")

    if args.flip_tta:
        gains = []
        for name, network in networks.items():
            # RAS after pre-processing: tensor axis 2 of (batch, channel, x, y, z) is left-right.
            mirrored = [
                (plain + probabilities(network, torch.flip(item["image"][None], (2,))).flip(1)) / 2
                for item, plain in zip(items, probs[name], strict=True)
            ]
            result = score(mirrored)
            gains.append(result[0] - score(probs[name])[0])
            print(f"flip TTA  {name} (plain and left-right mirrored): {result}, gain {gains[-1]:+.4f}")
        print(f"flip TTA  mean gain over {len(gains)} models: {statistics.mean(gains):+.4f}")

    if args.affine_tta:
        tta, gains = AffineTTA(window), []
        for name, network in networks.items():
            with torch.inference_mode():
                result = score([tta(item["image"][None], network)[0] for item in items])
            gains.append(result[0] - score(probs[name])[0])
            print(f"affine TTA {name} ({len(tta)} passes: rotations and zooms): {result}, gain {gains[-1]:+.4f}")
        print(f"affine TTA mean gain over {len(gains)} models: {statistics.mean(gains):+.4f}")

    if args.shift_tta:
        network = networks[args.shift_tta]
        shifted = []
        for item, plain in zip(items, probs[args.shift_tta], strict=True):
            image, passes = item["image"][None], [plain]
            for axis, step in itertools.product((1, 2, 3), (-SHIFT, SHIFT)):
                moved = probabilities(network, torch.roll(image, step, axis + 1))
                passes.append(torch.roll(moved, -step, axis))
            shifted.append(sum(passes) / len(passes))
        print(f"shift TTA {args.shift_tta} (identity and +-{SHIFT} voxels per axis): {score(shifted)}")


if __name__ == "__main__":
    main()
