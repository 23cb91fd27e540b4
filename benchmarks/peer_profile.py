"""Where this project's infer time goes, in-process: ``python -m benchmarks.peer_profile --help``.

Runs the infer task of a model on real volumes as the server does (pre-processing, sliding window,
inversion, writing), prints the median of MONAI Label's per-stage latencies, and with ``--profile``
a pyinstrument call tree of the last run. ``organs_ct`` gets freshly initialised weights (it ships
untrained), as in the other benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from appcore.weights import save_weights_atomically
from radiology.infer import SegmentationInfer
from radiology.registry import MODELS

STAGES = ("pre", "infer", "invert", "post", "write", "total")


def infer_task(model: str, workdir: Path, max_window_scale: float | None = None) -> SegmentationInfer:
    spec = MODELS[model]
    if max_window_scale is not None:
        spec = dataclasses.replace(spec, max_window_scale=max_window_scale)
    if spec.shipped_weights_path is not None:
        paths = [str(spec.shipped_weights_path)]
    else:
        torch.manual_seed(0)
        paths = [str(save_weights_atomically(spec.network().state_dict(), workdir / f"{model}.pt"))]
    return SegmentationInfer(spec, paths)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument call tree of the last run")
    parser.add_argument("--scales", type=float, nargs="*", help="compare these max_window_scale values, in turns")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {scale: infer_task(args.model, Path(tmp), scale) for scale in args.scales or [None]}
        for task in variants.values():
            task({"image": str(args.images[0])})  # builds the network
        stages = {v: {s: [] for s in STAGES} for v in variants}
        wall: dict[float | None, list[float]] = {v: [] for v in variants}
        profiler = None
        for r in range(args.repeats):
            for image in args.images:
                for v, task in variants.items():  # variants take turns, so load falls on all alike
                    if args.profile and r == args.repeats - 1:
                        from pyinstrument import Profiler

                        profiler = Profiler(interval=0.005)
                        profiler.start()
                    t = time.perf_counter()
                    out, result = task({"image": str(image)})
                    wall[v].append(time.perf_counter() - t)
                    if profiler is not None:
                        profiler.stop()
                    os.unlink(out)
                    for s in STAGES:
                        stages[v][s].append(result["latencies"][s])
        load = os.getloadavg()[0]
        print(f"{args.model}, {len(args.images)} image(s) x {args.repeats}, load {load:.2f} after")
        for v in variants:
            medians = [f"{s} {statistics.median(x):.3f}" for s, x in stages[v].items()]
            label = "spec default" if v is None else f"max_window_scale {v}"
            print(f"{label}: " + " | ".join([*medians, f"wall {statistics.median(wall[v]):.3f}"]))
        if profiler is not None:
            print(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main()
