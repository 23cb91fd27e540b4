"""Train and evaluate the shipped nuclei weights: ``python -m research.pathology.offline {train,evaluate} --help``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from pathology.data import HELD_OUT, Tile, cpm_tiles, split_tiles
from pathology.predict import instances, predict_instances, predict_maps
from pathology.spec import NUCLEI, NucleiSpec
from pathology.training import Example, train_steps
from pathology.weights import load_network, save_weights_atomically
from research.pathology.metrics import aji, dice

logger = logging.getLogger(__name__)


def evaluate(network: torch.nn.Module, spec: NucleiSpec, tiles: list[Tile]) -> dict[str, dict[str, float]]:
    """Dice and AJI per tile, plus their means under ``"mean"``."""
    rows: dict[str, dict[str, float]] = {}
    for tile in tiles:
        start = time.perf_counter()
        pred = predict_instances(network, spec, tile.image)
        rows[tile.id] = {
            "dice": round(dice(pred, tile.mask), 4),
            "aji": round(aji(pred, tile.mask), 4),
            "nuclei_true": int(len(np.unique(tile.mask)) - 1),
            "nuclei_pred": int(pred.max()),
            "seconds": round(time.perf_counter() - start, 2),
        }
    rows["mean"] = {k: round(float(np.mean([r[k] for r in rows.values()])), 4) for k in ("dice", "aji")}
    return rows


def _train(args: argparse.Namespace) -> None:
    tiles = cpm_tiles(args.data)
    train, held = split_tiles(tiles)
    logger.info("train %s; held out %s", [t.id for t in train], [t.id for t in held])
    examples = [Example.of(t.image, t.mask) for t in train]
    spec = dataclasses.replace(NUCLEI, patch=args.patch)
    network = spec.network()
    start = time.perf_counter()
    losses = train_steps(
        network,
        spec,
        examples,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        time_budget_s=args.minutes * 60 if args.minutes else None,
    )
    save_weights_atomically(network.state_dict(), args.out)
    history = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train": [t.id for t in train],
        "held_out": [t.id for t in held],
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "loss_last_100": round(float(np.mean(losses[-100:])), 4),
        "train_tiles": evaluate(network, NUCLEI, train),
    }
    Path(args.out).with_suffix(".history.json").write_text(json.dumps(history, indent=1))
    logger.info("wrote %s; training-tile scores %s", args.out, history["train_tiles"]["mean"])


def _evaluate(args: argparse.Namespace) -> None:
    network = load_network(NUCLEI, args.weights)
    ids = tuple(args.tiles.split(",")) if args.tiles else HELD_OUT
    tiles = cpm_tiles(args.data, ids)
    rows = evaluate(network, NUCLEI, tiles)
    print("| tile | Dice | AJI | nuclei (true / found) |")
    print("|---|---|---|---|")
    for tid, r in rows.items():
        if tid == "mean":
            continue
        print(f"| {tid} | {r['dice']:.3f} | {r['aji']:.3f} | {r['nuclei_true']} / {r['nuclei_pred']} |")
    print(f"| **mean** | **{rows['mean']['dice']:.3f}** | **{rows['mean']['aji']:.3f}** | |")


def _tune(args: argparse.Namespace) -> None:
    """Post-processing thresholds by mean AJI on the training tiles only (held-out tiles never seen)."""
    network = load_network(NUCLEI, args.weights)
    train, _ = split_tiles(cpm_tiles(args.data))
    maps = {t.id: predict_maps(network, NUCLEI, t.image) for t in train}
    print("| fg_threshold | seed_threshold | min_area | mean Dice | mean AJI |")
    print("|---|---|---|---|---|")
    for fg in (0.4, 0.5, 0.6):
        for seed in (0.3, 0.4, 0.5, 0.6, 0.7):
            for min_area in (12, 30):
                spec = dataclasses.replace(NUCLEI, fg_threshold=fg, seed_threshold=seed, min_area=min_area)
                preds = {t.id: instances(spec, maps[t.id]) for t in train}
                d = np.mean([dice(preds[t.id], t.mask) for t in train])
                a = np.mean([aji(preds[t.id], t.mask) for t in train])
                print(f"| {fg} | {seed} | {min_area} | {d:.4f} | {a:.4f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from scratch on the non-held-out tiles")
    t.add_argument("--data", type=Path, required=True, help="folder with images/ and masks/ (nuclei_cpm15)")
    t.add_argument("--out", type=Path, required=True, help="weights file to write (.pt)")
    t.add_argument("--steps", type=int, default=1600)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--minutes", type=float, help="wall-clock budget; the LR schedule anneals within it")
    t.add_argument("--patch", type=int, default=NUCLEI.patch, help="training crop size (multiple of 16)")
    e = sub.add_parser("evaluate", help="Dice and AJI per tile (default: the held-out tiles)")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--weights", type=Path, default=NUCLEI.shipped_weights_path)
    e.add_argument("--tiles", help="comma-separated tile ids instead of the held-out ones")
    u = sub.add_parser("tune", help="post-processing thresholds by AJI on the training tiles")
    u.add_argument("--data", type=Path, required=True)
    u.add_argument("--weights", type=Path, default=NUCLEI.shipped_weights_path)
    for p in (t, e, u):
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    {"train": _train, "evaluate": _evaluate, "tune": _tune}[args.command](args)


if __name__ == "__main__":
    main()
