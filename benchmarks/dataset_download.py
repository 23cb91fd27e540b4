"""``GET /datastore/dataset`` on a large labelled dataset: ``python -m benchmarks.dataset_download --help``.

A research group exports its labelled cases with this endpoint. The benchmark builds a studies folder
of ``--cases`` labelled CT cases (hard links to one real CT crop of ``../shared/data/totalseg_ct`` and
its aorta mask, so that a dataset of gigabytes costs no disk), starts the radiology server on it, and
downloads the archive while another client asks ``/info/`` every 100 ms. It prints, per server: the
download's seconds, the slowest ``/info/`` answer during it, what the download left in the server's
temporary folder and the server's peak memory. ``--before TREE`` also runs the project's code from
another checkout (``git worktree add TREE <commit>``), taking turns with this one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.radiology import (
    ROOT,
    InfoProbe,
    PeakRSS,
    copy_project_app,
    free_port,
    start_server,
    stop_server,
    wait_for_info,
)

CT = Path("totalseg_ct") / "chest_aorta" / "ct_cropped.nii.gz"
LABEL = Path("totalseg_ct") / "chest_aorta" / "aorta.nii.gz"
CONF = {"models": "organs_ct", "score_on_start": "false"}


@dataclass
class Figures:
    download_s: list[float] = field(default_factory=list)
    info_worst_s: list[float] = field(default_factory=list)
    tmp_left_mb: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    archive_mb: float = 0.0


def make_studies(shared: Path, folder: Path, cases: int) -> None:
    """``cases`` labelled cases, each a hard link to the same real CT and its (final) label."""
    labels = folder / "labels" / "final"
    labels.mkdir(parents=True)
    for i in range(cases):
        name = f"chest_{i:04d}.nii.gz"
        os.link(shared / CT, folder / name)
        os.link(shared / LABEL, labels / name)


def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def download_once(app_dir: Path, studies: Path, work: Path, tree: Path | None, figures: Figures, cases: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tmpdir-", dir=work))
    env = {"TMPDIR": str(tmp)}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    port, log = free_port(), work / f"server-{time.monotonic_ns()}.log"
    download = work / "dataset.zip"
    proc = start_server(app_dir, studies, port, log, CONF, env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=1800) as client:
            wait_for_info(client, proc, log)
            before = _files(tmp)
            with PeakRSS(proc.pid) as mem, InfoProbe(url, interval_s=0.1) as probe:
                t = time.perf_counter()
                with client.stream("GET", "/datastore/dataset") as r, download.open("wb") as out:
                    r.raise_for_status()
                    for chunk in r.iter_bytes():
                        out.write(chunk)
                figures.download_s.append(time.perf_counter() - t)
            with zipfile.ZipFile(download) as archive:
                images = [n for n in archive.namelist() if n.startswith("image/")]
            if len(images) != cases:
                raise RuntimeError(f"The archive holds {len(images)} images, not {cases}")
            figures.archive_mb = download.stat().st_size / 2**20
            figures.info_worst_s.append(probe.worst)
            figures.peak_rss_mb.append(mem.peak / 2**20)
            time.sleep(1.0)  # a removal queued after the response has run by now
            left = {p: s for p, s in _files(tmp).items() if p not in before}
            figures.tmp_left_mb.append(sum(left.values()) / 2**20)
    finally:
        stop_server(proc)
        download.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout of this project, run in turns with this one")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    studies, app_dir = work / "studies", copy_project_app(work / "app")
    make_studies(args.shared, studies, args.cases)
    trees: dict[str, Path | None] = {"this checkout": None}
    if args.before is not None:
        trees = {f"before ({args.before})": args.before.resolve(), **trees}
    figures = {name: Figures() for name in trees}
    load = os.getloadavg()[0]
    try:
        for _ in range(args.repeats):
            for name, tree in trees.items():
                download_once(app_dir, studies, work, tree, figures[name], args.cases)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; load average {load:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {args.cases} labelled CT cases; medians of {args.repeats}"
    )
    print("| code | archive MB | download s | slowest /info/ during it, s | left in TMPDIR, MB | peak RSS, MB |")
    print("|---|---|---|---|---|---|")
    for name, f in figures.items():
        cells = [statistics.median(v) for v in (f.download_s, f.info_worst_s, f.tmp_left_mb, f.peak_rss_mb)]
        print(f"| {name} | {f.archive_mb:.0f} | {cells[0]:.2f} | {cells[1]:.3f} | {cells[2]:.0f} | {cells[3]:.0f} |")


if __name__ == "__main__":
    main()
