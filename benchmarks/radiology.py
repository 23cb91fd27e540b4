"""Speed and memory of the radiology app on real volumes: ``python -m benchmarks.radiology --help``.

Prints one Markdown table: start-up to ``/info``, infer latency per model over HTTP, training
seconds per epoch, epistemic scoring seconds per image, and peak resident memory. Medians over
repeats. ``organs_ct`` ships untrained (its infer would skip the network), so the benchmark gives it
freshly initialised weights: the cost of a forward pass does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

from appcore.weights import save_weights_atomically
from radiology.app import RadiologyApp
from radiology.registry import MODELS
from radiology.uncertainty import MCDropoutScorer
from research.radiology.splits import msd_cases, split_cases

ROOT = Path(__file__).resolve().parents[1]
TRAIN_EPOCHS = 3


class PeakRSS:
    """Samples the resident memory of a process and all its children every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class InfoProbe:
    """Asks ``/info/`` every ``interval_s`` from a thread of its own while in use (a viewer polling);
    ``worst`` is then the slowest answer, in seconds."""

    def __init__(self, url: str, interval_s: float = 0.05) -> None:
        self.url, self.interval_s, self.worst = url, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as client:
            while not self._stop.is_set():
                t = time.perf_counter()
                client.get("/info/").raise_for_status()
                self.worst = max(self.worst, time.perf_counter() - t)
                self._stop.wait(self.interval_s)

    def __enter__(self) -> InfoProbe:
        self._thread.start()
        time.sleep(0.3)  # answered a few times before the measured work starts
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def start_server(
    app_dir: Path,
    studies: Path,
    port: int,
    log: Path,
    conf: dict[str, str],
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> subprocess.Popen:
    """``monailabel start_server`` for ``app_dir`` on ``port``, its output in ``log`` (whose folder is the cwd).

    ``python`` is the interpreter (and so the environment) the server runs in.
    """
    cmd = [python, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", **(env or {})}
    return subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_info(client: httpx.Client, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Poll ``/info/`` until it answers 200; raise with the log's tail if the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Server exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            if client.get("/info/").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"/info/ did not answer within {timeout} s; log {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def copy_project_app(dest: Path, organs_ct_seed: int = 0) -> Path:
    """This project's app folder at ``dest``, with freshly initialised ``organs_ct`` weights (it ships untrained)."""
    shutil.copytree(ROOT / "apps" / "radiology", dest, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    torch.manual_seed(organs_ct_seed)
    save_weights_atomically(MODELS["organs_ct"].network().state_dict(), dest / "model" / "organs_ct.pt")
    return dest


SERVER_CONF = {"models": "hippocampus,organs_ct", "score_on_start": "false"}


def run(shared: Path, repeats: int, hippo_cases: int) -> list[tuple[str, str, float, str]]:
    rows: list[tuple[str, str, float, str]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-radiology-"))
    studies, app_dir = work / "studies", work / "app"
    studies.mkdir()
    hippo = split_cases(msd_cases(shared / "hippocampus_mr"))["test"][:hippo_cases]
    cts = [shared / "totalseg_ct" / "example_ct.nii.gz", shared / "spleen_ct" / "imagesTr" / "spleen_2.nii.gz"]
    for src in [c.image for c in hippo] + cts:
        shutil.copyfile(src, studies / src.name)
    copy_project_app(app_dir)

    # Start-up and infer over HTTP, with the server's memory watched.
    startups, peak = [], 0
    infer_times: dict[str, list[float]] = {"hippocampus": [], "organs_ct": []}
    for r in range(repeats):
        port, log = free_port(), work / f"server{r}.log"
        t0 = time.perf_counter()
        proc = start_server(app_dir, studies, port, log, SERVER_CONF)
        with PeakRSS(proc.pid) as mem, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            wait_for_info(client, proc, log)
            startups.append(time.perf_counter() - t0)
            for model, images in (("hippocampus", [c.image for c in hippo]), ("organs_ct", cts)):
                for image in images:
                    t = time.perf_counter()
                    resp = client.post(f"/infer/{model}", params={"image": image.name.split(".")[0], "output": "image"})
                    resp.raise_for_status()
                    if r > 0 or image != images[0]:  # the very first call also loads the network
                        infer_times[model].append(time.perf_counter() - t)
        stop_server(proc)
        peak = max(peak, mem.peak)
    rows.append(("server start-up to /info", "s", median(startups), f"median of {repeats}"))
    rows.append(
        (
            "infer hippocampus (HTTP, MR ~35x50x35)",
            "s",
            median(infer_times["hippocampus"]),
            f"median of {len(infer_times['hippocampus'])}",
        )
    )
    rows.append(
        (
            "infer organs_ct (HTTP, CT 122x101x112 @3mm and 164x166x26)",
            "s",
            median(infer_times["organs_ct"]),
            f"median of {len(infer_times['organs_ct'])}",
        )
    )
    rows.append(("server peak RSS (start-up + infers)", "MB", peak / 2**20, "process tree"))

    # Epistemic scoring, in-process, as the scoring task runs it.
    for model, images in (("hippocampus", [c.image for c in hippo]), ("organs_ct", cts)):
        weights = MODELS[model].shipped_weights_path if model == "hippocampus" else app_dir / "model" / "organs_ct.pt"
        scorer = MCDropoutScorer(MODELS[model], [str(weights)], samples=8)
        scorer.score(str(images[0]))  # load weights
        times = []
        for _ in range(repeats):
            for image in images:
                t = time.perf_counter()
                scorer.score(str(image))
                times.append(time.perf_counter() - t)
        rows.append(
            (
                f"epistemic scoring {model} (8 MC passes + 4 TTA, embedding)",
                "s/image",
                median(times),
                f"median of {len(times)}",
            )
        )

    # Training: seconds per epoch, each run in a fresh process (as the server runs training).
    images, labels = [c.image for c in hippo], [c.label for c in hippo]
    epoch_times, train_peak = [], 0
    for _ in range(repeats):
        cmd = [sys.executable, "-m", "benchmarks.radiology", "--train-child", "hippocampus"]
        cmd += [arg for pair in zip(images, labels, strict=True) for arg in map(str, pair)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        with PeakRSS(proc.pid) as mem:
            out, _ = proc.communicate()
        train_peak = max(train_peak, mem.peak)
        epoch_times += [float(line.split()[1]) for line in out.splitlines() if line.startswith("EPOCH_SECONDS")]
    rows.append(
        (
            f"training hippocampus, {len(images)} labelled volumes, batch 4",
            "s/epoch",
            median(epoch_times),
            f"median of {len(epoch_times)} runs of {TRAIN_EPOCHS} epochs (incl. set-up)",
        )
    )
    rows.append(("training hippocampus peak RSS", "MB", train_peak / 2**20, "process tree"))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def labelled_app(
    root: Path, model: str, pairs: list[tuple[Path, Path]], conf: dict[str, str] | None = None
) -> RadiologyApp:
    """An app serving ``model`` under ``root`` over copies of the images of ``pairs``, each saved with
    its label (already in the model's label ids) as ``final``; no scoring. ``conf`` adds options."""
    studies = root / "studies"
    studies.mkdir(parents=True)
    for image, _ in pairs:
        shutil.copyfile(image, studies / image.name)
    options = {"models": model, "score_after_train": "false", "score_on_start": "false", **(conf or {})}
    app = RadiologyApp(str(root / "app"), str(studies), options)
    for image, label in pairs:
        app.datastore().save_label(image.name.split(".")[0], str(label), "final", {})
    return app


def train_child(model: str, pairs: list[str], request: dict[str, Any] | None = None) -> None:
    """Child process: an app over copies of the image/label pairs, timed through ``app.train``.

    ``request`` adds to or overrides the training request (``max_epochs`` defaults to ``TRAIN_EPOCHS``).
    """
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    images, labels = [Path(p) for p in pairs[0::2]], [Path(p) for p in pairs[1::2]]
    app = labelled_app(root, model, list(zip(images, labels, strict=True)))
    request = {"model": model, "max_epochs": TRAIN_EPOCHS, "train_batch_size": 4, "val_split": 0.0, **(request or {})}
    start = time.perf_counter()
    app.train(request)
    print("EPOCH_SECONDS", (time.perf_counter() - start) / request["max_epochs"])
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hippo-cases", type=int, default=10)
    parser.add_argument("--train-child", nargs="+", metavar=("MODEL", "PATHS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_child:
        train_child(args.train_child[0], args.train_child[1:])
        return
    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()
    rows = run(args.shared, args.repeats, args.hippo_cases)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only (no CUDA device)"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}; load average before: {load[0]:.2f}")
    print("| measure | unit | value | note |\n|---|---|---|---|")
    for name, unit, value, note in rows:
        print(f"| {name} | {unit} | {value:.2f} | {note} |")


if __name__ == "__main__":
    main()
