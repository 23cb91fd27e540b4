"""Does a ``/train`` on a few clinicians' labels make the shipped hippocampus model better or worse?

The scenario of the loop: a clinician corrects and saves N cases the model has never seen, then
trains. Each run builds an app over copies of the first N test-split cases of
``../shared/data/hippocampus_mr`` (their reference labels stand in for the corrections), trains
through ``app.train`` (what ``POST /train/hippocampus`` runs: fine-tuning from the shipped weights,
the server's default settings unless ``--epochs`` says otherwise), and scores the weights it then
serves (those it published, or the shipped ones if it published none) on the last 20 test cases,
which no run trains on, through the server's infer path; the shipped weights are scored on the
same 20 cases::

    .venv/bin/python -m benchmarks.server_finetune --data ../shared/data/hippocampus_mr

The shipped model's held-out figure (all 40 test cases) is not changed by this: it never sees
these fine-tuned weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.radiology import labelled_app
from radiology.registry import MODELS
from research.radiology.evaluate import evaluate
from research.radiology.splits import msd_cases, split_cases

HELD_OUT = 20  # the last test cases: scored, never trained on


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labels", type=int, nargs="+", default=[3, 5, 10, 20], help="N: labels saved before /train")
    parser.add_argument("--epochs", type=int, nargs="+", default=[20], help="max_epochs of each run (20: the default)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (training is random)")
    args = parser.parse_args(argv)
    test = split_cases(msd_cases(args.data))["test"]
    if max(args.labels) > len(test) - HELD_OUT:
        parser.error(f"--labels: at most {len(test) - HELD_OUT} (the last {HELD_OUT} test cases are scored)")
    held_out = test[-HELD_OUT:]
    torch.set_num_threads(os.cpu_count() or 1)
    logging.disable(logging.WARNING)
    shipped = evaluate("hippocampus", MODELS["hippocampus"].shipped_weights_path, held_out)
    print(f"shipped weights on the {HELD_OUT} held-out test cases: {shipped['mean_of_classes']:.4f}")
    print("| labels saved | max_epochs | run | seconds | published epoch | held-out Dice | change |")
    print("|---|---|---|---|---|---|---|")
    for epochs in args.epochs:
        for n in args.labels:
            changes = []
            for repeat in range(args.repeats):
                root = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
                try:
                    pairs = [(c.image, c.label) for c in test[:n]]
                    app = labelled_app(root, "hippocampus", pairs)
                    start = time.perf_counter()
                    result = app.train({"model": "hippocampus", "max_epochs": epochs})
                    seconds = time.perf_counter() - start
                    which = result.get("eval") or result["train"]
                    published = app.published_weights("hippocampus")
                    # A run whose epochs all validate worse than the weights it started from publishes
                    # nothing (radiology.train): the shipped weights are still served.
                    served = published if published.exists() else MODELS["hippocampus"].shipped_weights_path
                    score = evaluate("hippocampus", served, held_out)["mean_of_classes"]
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                change = score - shipped["mean_of_classes"]
                changes.append(change)
                kind = "validation" if result.get("eval") else "training Dice"
                epoch = f"{which['best_metric_epoch']} (by {kind})" if served == published else "none (epoch 0 best)"
                print(f"| {n} | {epochs} | {repeat} | {seconds:.0f} | {epoch} | {score:.4f} | {change:+.4f} |")
            print(f"| {n} | {epochs} | mean | | | | {statistics.mean(changes):+.4f} |")


if __name__ == "__main__":
    main()
