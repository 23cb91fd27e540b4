"""Dice against clicks of a click engine, with the standard simulated annotator, on a split of an MSD folder.

``python -m research.radiology.clicks_evaluate hippocampus --data ../shared/data/hippocampus_mr
--weights radiology/weights/hippocampus_clicks.pt --split test --threads 1``

Each case starts from the engine's answer with no clicks (the automatic model's label). Then, up
to ``--clicks`` times, the standard annotator (``research.radiology.annotator.standard_click``)
clicks at the centre of the largest wrong region of the current label, on the image's own grid,
and every click so far is sent again to ``ClickNet.segment``, as a viewer does. Reported: mean
foreground Dice after 0, 1, 3, 5 and 10 clicks, clicks to reach a Dice of 0.90, seconds per click
(the engine's call alone, the annotator's work not counted; wall-clock and this process' CPU
time), and for comparison the click network itself with no clicks and the voxels one would paint
from scratch.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from radiology.clicknet import ClickNet, guidance_channels
from radiology.registry import MODELS
from research.radiology.annotator import mean_foreground_dice, standard_click
from research.radiology.splits import msd_cases, split_cases

REPORTED = (0, 1, 3, 5, 10)
TARGET = 0.90


def evaluate_case(engine: ClickNet, image_path: Path, label_path: Path, clicks: int) -> dict:
    """One case's Dice curve (index = clicks sent), seconds per click and the no-click network's Dice."""
    image = nib.load(image_path)
    array = np.asarray(image.dataobj, dtype=np.float32)
    truth = np.rint(np.asarray(nib.load(label_path).dataobj)).astype(np.int64)
    classes = engine.spec.num_classes
    names = guidance_channels(engine.spec)
    automatic = engine.segment(array, image.affine, {}, None)
    pred = automatic
    curve = [mean_foreground_dice(pred, truth, classes)]
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    sent: dict[str, list[tuple[int, int, int]]] = {}
    for _ in range(clicks):
        click = standard_click(pred, truth, classes)
        if click is not None:  # nothing wrong: the label stays as it is
            sent.setdefault(names[click[0]], []).append(click[1])
            tick, cpu_tick = time.perf_counter(), time.process_time()
            pred = engine.segment(array, image.affine, sent, automatic)
            seconds.append(time.perf_counter() - tick)
            cpu_seconds.append(time.process_time() - cpu_tick)
        curve.append(mean_foreground_dice(pred, truth, classes))
    return {"dice": curve, "seconds": seconds, "cpu_seconds": cpu_seconds, "voxels": int((truth > 0).sum())}


def no_click_network_dice(engine: ClickNet, image_path: Path, label_path: Path) -> float:
    """The click network's own Dice with empty guidance maps (the engine answers the automatic model)."""
    image = nib.load(image_path)
    array = np.asarray(image.dataobj, dtype=np.float32)
    truth = np.rint(np.asarray(nib.load(label_path).dataobj)).astype(np.int64)
    pred = engine.network_answer(array, image.affine, {})
    return mean_foreground_dice(pred, truth, engine.spec.num_classes)


def summarise(per_case: dict[str, dict], own: list[float]) -> dict:
    curves = np.array([c["dice"] for c in per_case.values()])
    seconds = np.concatenate([c["seconds"] for c in per_case.values()]) if per_case else np.zeros(0)
    cpu = np.concatenate([c["cpu_seconds"] for c in per_case.values()]) if per_case else np.zeros(0)
    reach = [next((k for k, d in enumerate(c["dice"]) if d >= TARGET), None) for c in per_case.values()]
    reached = [k for k in reach if k is not None]
    return {
        "cases": len(per_case),
        "mean_dice_after_clicks": {
            str(k): round(float(curves[:, k].mean()), 4) for k in REPORTED if k < curves.shape[1]
        },
        "click_network_no_clicks": round(float(np.mean(own)), 4) if own else None,
        "clicks_to_dice_0.90": {
            "median_of_reached": float(np.median(reached)) if reached else None,
            "mean_of_reached": round(float(np.mean(reached)), 2) if reached else None,
            "not_reached": len(reach) - len(reached),
        },
        "seconds_per_click": {
            "clicks": int(seconds.size),
            "mean": round(float(seconds.mean()), 3) if seconds.size else None,
            "median": round(float(np.median(seconds)), 3) if seconds.size else None,
            "p95": round(float(np.percentile(seconds, 95)), 3) if seconds.size else None,
            "max": round(float(seconds.max()), 3) if seconds.size else None,
        },
        # CPU time of this process per click: what a click costs on an idle machine with --threads 1,
        # whatever else the machine runs (wall-clock time above includes waiting for a core).
        "cpu_seconds_per_click": {
            "mean": round(float(cpu.mean()), 3) if cpu.size else None,
            "median": round(float(np.median(cpu)), 3) if cpu.size else None,
            "max": round(float(cpu.max()), 3) if cpu.size else None,
        },
        "voxels_to_paint_mean": round(float(np.mean([c["voxels"] for c in per_case.values()])), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--data", type=Path, required=True, help="MSD-layout folder")
    parser.add_argument("--weights", type=Path, required=True, help="the click network's weights")
    parser.add_argument("--automatic", type=Path, help="the automatic model's weights (default: shipped)")
    parser.add_argument(
        "--automatic-channels",
        help="the automatic network's channels if not the model's, e.g. 16,32,64,128 (earlier weights)",
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--clicks", type=int, default=max(REPORTED))
    parser.add_argument("--alone", action="store_true", help="the click network alone (ClickNet on_automatic=False)")
    parser.add_argument("--click-weight", type=float, help="ClickNet.click_weight (default: the engine's)")
    parser.add_argument("--correction-reach", type=float, help="ClickNet.correction_reach (default: the engine's)")
    parser.add_argument("--correction-margin", type=float, help="ClickNet.correction_margin (default: the engine's)")
    parser.add_argument("--no-correction", action="store_true", help="no click correction (correction_margin=None)")
    parser.add_argument("--limit", type=int, help="only the first N cases (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write per-case curves and times here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    automatic = args.automatic or spec.shipped_weights_path
    if automatic is None:
        parser.error(f"{args.model} ships no automatic weights: pass --automatic")
    cases = msd_cases(args.data)
    if args.split != "all":
        cases = split_cases(cases)[args.split]
    cases = cases[: args.limit] if args.limit else cases
    options: dict[str, float | None] = {
        name: value
        for name, value in (
            ("click_weight", args.click_weight),
            ("correction_reach", args.correction_reach),
            ("correction_margin", args.correction_margin),
        )
        if value is not None
    }
    if args.no_correction:
        options["correction_margin"] = None
    channels = None if args.automatic_channels is None else [int(c) for c in args.automatic_channels.split(",")]
    engine = ClickNet(
        spec,
        weights=args.weights,
        automatic_weights=[automatic],
        automatic_channels=channels,
        on_automatic=not args.alone,
        **options,
    )
    per_case = {c.id: evaluate_case(engine, c.image, c.label, args.clicks) for c in cases}
    own = [no_click_network_dice(engine, c.image, c.label) for c in cases]
    summary = summarise(per_case, own)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "per_case": per_case}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
