"""Speed of the pathology app on CPU: ``python -m benchmarks.pathology --help`` prints a Markdown table.

Times go through the app object's own ``infer`` and ``infer_wsi`` (what the HTTP endpoints call),
in-process, on the real slide and a real held-out tile, after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.config import settings as ml_settings
from PIL import Image

from pathology.activelearning import PatchMeasures, WSIDiverse, WSIUncertain
from pathology.app import PathologyApp
from pathology.data import read_rgb
from pathology.postprocess import instance_polygons
from pathology.predict import instances, predict_maps
from pathology.prefetch import PatchPrefetcher

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    fn()  # warm-up: weights loaded, allocator primed
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False  # no file watcher on a temporary folder
    slide = args.shared / "pathology" / "wsi" / "CMU-1-Small-Region.svs"
    tile = args.shared / "pathology" / "nuclei_cpm15" / "images" / "image09.png"  # held out

    with tempfile.TemporaryDirectory() as tmp:
        studies, app_dir = Path(tmp) / "studies", Path(tmp) / "app"
        studies.mkdir()
        app_dir.mkdir()
        shutil.copyfile(slide, studies / "cmu.svs")
        crop = read_rgb(tile)[:512, :512]
        Image.fromarray(crop).save(studies / "tile512.png")
        app = PathologyApp(str(app_dir), str(studies), {"models": "nuclei"})
        task = app._infers["nuclei"]
        network = task.network()

        load = os.getloadavg()[0]
        rows = []
        t, res = _median_time(lambda: app.infer({"model": "nuclei", "image": "tile512"}), args.repeats)
        rows.append(("infer 512x512 tile (instance mask PNG + polygons)", t, res["params"]["count"]))
        maps_t, maps = _median_time(lambda: predict_maps(network, task.spec, crop), args.repeats)
        inst_t, labels = _median_time(lambda: instances(task.spec, maps), args.repeats)
        poly_t, _ = _median_time(lambda: instance_polygons(labels), args.repeats)
        rows += [("  of which network", maps_t, None), ("  of which watershed", inst_t, None)]
        rows.append(("  of which polygons", poly_t, None))
        for size, tile_size in ((1024, 1024), (1024, 512)):
            req = {"model": "nuclei", "image": "cmu", "location": [600, 900], "size": [size, size]}
            req |= {"tile_size": [tile_size, tile_size], "output": "asap"}
            t, res = _median_time(lambda r=req: app.infer_wsi(dict(r)), args.repeats)
            rows.append((f"wsi {size}x{size} region, tiles {tile_size}, ASAP XML", t, res["params"]["count"]))
        req = {"model": "nuclei", "image": "cmu", "location": [0, 0], "size": [0, 0], "output": "dsa"}
        t, res = _median_time(lambda: app.infer_wsi(dict(req)), 1)
        rows.append(("wsi whole slide 2220x2967, tiles 1024, DSA JSON", t, res["params"]["count"]))
        # Next patch: the app's strategies without reservations (every call may pick any patch).
        ask = {"image": "cmu", "patch_size": [512, 512], "k": 4}
        datastore = app.datastore()
        entropy = PatchMeasures(task.spec)  # shared as in the app: clearing one clears both
        strategies = (
            ("wsi_uncertain", WSIUncertain(task.spec, task.network, shared=entropy)),
            ("wsi_bald", WSIUncertain(task.spec, task.network, measure="bald")),
            ("wsi_tta", WSIUncertain(task.spec, task.network, measure="tta")),
            ("wsi_diversity", WSIDiverse(task.spec, task.network, shared=entropy)),
        )
        for name, strategy in strategies:

            def first_request(s: WSIUncertain = strategy) -> Any:
                s.store.stored.clear()
                return s(dict(ask), datastore)

            t, _ = _median_time(first_request, args.repeats)
            rows.append((f"{name}, k=4: first request on the slide (30 patches of 512)", t, None))
            t, _ = _median_time(lambda s=strategy: s(dict(ask), datastore), args.repeats)
            rows.append((f"{name}, k=4: a later request (measures kept)", t, None))

        # The app's background measuring (pathology.prefetch), then each strategy's first request;
        # beside it, the same round with wsi_diversity keeping entropy measures of its own (as
        # before 2026-11-30), the two alternating.
        apart = [*strategies[:3], ("wsi_diversity", WSIDiverse(task.spec, task.network))]
        rounds: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for shared, chosen in ((True, strategies), (False, apart)):
                for _, strategy in chosen:
                    strategy.store.stored.clear()
                prefetcher = PatchPrefetcher([s for _, s in chosen], lambda: datastore, task.network, patch=(512, 512))
                start = time.perf_counter()
                prefetcher.run_once()
                rounds[shared].append(time.perf_counter() - start)
        rows.append(
            ("background measuring, 4 strategies, the slide and the tile", statistics.median(rounds[True]), None)
        )
        rows.append(("  the same, wsi_diversity's entropy pass not shared", statistics.median(rounds[False]), None))
        for name, strategy in strategies:
            start = time.perf_counter()
            strategy(dict(ask), datastore)
            rows.append(
                (f"{name}, k=4: first request on the slide after it (1 run)", time.perf_counter() - start, None)
            )

    print(f"load average before the run: {load:.2f}; torch threads: {args.threads}; median of {args.repeats}")
    print()
    print("| measure | seconds | nuclei |")
    print("|---|---|---|")
    for name, seconds, count in rows:
        shown = f"{seconds:.3f}" if seconds < 0.1 else f"{seconds:.2f}"
        print(f"| {name} | {shown} | {'' if count is None else count} |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
