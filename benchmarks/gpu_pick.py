"""Pick the hippocampus recipe of a GPU session by validation Dice alone: ``python benchmarks/gpu_pick.py WORK OUT``.

Reads ``WORK/<recipe>.history.json`` of ``benchmarks/gpu_session.sh``, prints each recipe's best
validation epoch, and copies the weights of the best one to ``OUT/hippocampus_<recipe>.pt``.
The test split plays no part in the choice.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

RECIPES = tuple(os.environ.get("RECIPES", "base,flip,wide,flip_s2").split(","))


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    best: dict[str, float] = {}
    for name in RECIPES:
        path = work / f"{name}.history.json"
        if not path.exists():
            print(f"{name}: no history")
            continue
        data = json.loads(path.read_text())
        top = data["best"] or {}
        last = (data.get("epochs") or data["steps"])[-1]
        best[name] = top.get("val_mean_dice", -1.0)
        print(
            f"{name}: best epoch {top.get('epoch')} val {top.get('val_mean_dice')} {top.get('val_dice')}; "
            f"ran {last['epoch']} epochs, stopped early {data.get('stopped_early')}, last record {last['seconds']} s, "
            f"last val {last.get('val_mean_dice')}"
        )
    if best:
        name = max(best, key=best.__getitem__)
        print(f"chosen by validation: {name} {best[name]}")
        shutil.copyfile(work / f"{name}.pt", out / f"hippocampus_{name}.pt")


if __name__ == "__main__":
    main()
