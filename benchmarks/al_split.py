"""Lay out the fixed pool/test split of an MSD dataset for ``benchmarks.active_learning``.

    python -m benchmarks.al_split --source ../shared/data/hippocampus_mr --out work/al_hippocampus

Writes ``OUT/pool`` (the training and validation cases of ``research.radiology.splits``; ``--pool-size``
thins it) and ``OUT/test`` (its test cases, the ones the model card reports on), each with
``imagesTr/`` and ``labelsTr/`` of symbolic links to the source files. Nothing is copied.
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
    parser.add_argument("--source", type=Path, required=True, help="MSD-layout dataset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pool-size", type=int, help="keep only this many pool cases (evenly spaced), for speed")
    args = parser.parse_args(argv)
    counts = make_split(args.source, args.out, args.pool_size)
    print(f"{args.out / 'pool'}: {counts['pool']} cases; {args.out / 'test'}: {counts['test']} cases")


if __name__ == "__main__":
    main()
