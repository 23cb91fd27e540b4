"""Bootstrap interval of a held-out mean Dice from ``research.radiology.evaluate --json`` output.

``python -m benchmarks.dice_interval RESULT.json [--resamples N] [--seed S]`` resamples the cases
with replacement and prints the mean of the classes with its 95% percentile interval, per class
too: how far the figure on these cases could move on other cases like them.

With ``--versus BASE.json`` (another model scored on the same cases) it also prints the paired
difference, each resample drawing the same cases for both models: whether a gain is larger than
what the choice of cases alone could produce.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def bootstrap_interval(values: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the mean of ``values`` (one per case) over resampled cases."""
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need one value per case for at least two cases, got shape {values.shape}")
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("result", type=Path, help="JSON written by research.radiology.evaluate --json (with per_case)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--versus", type=Path, help="the same cases scored by another model: the paired difference")
    args = parser.parse_args(argv)

    def read(path: Path) -> dict:
        per_case = json.loads(path.read_text()).get("per_case")
        if not per_case:
            parser.error(f"{path} has no per_case Dice; write it with research.radiology.evaluate --json")
        return per_case

    per_case = read(args.result)
    classes = sorted(next(iter(per_case.values())))
    table = np.array([[case[c] for c in classes] for case in per_case.values()])
    rng = np.random.default_rng(args.seed)
    print(f"{len(table)} cases, {args.resamples} resamples, 95% percentile interval")
    print("| class | mean Dice | interval |")
    print("|---|---|---|")
    for name, values in [*zip(classes, table.T, strict=True), ("mean of classes", table.mean(axis=1))]:
        low, high = bootstrap_interval(values, args.resamples, rng)
        print(f"| {name} | {values.mean():.4f} | {low:.4f} - {high:.4f} |")
    if args.versus:
        base = read(args.versus)
        if set(base) != set(per_case):
            parser.error(f"{args.versus} scores other cases than {args.result}: a paired difference needs the same")
        diff = table.mean(axis=1) - np.array([[base[k][c] for c in classes] for k in per_case]).mean(axis=1)
        low, high = bootstrap_interval(diff, args.resamples, rng)
        better = int((diff > 0).sum())
        print(f"| mean of classes minus {args.versus.name} | {diff.mean():+.4f} | {low:+.4f} - {high:+.4f} |")
        print(f"higher on {better} of {len(diff)} cases, lower on {int((diff < 0).sum())}")


if __name__ == "__main__":
    main()
