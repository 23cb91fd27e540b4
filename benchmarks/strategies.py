"""Speed of active learning in the radiology app: next-sample latency and scoring time per image.

    python -m benchmarks.strategies --shared ../shared/data

1. ``next_sample``: a real ``RadiologyApp`` over a studies folder of ``--images`` small NIfTI files
   (placeholders: only their ids matter here) with a score store holding an entropy, BALD, TTA
   score and a 128-long embedding per image, as a scoring run leaves it; each strategy is asked for
   ``k`` 1 and 8 by distinct clients (each request reserves its picks, so none is answered twice).
2. Scoring: the app's scorer (MC dropout, test-time augmentation, embedding; the app's defaults)
   on real hippocampus volumes with the shipped weights, seconds per image.

Prints a markdown table per part; medians over the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# The placeholder studies folder is deleted at the end: no file watcher needed.
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from appcore.settings import AppSettings  # noqa: E402
from radiology.app import RadiologyApp  # noqa: E402
from radiology.registry import MODELS  # noqa: E402
from radiology.uncertainty import MCDropoutScorer  # noqa: E402
from research.radiology.splits import msd_cases  # noqa: E402
from strategies.scores import Score  # noqa: E402

STRATEGY_NAMES = ("random", "epistemic", "bald", "tta", "diversity")


def make_app(root: Path, images: int, seed: int = 0) -> RadiologyApp:
    studies, app_dir = root / "studies", root / "app"
    studies.mkdir(parents=True)
    placeholder = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    for i in range(images):
        nib.save(placeholder, studies / f"img{i:05d}.nii.gz")
    app = RadiologyApp(str(app_dir), str(studies), {"models": "hippocampus", "score_on_start": "false"})
    rng = np.random.default_rng(seed)
    app.score_store().update(
        {
            f"img{i:05d}": Score(
                float(rng.random()),
                "v1",
                0.0,
                {
                    "bald": float(rng.random()),
                    "tta": float(rng.random()),
                    "embedding": rng.random(128).round(4).tolist(),
                },
            )
            for i in range(images)
        }
    )
    return app


def next_sample_table(images: int, repeats: int) -> str:
    lines = [
        f"next sample over {images} unlabelled scored images (ms, median of {repeats})",
        "",
        "| strategy | k=1 | k=8 |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        app = make_app(Path(tmp), images)
        client = 0
        for name in STRATEGY_NAMES:
            cells = []
            for k in (1, 8):
                times = []
                for _ in range(repeats):
                    client += 1
                    start = time.perf_counter()
                    result = app.next_sample({"strategy": name, "k": k, "client_id": f"c{client}"})
                    times.append(1000 * (time.perf_counter() - start))
                    assert len(result["ids"]) == k, result
                cells.append(f"{statistics.median(times):.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scoring_table(shared: Path, cases: int) -> str:
    settings = AppSettings.from_conf({"models": "hippocampus"}, MODELS)
    spec = MODELS["hippocampus"]
    scorer = MCDropoutScorer(
        spec, [str(spec.shipped_weights_path)], samples=settings.mc_samples, tta_samples=settings.tta_samples
    )
    paths = [str(c.image) for c in msd_cases(shared / "hippocampus_mr")[:cases]]
    scorer.score(paths[0])  # load the network and warm up
    times = []
    for p in paths:
        start = time.perf_counter()
        scorer.score(p)
        times.append(time.perf_counter() - start)
    return "\n".join(
        [
            f"scoring hippocampus volumes ({settings.mc_samples} MC dropout passes, {settings.tta_samples} "
            f"augmentations, embedding; {torch.get_num_threads()} threads, {scorer.device})",
            "",
            "| images | median s/image | max s/image |",
            "|---|---|---|",
            f"| {len(times)} | {statistics.median(times):.3f} | {max(times):.3f} |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", type=int, default=10, help="hippocampus volumes to score")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        print(f"load average: {f.read().split()[:3]}\n")
    print(next_sample_table(args.images, args.repeats) + "\n")
    if (args.shared / "hippocampus_mr").is_dir():
        print(scoring_table(args.shared, args.cases))
    else:
        print(f"scoring: skipped, {args.shared / 'hippocampus_mr'} is absent")


if __name__ == "__main__":
    main()
