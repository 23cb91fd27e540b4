"""Issue 23's attacks on a real server: the answer, the time to answer and the server's peak memory.

Starts ``monailabel start_server`` (``tests.servers``) on a temporary studies folder holding one
hippocampus case, with ``--conf models hippocampus,organs_ct``, and sends each attack in turn: small
gzip files declaring huge grids (``tests.bombs``) as image upload, infer upload, label and session,
images whose affine is NaN or singular, normal infers for reference, the largest images the budget
lets through (two at once) and a routine CT (512 x 512 x 300 int16 at 0.8 x 0.8 x 1 mm, synthetic).
Before each, the peak resident memory (``VmHWM``) of the server and its children is reset (``/proc/PID/clear_refs``);
during it, their summed RSS is sampled every 10 ms. Prints a Markdown table.

Run it under a memory cap, in case::

    prlimit --as=6000000000 .venv/bin/python -m benchmarks.attacks
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil
import torch

from radiology.registry import MODELS
from tests.bombs import write_nifti_bomb
from tests.conftest import HIPPO, SPLEEN, TOTALSEG
from tests.servers import monailabel_server

MB = 2**20


class TreeMemory:
    """Peak memory of a process and its children while a block runs."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def measure(self, action: Callable[[], object]) -> tuple[object, float, float, float]:
        """``action()``'s result, its seconds, the tree's peak summed RSS (sampled) and the largest
        ``VmHWM`` of one process of it (exact), both in MB."""
        for p in self._tree():
            with contextlib.suppress(OSError):
                Path(f"/proc/{p.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                total = 0
                for p in self._tree():
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak[0] = max(peak[0], total)
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        try:
            result = action()
        finally:
            took = time.perf_counter() - started
            hwm = 0
            for p in self._tree():
                try:
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm = max(hwm, int(line.split()[1]) * 1024)
                except OSError:
                    pass
            done.set()
            sampler.join()
        return result, took, peak[0] / MB, hwm / MB


def _file(path: Path, field: str = "file") -> dict[str, tuple[str, bytes]]:
    return {field: (path.name, path.read_bytes())}


def _answer(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail", "") if r.status_code >= 400 else ""
    except (json.JSONDecodeError, AttributeError):
        detail = ""
    return f"{r.status_code} {str(detail)[:90]}".strip()


def _bad_affine(path: Path, affine: np.ndarray) -> Path:
    def edit(header: nib.Nifti1Header) -> None:
        header.set_qform(None, code=0)
        header.set_sform(affine, code=2)

    return write_nifti_bomb(path, (64, 64, 64), np.int16, edit=edit)


def _largest(path: Path, model: str, voxel: float, budget_mb: int) -> Path:
    """A random cube of ``voxel`` mm voxels whose ``model`` infer the server estimates just under ``budget_mb``."""
    from appcore.validation import infer_memory_mb

    spec, affine = MODELS[model], np.diag([voxel, voxel, voxel, 1.0])
    side = 16
    while infer_memory_mb((side + 1,) * 3, affine, spec.spacing, spec.num_classes, dtype="float32") <= budget_mb:
        side += 1
    data = np.random.default_rng(0).normal(100, 30, (side, side, side)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def routine_ct(path: Path, shape: tuple[int, int, int] = (512, 512, 300)) -> Path:
    """A synthetic CT-like int16 volume of ``shape`` at 0.8 x 0.8 x 1 mm, RAS: air around a body
    cylinder of soft tissue with denser bands, and noise, in Hounsfield units."""
    rng = np.random.default_rng(0)
    x, y = np.ogrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j]
    body = (x**2 + y**2 < 0.8)[..., None]
    bands = (60 * np.sin(np.linspace(0, 16, shape[2]))).astype(np.int16)
    data = np.where(body, 40 + bands, -1000).astype(np.int16)
    data += rng.integers(-20, 20, shape, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 1.0, 1.0])), str(path))
    return path


def run(budget_mb: int) -> list[tuple[str, str, float, float, float, int]]:
    root = Path(tempfile.mkdtemp(prefix="attacks-"))
    try:
        files, studies = root / "files", root / "studies"
        files.mkdir()
        studies.mkdir()
        case = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
        shutil.copyfile(case, studies / "case.nii.gz")
        bomb = {n: write_nifti_bomb(files / f"bomb{n}.nii.gz", (n, n, n)) for n in (512, 768, 1024)}
        nan = np.eye(4)
        nan[1, 3] = np.nan
        bad = {
            "nan": _bad_affine(files / "nan_affine.nii.gz", nan),
            "zero voxel size": _bad_affine(files / "zero_voxel.nii.gz", np.diag([1.0, 1.0, 0.0, 1.0])),
            "singular (collinear axes)": _bad_affine(
                files / "singular_affine.nii.gz",
                np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
            ),
        }
        largest = [
            ("hippocampus", _largest(files / "largest_mr.nii.gz", "hippocampus", 1.0, budget_mb)),
            # at 4 mm the model's grid is 5 times the image's (class scores dominate), at 1 mm a
            # twelfth of it (the image's own grid and the inverse resampling dominate)
            ("organs_ct", _largest(files / "largest_ct.nii.gz", "organs_ct", 4.0, budget_mb)),
            ("organs_ct", _largest(files / "largest_ct_1mm.nii.gz", "organs_ct", 1.0, budget_mb)),
        ]
        routine = routine_ct(files / "routine_ct.nii.gz")
        weights = files / "organs_ct_random.pt"
        torch.manual_seed(0)
        torch.save(MODELS["organs_ct"].network().state_dict(), weights)
        conf = {"models": "hippocampus,organs_ct", "score_on_start": "false", "infer_memory_mb": str(budget_mb)}
        rows = []
        with monailabel_server(root / "server", str(studies), conf, http_timeout=600) as server:
            memory = TreeMemory(server.process.pid)
            http = server.http

            def row(name: str, action: Callable[[], httpx.Response], size: Path | None = None) -> None:
                r, took, tree, hwm = memory.measure(action)
                assert isinstance(r, httpx.Response)
                rows.append((name, _answer(r), took, tree, hwm, size.stat().st_size if size else 0))
                print(f"{name}: {_answer(r)} {took:.2f} s, tree {tree:.0f} MB, largest VmHWM {hwm:.0f} MB", flush=True)

            _, _, idle, _ = memory.measure(lambda: time.sleep(1.0))
            rows.append(("server idle (1 s)", "", 1.0, idle, idle, 0))
            row(
                "reference: infer hippocampus on a stored case",
                lambda: http.post("/infer/hippocampus", params={"image": "case", "output": "image"}),
            )
            spleen = SPLEEN / "imagesTr" / "spleen_2.nii.gz"
            row(
                "reference: infer organs_ct, upload of spleen_2 (164x166x26)",
                lambda: http.post("/infer/organs_ct", params={"output": "image"}, files=_file(spleen)),
                spleen,
            )
            example = TOTALSEG / "example_ct.nii.gz"
            row(
                "reference: infer organs_ct, upload of example_ct (122x101x112)",
                lambda: http.post("/infer/organs_ct", params={"output": "image"}, files=_file(example)),
                example,
            )
            row(
                "768^3 uint8: PUT /datastore/?image=big768",
                lambda: http.put("/datastore/", params={"image": "big768"}, files=_file(bomb[768])),
                bomb[768],
            )
            row("768^3: then POST /infer/organs_ct?image=big768", lambda: http.post("/infer/organs_ct?image=big768"))
            shutil.copyfile(bomb[768], studies / "copied768.nii.gz")  # past every upload check
            deadline = time.monotonic() + 30
            while http.get("/datastore/image/info", params={"image": "copied768"}).status_code != 200:
                assert time.monotonic() < deadline, "the folder watcher did not list copied768"
                time.sleep(0.5)
            row(
                "768^3 copied into the studies folder: POST /infer/organs_ct?image=copied768",
                lambda: http.post("/infer/organs_ct?image=copied768"),
            )
            row(
                "512^3 uint8: POST /infer/organs_ct with the file",
                lambda: http.post("/infer/organs_ct", files=_file(bomb[512])),
                bomb[512],
            )
            row(
                "1024^3 uint8 label: PUT /datastore/label?image=case&tag=final",
                lambda: http.put(
                    "/datastore/label", params={"image": "case", "tag": "final"}, files=_file(bomb[1024], "label")
                ),
                bomb[1024],
            )
            row(
                "1024^3 uint8 image: PUT /datastore/?image=bomb1024",
                lambda: http.put("/datastore/", params={"image": "bomb1024"}, files=_file(bomb[1024])),
                bomb[1024],
            )
            row(
                "1024^3 uint8 session: PUT /session/",
                lambda: http.put("/session/", files=_file(bomb[1024], "files")),
                bomb[1024],
            )
            for name, path in bad.items():
                row(
                    f"{name} affine: PUT /datastore/?image=bad",
                    lambda p=path: http.put("/datastore/", params={"image": "bad"}, files=_file(p)),
                    path,
                )
                row(
                    f"{name} affine: POST /infer/organs_ct with the file",
                    lambda p=path: http.post("/infer/organs_ct", files=_file(p)),
                    path,
                )
            # The most one infer may take, twice at once (infer_concurrency 2): organs_ct with random
            # weights, so that it runs the network and inverts the resampling as a trained model does.
            r = http.put("/model/organs_ct", files=_file(weights))
            assert r.status_code == 200, r.text
            for model, path in largest:
                img = nib.load(path)

                def two_at_once(m: str = model, p: Path = path) -> httpx.Response:
                    with ThreadPoolExecutor(2) as pool:
                        answers = list(
                            pool.map(
                                lambda _: http.post(f"/infer/{m}", params={"output": "image"}, files=_file(p)),
                                range(2),
                            )
                        )
                    return max(answers, key=lambda r: r.status_code)

                row(
                    f"largest image within the budget ({img.shape[0]}^3 at {img.header.get_zooms()[0]:g} mm): "
                    f"2 {model} infers at once",
                    two_at_once,
                    path,
                )
            r = http.post("/infer/organs_ct", params={"output": "image"}, files=_file(routine))  # warm-up
            assert r.status_code == 200, r.text
            row(
                "routine CT, 512 x 512 x 300 int16 at 0.8 x 0.8 x 1 mm: 1 organs_ct infer",
                lambda: http.post("/infer/organs_ct", params={"output": "image"}, files=_file(routine)),
                routine,
            )

            def two_cts() -> httpx.Response:
                with ThreadPoolExecutor(2) as pool:
                    answers = list(
                        pool.map(
                            lambda _: http.post("/infer/organs_ct", params={"output": "image"}, files=_file(routine)),
                            range(2),
                        )
                    )
                return max(answers, key=lambda r: r.status_code)

            row("routine CT, 512 x 512 x 300 int16 at 0.8 x 0.8 x 1 mm: 2 organs_ct infers at once", two_cts, routine)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infer-memory-mb", type=int, default=640, help="--conf infer_memory_mb of the server")
    args = parser.parse_args()
    rows = run(args.infer_memory_mb)
    print()
    print("| request | answer | seconds | peak RSS, server + children (MB) | largest VmHWM (MB) | file (KB) |")
    print("|---|---|---|---|---|---|")
    for name, answer, took, tree, hwm, size in rows:
        print(f"| {name} | {answer} | {took:.2f} | {tree:.0f} | {hwm:.0f} | {size / 1024:.0f} |")


if __name__ == "__main__":
    main()
