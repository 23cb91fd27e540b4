"""float32 against bfloat16 on this CPU, for infer and epistemic scoring: ``python -m benchmarks.precision --help``.

The app runs its networks in bfloat16 on CPUs with native bfloat16 units (``appcore.precision``;
``--conf cpu_bf16 false`` turns it off). This prints what that changes, measured on real volumes
through the app's own classes, the two precisions alternating image by image:

- infer seconds per volume (``SegmentationInfer``, as ``/infer`` runs it) for both models;
- epistemic scoring seconds per volume (``MCDropoutScorer`` with the app's 8 dropout passes and 4
  test-time augmentations);
- held-out Dice of the shipped hippocampus weights in each precision (``research.radiology.evaluate``);
- how far the uncertainty ranking moves: Spearman correlation of each measure between the two
  precisions, and how many of the top-k images both pick.

Dropout masks are random, so scores also move between two float32 runs: the float32-vs-float32
line (same images, a second float32 scorer) is the yardstick for the bfloat16 line.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from appcore.precision import cpu_has_native_bf16
from appcore.weights import save_weights_atomically
from radiology.infer import SegmentationInfer
from radiology.registry import MODELS
from radiology.uncertainty import MCDropoutScorer
from research.radiology.evaluate import evaluate
from research.radiology.splits import msd_cases, split_cases

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"float32": False, "bfloat16": True}  # name -> cpu_bf16
MEASURES = ("entropy", "bald", "tta")


def infer_seconds(spec_name: str, weights: Path, images: list[Path], repeats: int) -> dict[str, float]:
    """Median seconds of one ``SegmentationInfer`` call per precision, alternating, after a warm-up."""
    spec = MODELS[spec_name]
    tasks = {name: SegmentationInfer(spec, [str(weights)], cpu_bf16=flag) for name, flag in PRECISIONS.items()}
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(repeats + 1):
        for image in images:
            for name, task in tasks.items():
                start = time.perf_counter()
                out, _ = task({"image": str(image), "device": "cpu", "logging": "WARNING"})
                if r:  # the first round loads the networks
                    times[name].append(time.perf_counter() - start)
                Path(out).unlink(missing_ok=True)
    return {name: statistics.median(t) for name, t in times.items()}


def scoring(spec_name: str, weights: Path, images: list[Path]) -> tuple[dict[str, float], dict[str, dict]]:
    """Median scoring seconds per precision, and each precision's (and a second float32's) measures per image."""
    spec = MODELS[spec_name]
    runs = {**PRECISIONS, "float32 again": False}
    scorers = {
        name: MCDropoutScorer(spec, [str(weights)], samples=8, tta_samples=4, cpu_bf16=flag)
        for name, flag in runs.items()
    }
    for scorer in scorers.values():
        scorer.score(str(images[0]))  # loads the weights
    times: dict[str, list[float]] = {name: [] for name in runs}
    measures: dict[str, dict] = {name: {} for name in runs}
    for image in images:
        for name, scorer in scorers.items():
            start = time.perf_counter()
            measures[name][image.name] = scorer.score(str(image))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items() if name in PRECISIONS}, measures


def agreement(a: dict[str, dict], b: dict[str, dict], k: int) -> dict[str, tuple[float, int]]:
    """Spearman correlation and top-``k`` overlap of each measure between two scorings of the same images."""
    names = sorted(a)
    out = {}
    for measure in MEASURES:
        xa = np.array([a[n][measure] for n in names])
        xb = np.array([b[n][measure] for n in names])
        top = len(set(np.argsort(-xa)[:k]) & set(np.argsort(-xb)[:k]))
        out[measure] = (float(spearmanr(xa, xb).statistic), top)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cases", type=int, default=40, help="hippocampus test cases scored and evaluated")
    parser.add_argument("--repeats", type=int, default=3, help="infer rounds over the timed images")
    parser.add_argument("--top", type=int, default=8, help="k of the top-k overlap")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if not cpu_has_native_bf16():
        parser.exit(1, "this CPU has no native bfloat16 (AMX or AVX512-BF16): the app keeps float32 here\n")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    hippo_weights = MODELS["hippocampus"].shipped_weights_path
    test = split_cases(msd_cases(args.shared / "hippocampus_mr"))["test"][: args.cases]
    cts = [
        args.shared / "totalseg_ct" / "example_ct.nii.gz",
        args.shared / "spleen_ct" / "imagesTr" / "spleen_2.nii.gz",
    ]
    # organs_ct ships untrained: freshly initialised weights cost the same forward pass.
    torch.manual_seed(0)
    scratch = tempfile.TemporaryDirectory(prefix="precision-")  # removed at exit, also after an error
    ct_weights = Path(scratch.name) / "organs_ct.pt"
    save_weights_atomically(MODELS["organs_ct"].network().state_dict(), ct_weights)

    rows: list[tuple[str, str, str, str]] = []
    timed = [c.image for c in test[:10]]
    hippo_infer = infer_seconds("hippocampus", hippo_weights, timed, args.repeats)
    ct_infer = infer_seconds("organs_ct", ct_weights, cts, args.repeats)
    rows.append(
        ("infer hippocampus, s/volume", *(f"{hippo_infer[p]:.3f}" for p in PRECISIONS), f"{len(timed)} test volumes")
    )
    rows.append(("infer organs_ct, s/volume", *(f"{ct_infer[p]:.3f}" for p in PRECISIONS), "2 real CTs"))
    score_s, measures = scoring("hippocampus", hippo_weights, [c.image for c in test])
    rows.append(
        (
            "epistemic scoring hippocampus, s/volume",
            *(f"{score_s[p]:.3f}" for p in PRECISIONS),
            f"{len(test)} test volumes",
        )
    )
    ct_score_s, _ = scoring("organs_ct", ct_weights, cts)
    rows.append(("epistemic scoring organs_ct, s/volume", *(f"{ct_score_s[p]:.2f}" for p in PRECISIONS), "2 real CTs"))
    dice = {p: evaluate("hippocampus", hippo_weights, test, cpu_bf16=flag) for p, flag in PRECISIONS.items()}
    for label in ("anterior", "posterior"):
        rows.append(
            (f"Dice hippocampus {label}", *(f"{dice[p]['mean_dice'][label]:.4f}" for p in PRECISIONS), "test split")
        )
    rows.append(("Dice hippocampus mean", *(f"{dice[p]['mean_of_classes']:.4f}" for p in PRECISIONS), "test split"))
    scratch.cleanup()

    noise = agreement(measures["float32"], measures["float32 again"], args.top)
    change = agreement(measures["float32"], measures["bfloat16"], args.top)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads; load average before: {load:.2f}")
    print("| measure | float32 | bfloat16 | note |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\n| ranking of {len(test)} volumes by | Spearman, float32 vs float32 again | Spearman, float32 vs bfloat16 "
        f"| top-{args.top} shared, f32 vs f32 again | top-{args.top} shared, f32 vs bf16 |\n|---|---|---|---|---|"
    )
    for measure in MEASURES:
        (rho_noise, top_noise), (rho_change, top_change) = noise[measure], change[measure]
        print(f"| {measure} | {rho_noise:.3f} | {rho_change:.3f} | {top_noise} | {top_change} |")


if __name__ == "__main__":
    main()
