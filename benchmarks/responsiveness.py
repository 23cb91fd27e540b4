"""Does the server keep answering while it works? ``python -m benchmarks.responsiveness --help``.

A clinician's infer must not stall the other clinicians' requests: their viewers poll ``/info/``,
list the datastore and load images through the server. The benchmark starts the radiology app on
real volumes (two CTs of ``../shared/data/totalseg_ct``, ``organs_ct`` with freshly initialised
weights, since it ships untrained and a forward pass costs the same whatever the weights, and
hippocampus MR) and, while another client asks ``/info/`` every 50 ms, runs each operation of the
table. It prints the operation's seconds and the slowest ``/info/`` answer during it, medians over
repeats. ``--before TREE`` also runs the project's code from another checkout (``git worktree add
TREE <commit>``), taking turns with this one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.radiology import ROOT, InfoProbe, copy_project_app, free_port, start_server, stop_server, wait_for_info

CONF = {"models": "organs_ct,hippocampus", "score_on_start": "false"}
CTS = (Path("totalseg_ct") / "example_ct.nii.gz", Path("totalseg_ct") / "chest_aorta" / "ct_cropped.nii.gz")
MR = Path("hippocampus_mr") / "imagesTr" / "hippocampus_001.nii.gz"


def operations(client: httpx.Client, shared: Path) -> dict[str, Callable[[], None]]:
    """Each measured operation: a call that raises unless the server answered it with a 200."""

    def infer(model: str, image: str) -> None:
        client.post(f"/infer/{model}", params={"image": image, "output": "image"}).raise_for_status()

    def two_at_once() -> None:  # two clinicians ask for a CT segmentation at the same moment
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(infer, "organs_ct", "example_ct") for _ in range(2)]:
                f.result()

    ct_bytes = (shared / CTS[1]).read_bytes()

    def upload() -> None:
        r = client.put("/datastore/image", params={"image": "uploaded_ct"}, files={"file": ("ct.nii.gz", ct_bytes)})
        r.raise_for_status()

    return {
        "infer organs_ct, CT 122x101x112 @ 3 mm": lambda: infer("organs_ct", "example_ct"),
        "infer organs_ct, CT crop @ 1.5 mm": lambda: infer("organs_ct", "ct_cropped"),
        "infer hippocampus, MR 35x51x35": lambda: infer("hippocampus", "hippocampus_001"),
        "two organs_ct infers at once (122x101x112)": two_at_once,
        "upload a CT (PUT /datastore/image, checked)": upload,
    }


def run_once(app_dir: Path, studies: Path, work: Path, tree: Path | None, shared: Path, out: dict) -> None:
    env = {"PYTHONPATH": str(tree)} if tree is not None else {}
    port, log = free_port(), work / f"server-{time.monotonic_ns()}.log"
    proc = start_server(app_dir, studies, port, log, CONF, env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=1800) as client:
            wait_for_info(client, proc, log)
            ops = operations(client, shared)
            for name, op in ops.items():
                if name.startswith("infer"):
                    op()  # warm-up: the first call also builds the network
            for name, op in ops.items():
                with InfoProbe(url) as probe:
                    t = time.perf_counter()
                    op()
                    seconds = time.perf_counter() - t
                out.setdefault(name, ([], []))
                out[name][0].append(seconds)
                out[name][1].append(probe.worst)
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout of this project, run in turns with this one")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-responsive-"))
    try:
        studies = work / "studies"
        studies.mkdir()
        for path in (*CTS, MR):
            shutil.copyfile(args.shared / path, studies / path.name)
        app_dir = copy_project_app(work / "app")
        trees: dict[str, Path | None] = {"this checkout": None}
        if args.before is not None:
            trees = {f"before ({args.before.name})": args.before.resolve(), **trees}
        figures: dict[str, dict] = {name: {} for name in trees}
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, tree in trees.items():
                run_once(app_dir, studies, work, tree, args.shared, figures[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; load average {load:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; medians of {args.repeats}"
    )
    names = list(trees)
    print("| operation | " + " | ".join(f"{n}: s | {n}: slowest /info/, s" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for op in figures[names[0]]:
        cells = []
        for n in names:
            seconds, worst = figures[n][op]
            cells += [f"{statistics.median(seconds):.2f}", f"{statistics.median(worst):.3f}"]
        print(f"| {op} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
