"""Do the slide strategies' measures point at the windows the nuclei network gets wrong?

::

    .venv/bin/python -m benchmarks.pathology_patch_measures --data ../shared/data/pathology/nuclei_cpm15 \
        --tiles train --dropout 0.1,0.2,0.3,0.5
    .venv/bin/python -m benchmarks.pathology_patch_measures --data ../shared/data/pathology/nuclei_cpm15 \
        --tiles held-out

Each tile is cut into the grid of ``PROBE``-sized windows a patch is measured on. Every window is
measured by the app's own strategy code (``WSIUncertain.scored``: ``entropy``, ``tta``, and
``bald`` for each dropout probability asked for), and its error is that of the served infer on the
window: 1 - Dice and 1 - AJI of the instances against the manual ones. Printed as a Markdown table:
per measure, the Spearman correlation between measure and error over all windows, its mean within
each tile (the strategies rank the patches of one slide, so this is the figure that decides which
patch an annotator gets), and the mean error of the quarter of windows the measure ranks first.
Random picking has correlation 0 and picks the mean error; a useful measure has a positive
correlation and a top quarter worse than the mean.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from pathology.activelearning import MC_DROPOUT, PROBE, WSIUncertain
from pathology.data import cpm_tiles, split_tiles
from pathology.predict import predict_instances
from pathology.spec import NUCLEI
from pathology.weights import load_network
from pathology.wsi import ArraySource
from research.pathology.metrics import aji, dice
from strategies.patches import patch_grid

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="an images/ + masks/ folder (nuclei_cpm15)")
    parser.add_argument("--tiles", choices=["train", "held-out"], required=True)
    parser.add_argument("--weights", type=Path, default=NUCLEI.shipped_weights_path)
    parser.add_argument(
        "--dropout",
        type=lambda text: [float(p) for p in text.split(",")],
        default=[MC_DROPOUT],
        help="comma-separated dropout probabilities to measure bald with (default: the app's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, help="also write every window's measures and errors here")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, held_out = split_tiles(cpm_tiles(args.data))
    tiles = train if args.tiles == "train" else held_out
    network = load_network(NUCLEI, args.weights)

    strategies = {
        "entropy": WSIUncertain(NUCLEI, lambda: network, random.Random(args.seed)),
        "tta": WSIUncertain(NUCLEI, lambda: network, random.Random(args.seed), measure="tta"),
    }
    for p in args.dropout:
        strategies[f"bald p={p}"] = WSIUncertain(
            NUCLEI, lambda: network, random.Random(args.seed), measure="bald", dropout=p
        )

    rows: list[dict] = []
    for tile in tiles:
        source = ArraySource(tile.image)
        boxes = patch_grid(source.dimensions, (PROBE, PROBE))
        measured = {name: s.scored(source, boxes, tile.id, network) for name, s in strategies.items()}
        for box in boxes:
            x, y, w, h = box
            pred = predict_instances(network, NUCLEI, source.read(x, y, w, h))
            truth = tile.mask[y : y + h, x : x + w]
            row = {"tile": tile.id, "x": x, "y": y}
            row |= {"1 - Dice": 1.0 - dice(pred, truth), "1 - AJI": 1.0 - aji(pred, truth)}
            for name, by_box in measured.items():
                row[name] = float(by_box[box][name.split()[0]])
            rows.append(row)

    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    errors = ["1 - Dice", "1 - AJI"]
    quarter = max(1, len(rows) // 4)
    mean = {e: float(np.mean([r[e] for r in rows])) for e in errors}
    print(f"{args.tiles} tiles: {', '.join(t.id for t in tiles)}; {len(rows)} windows of {PROBE} px\n")
    print(
        "| measure | Spearman with 1 - Dice | with 1 - AJI | within a tile, mean: with 1 - Dice | with 1 - AJI "
        "| top quarter: mean 1 - Dice | mean 1 - AJI |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| random (expected) | 0 | 0 | 0 | 0 | {mean['1 - Dice']:.3f} | {mean['1 - AJI']:.3f} |")
    for name in strategies:
        values = np.array([r[name] for r in rows])
        top = np.argsort(-values, kind="stable")[:quarter]
        rho = {e: spearmanr(values, [r[e] for r in rows]).statistic for e in errors}
        within = {e: np.mean([_rho(rows, t.id, name, e) for t in tiles]) for e in errors}
        picked = {e: float(np.mean([rows[i][e] for i in top])) for e in errors}
        print(
            f"| {name} | {rho['1 - Dice']:+.2f} | {rho['1 - AJI']:+.2f} | {within['1 - Dice']:+.2f} | "
            f"{within['1 - AJI']:+.2f} | {picked['1 - Dice']:.3f} | {picked['1 - AJI']:.3f} |"
        )


def _rho(rows: list[dict], tile: str, measure: str, error: str) -> float:
    """Spearman correlation of ``measure`` with ``error`` over the windows of one tile."""
    mine = [r for r in rows if r["tile"] == tile]
    return float(spearmanr([r[measure] for r in mine], [r[error] for r in mine]).statistic)


if __name__ == "__main__":
    main()
