"""Lay out the fixed pool/test split of an MSD dataset for ``benchmarks.active_learning``.

    python -m benchmarks.al_split --source ../shared/data/hippocampus_mr --out work/al_hippocampus

Writes ``OUT/pool`` (the training and validation cases of ``research.radiology.splits``; ``--pool-size``
thins it) and ``OUT/test`` (its test cases, the ones the model card reports on), each with
``imagesTr/`` and ``labelsTr/`` of symbolic links to the source files. Nothing is copied.

    python -m benchmarks.al_split --app pathology --source ../shared/data/pathology/nuclei_dsb2018 \
        --out benchmarks/results/al_dsb2018/split.json --pool-size 60 --test-size 40 --seed 2027

writes the pathology simulation's split: a JSON file of pool and test image ids, a seeded draw
(``benchmarks.al_pathology.make_split``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from research.radiology.splits import Case, msd_cases, split_cases


def link_cases(cases: list[Case], dest: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:
        for sub, src in (("imagesTr", case.image), ("labelsTr", case.label)):
            link = dest / sub / src.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src)


def make_split(source: Path, out: Path, pool_size: int | None = None) -> dict[str, int]:
    """Link the split; ``pool_size`` keeps that many pool cases, evenly spaced by case id."""
    split = split_cases(msd_cases(source))
    pool = sorted(split["train"] + split["val"], key=lambda c: c.id)
    if pool_size is not None and pool_size < len(pool):
        pool = [pool[int(i * len(pool) / pool_size)] for i in range(pool_size)]
    link_cases(pool, out / "pool")
    link_cases(split["test"], out / "test")
    return {"pool": len(pool), "test": len(split["test"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=("radiology", "pathology"), default="radiology")
    parser.add_argument("--source", type=Path, required=True, help="MSD-layout dataset, or images/ + masks/ tiles")
    parser.add_argument("--out", type=Path, required=True, help="radiology: a folder; pathology: a JSON file")
    parser.add_argument("--pool-size", type=int, help="keep only this many pool cases (evenly spaced), for speed")
    parser.add_argument("--test-size", type=int, default=40, help="pathology: test images")
    parser.add_argument("--seed", type=int, default=2027, help="pathology: the draw's seed")
    args = parser.parse_args(argv)
    if args.app == "pathology":
        from benchmarks.al_pathology import make_split as make_tile_split

        counts = make_tile_split(
            args.source, args.out, pool_size=args.pool_size or 60, test_size=args.test_size, seed=args.seed
        )
        print(f"{args.out}: {counts['pool']} pool and {counts['test']} test images")
        return
    counts = make_split(args.source, args.out, args.pool_size)
    print(f"{args.out / 'pool'}: {counts['pool']} cases; {args.out / 'test'}: {counts['test']} cases")


if __name__ == "__main__":
    main()
