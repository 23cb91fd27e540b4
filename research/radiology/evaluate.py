"""Held-out Dice of a model through the server's own infer path: ``python -m research.radiology.evaluate --help``.

Each case goes through ``SegmentationInfer`` exactly as ``/infer`` runs it, and Dice is computed on
the image's original voxel grid against the reference label.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from appcore.weights import load_state_dict
from radiology.ensemble import members_in
from radiology.infer import SegmentationInfer
from radiology.registry import MODELS
from research.radiology.offline import dice_per_class
from research.radiology.splits import Case, msd_cases, split_cases


def evaluate(
    model: str, weights: Path, cases: list[Case], channels: tuple[int, ...] | None = None, *, cpu_bf16: bool = True
) -> dict:
    spec = MODELS[model]
    if channels:
        spec = dataclasses.replace(spec, channels=channels)
    # One network or an ensemble, as the file holds (experiments score single networks too).
    spec = dataclasses.replace(spec, members=members_in(load_state_dict(weights)))
    task = SegmentationInfer(spec, [str(weights)], cpu_bf16=cpu_bf16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    per_case = {}
    for case in cases:
        out, _ = task({"image": str(case.image), "device": device, "logging": "WARNING"})
        pred = np.asarray(nib.load(out).dataobj)
        truth = np.rint(np.asarray(nib.load(case.label).dataobj)).astype(np.int64)
        Path(out).unlink(missing_ok=True)
        per_case[case.id] = {
            spec.labels.labels[i].name: d for i, d in enumerate(dice_per_class(pred, truth, spec.labels.ids).values())
        }
    names = [label.name for label in spec.labels]
    mean = {n: float(np.mean([c[n] for c in per_case.values()])) for n in names}
    return {
        "cases": len(per_case),
        "mean_dice": mean,
        "mean_of_classes": float(np.mean(list(mean.values()))),
        "per_case": per_case,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--data", type=Path, required=True, help="MSD-layout folder")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="which part of the fixed split to score ('all' for a folder of unseen cases)",
    )
    parser.add_argument("--json", type=Path, help="also write the full result here")
    parser.add_argument("--channels", help="UNet channels of the weights, if not the model's (experiments)")
    parser.add_argument(
        "--float32",
        action="store_true",
        help="on the CPU, keep float32 even where bfloat16 is native (as --conf cpu_bf16 false)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("monailabel").setLevel(logging.WARNING)
    cases = msd_cases(args.data)
    if args.split != "all":
        cases = split_cases(cases)[args.split]
    if args.json and not args.json.parent.is_dir():  # before minutes of scoring, not after
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    channels = tuple(int(c) for c in args.channels.split(",")) if args.channels else None
    result = evaluate(args.model, args.weights, cases, channels, cpu_bf16=not args.float32)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k != "per_case"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
