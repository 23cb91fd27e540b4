"""Train, tune and evaluate the shipped nuclei weights.

``python -m research.pathology.offline {train,tune,evaluate} --help``.
"""

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
from pathology.training import Augment, Example, train_steps
from pathology.weights import load_network, save_weights_atomically
from research.pathology.dsb2018 import ImageType, dsb_tiles
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


# Offline training on several microscopes: nuclei sizes vary about 10x across DSB2018 and between
# CPM-15's 20x and 40x tiles; inversion lets fluorescence and brightfield share features.
WIDE_AUGMENT = Augment(zoom=(0.5, 2.0), gain=(0.8, 1.2), shift=0.12, contrast=(0.6, 1.4), invert=0.25, grey=0.15)


def sources(args: argparse.Namespace) -> tuple[list[Tile], list[float], dict[str, int]]:
    """Training tiles and their sampling weights: each source (CPM-15, and per image type DSB2018)
    draws its share of the batches, whatever its number of images."""
    cpm_train, _ = split_tiles(cpm_tiles(args.data))
    groups: dict[str, list[Tile]] = {"cpm15": cpm_train}
    if args.dsb:
        for tile, kind in dsb_tiles(args.dsb, "train"):
            groups.setdefault(f"dsb_{kind.value}", []).append(tile)
    share = {"cpm15": args.cpm_share}
    rest = [g for g in groups if g != "cpm15"]
    for g in rest:
        share[g] = (1.0 - args.cpm_share) / len(rest)
    if not rest:
        share["cpm15"] = 1.0
    tiles, weights = [], []
    for g, members in groups.items():
        tiles += members
        weights += [share[g] / len(members)] * len(members)
    return tiles, weights, {g: len(m) for g, m in groups.items()}


def _train(args: argparse.Namespace) -> None:
    tiles, weights, sizes = sources(args)
    logger.info("training images per source %s; CPM-15 held out %s", sizes, list(HELD_OUT))
    examples = [Example.of(t.image, t.mask) for t in tiles]
    spec = dataclasses.replace(NUCLEI, patch=args.patch)
    network = load_network(spec, args.init) if args.init else spec.network()
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
        augment=WIDE_AUGMENT if args.dsb else Augment(),
        weights=weights,
    )
    save_weights_atomically(network.state_dict(), args.out)
    history = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "sources": sizes,
        "held_out": list(HELD_OUT),
        "steps": len(losses),
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "loss_per_100": [round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)],
    }
    Path(args.out).with_suffix(".history.json").write_text(json.dumps(history, indent=1))
    logger.info("wrote %s after %d steps", args.out, len(losses))


def _evaluate(args: argparse.Namespace) -> None:
    network = load_network(NUCLEI, args.weights)
    spec = _spec(args)
    if args.dsb:
        _evaluate_dsb(network, spec, args)
        return
    ids = tuple(args.tiles.split(",")) if args.tiles else HELD_OUT
    tiles = cpm_tiles(args.data, ids)
    rows = evaluate(network, spec, tiles)
    print("| tile | Dice | AJI | nuclei (true / found) |")
    print("|---|---|---|---|")
    for tid, r in rows.items():
        if tid == "mean":
            continue
        print(f"| {tid} | {r['dice']:.3f} | {r['aji']:.3f} | {r['nuclei_true']} / {r['nuclei_pred']} |")
    print(f"| **mean** | **{rows['mean']['dice']:.3f}** | **{rows['mean']['aji']:.3f}** | |")


def _evaluate_dsb(network: torch.nn.Module, spec: NucleiSpec, args: argparse.Namespace) -> None:
    """Mean Dice and AJI per image type and over all images of one DSB2018 split."""
    pairs = dsb_tiles(args.dsb, args.split)
    rows = evaluate(network, spec, [t for t, _ in pairs])
    if args.json:
        types = {t.id: k.value for t, k in pairs}
        Path(args.json).write_text(json.dumps({k: {**v, "type": types.get(k, "")} for k, v in rows.items()}))
    print(f"| DSB2018 {args.split} | images | Dice | AJI |")
    print("|---|---|---|---|")
    for kind in ImageType:
        ids = [t.id for t, k in pairs if k is kind]
        if ids:
            d, a = (float(np.mean([rows[i][m] for i in ids])) for m in ("dice", "aji"))
            print(f"| {kind.value} | {len(ids)} | {d:.3f} | {a:.3f} |")
    print(
        f"| **all (mean per image)** | {len(pairs)} | **{rows['mean']['dice']:.3f}** | **{rows['mean']['aji']:.3f}** |"
    )


def _spec(args: argparse.Namespace) -> NucleiSpec:
    """The shipped post-processing, or the thresholds the command line names."""
    changes = {
        k: getattr(args, k) for k in ("fg_threshold", "seed_threshold", "min_area") if getattr(args, k) is not None
    }
    return dataclasses.replace(NUCLEI, **changes)


def _tune(args: argparse.Namespace) -> None:
    """Post-processing thresholds by mean AJI on tuning images only (never the held-out or test ones).

    With ``--dsb`` the score is the mean of two means: over the DSB2018 validation split and over
    CPM-15's training tiles (CPM-15 has no validation tiles), so that neither source decides alone.
    """
    network = load_network(NUCLEI, args.weights)
    cpm_train, _ = split_tiles(cpm_tiles(args.data))
    groups = {"cpm15_train": cpm_train}
    if args.dsb:
        groups["dsb_validation"] = [t for t, _ in dsb_tiles(args.dsb, "validation")]
    maps = {(g, t.id): predict_maps(network, NUCLEI, t.image) for g, ts in groups.items() for t in ts}
    names = list(groups)
    print(f"| fg_threshold | seed_threshold | min_area | {' | '.join(f'{g} Dice | {g} AJI' for g in names)} | score |")
    print("|---|---|---|" + "---|---|" * len(names) + "---|")
    best: tuple[float, str] = (-1.0, "")
    for fg in (0.4, 0.5, 0.6):
        for seed in (0.3, 0.4, 0.5, 0.6, 0.7):
            for min_area in (8, 12, 30):
                spec = dataclasses.replace(NUCLEI, fg_threshold=fg, seed_threshold=seed, min_area=min_area)
                cells, score = [], 0.0
                for g, ts in groups.items():
                    preds = [instances(spec, maps[(g, t.id)]) for t in ts]
                    d = float(np.mean([dice(p, t.mask) for p, t in zip(preds, ts, strict=True)]))
                    a = float(np.mean([aji(p, t.mask) for p, t in zip(preds, ts, strict=True)]))
                    cells += [f"{d:.4f}", f"{a:.4f}"]
                    score += a / len(groups)
                print(f"| {fg} | {seed} | {min_area} | {' | '.join(cells)} | {score:.4f} |", flush=True)
                best = max(best, (score, f"fg {fg} / seed {seed} / min_area {min_area}"))
    print(f"best: {best[1]} (score {best[0]:.4f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on CPM-15's training tiles (and DSB2018's training split with --dsb)")
    t.add_argument("--data", type=Path, required=True, help="folder with images/ and masks/ (nuclei_cpm15)")
    t.add_argument("--init", type=Path, help="weights to fine-tune from (default: from scratch)")
    t.add_argument("--cpm-share", type=float, default=0.3, help="share of crops from CPM-15 when --dsb is given")
    t.add_argument("--out", type=Path, required=True, help="weights file to write (.pt)")
    t.add_argument("--steps", type=int, default=1600)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--minutes", type=float, help="wall-clock budget; the LR schedule anneals within it")
    t.add_argument("--patch", type=int, default=NUCLEI.patch, help="training crop size (multiple of 16)")
    e = sub.add_parser("evaluate", help="Dice and AJI per tile (default: CPM-15's held-out tiles)")
    e.add_argument("--data", type=Path, help="nuclei_cpm15 folder (needed without --dsb)")
    e.add_argument("--weights", type=Path, default=NUCLEI.shipped_weights_path)
    e.add_argument("--tiles", help="comma-separated tile ids instead of the held-out ones")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"), help="DSB2018 split")
    e.add_argument("--json", type=Path, help="with --dsb: write the per-image rows here")
    e.add_argument("--fg-threshold", type=float, help="instead of the shipped foreground threshold")
    e.add_argument("--seed-threshold", type=float, help="instead of the shipped seed threshold")
    e.add_argument("--min-area", type=int, help="instead of the shipped smallest nucleus")
    u = sub.add_parser("tune", help="post-processing thresholds by AJI on tuning images (never held-out ones)")
    u.add_argument("--data", type=Path, required=True)
    u.add_argument("--weights", type=Path, default=NUCLEI.shipped_weights_path)
    for p in (t, e, u):
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        split = "research/pathology/splits/dsb2018.txt"
        p.add_argument("--dsb", type=Path, help=f"nuclei_dsb2018 folder; its split is {split}")
    args = parser.parse_args(argv)
    if args.command == "evaluate" and args.data is None and args.dsb is None:
        parser.error("evaluate needs --data (CPM-15 held-out tiles) or --dsb (a DSB2018 split)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    {"train": _train, "evaluate": _evaluate, "tune": _tune}[args.command](args)


if __name__ == "__main__":
    main()
