"""Prepare a demo studies folder from a real MSD dataset: ``python -m research.radiology.demo --help``.

Only the test split's images are copied (no labels: labelling them is the clinician's job), so the
shipped model's predictions in the demo are on cases it never saw in training.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from research.radiology.splits import msd_cases, split_cases


def prepare(source: Path, dest: Path) -> list[Path]:
    cases = split_cases(msd_cases(source))["test"]
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for case in cases:
        target = dest / case.image.name
        if not target.exists():
            shutil.copyfile(case.image, target)
        copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--source", type=Path, required=True, help="MSD-layout folder, e.g. ../shared/data/hippocampus_mr"
    )
    parser.add_argument("--dest", type=Path, required=True, help="studies folder to create")
    args = parser.parse_args(argv)
    if not (args.source / "dataset.json").is_file():
        raise SystemExit(
            f"{args.source} is not an MSD dataset folder (no dataset.json). Point SHARED= at the folder holding "
            "hippocampus_mr, or start the server on your own data: make serve STUDIES=/path/to/niftis"
        )
    copied = prepare(args.source, args.dest)
    print(f"{len(copied)} studies in {args.dest}")


if __name__ == "__main__":
    main()
