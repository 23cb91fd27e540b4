"""What label history, the audit log and reservations in SQLite cost: ``python -m benchmarks.history --help``.

Measured through the project's own classes on a real hippocampus MR case and a synthetic CT-sized
volume (512 x 512 x 120), alternating saves with and without history so that a loaded machine
slows both alike:

- seconds per label save (``CheckedLocalDatastore.save_label``: checks, write, rename) with and
  without a version kept (``appcore.history``);
- milliseconds per audit entry (``appcore.history.record_request``, one write transaction);
- milliseconds per reservation pick, in the JSON file and in the database.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from appcore.datastore import CheckedLocalDatastore
from appcore.history import HISTORY_DIR, LabelHistory, record_request
from appcore.projectdb import ProjectDB
from strategies.reservations import ReservationBook

ROOT = Path(__file__).resolve().parents[1]
HIPPO = ROOT.parent / "shared" / "data" / "hippocampus_mr" / "imagesTr" / "hippocampus_001.nii.gz"


def _cases(work: Path) -> dict[str, Path]:
    studies = work / "studies"
    studies.mkdir()
    shutil.copyfile(HIPPO, studies / "hippo.nii.gz")
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    ct = np.random.default_rng(0).integers(-1000, 1000, (512, 512, 120)).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, affine), studies / "ct.nii.gz")
    return {"hippo": studies / "hippo.nii.gz", "ct": studies / "ct.nii.gz"}


def _label(image: Path, dest: Path, value: int) -> str:
    img = nib.load(image)
    data = np.zeros(img.shape, np.uint8)
    sx, sy, sz = (s // 4 for s in img.shape)
    data[sx : 2 * sx + value, sy : 2 * sy, sz : 2 * sz] = 1 + value % 2
    nib.save(nib.Nifti1Image(data, img.affine), dest)
    return str(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=20, help="saves per case and mode")
    parser.add_argument("--entries", type=int, default=500, help="audit entries and reservation picks")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="history-bench.") as tmp:
        work = Path(tmp)
        cases = _cases(work)
        history = LabelHistory(ProjectDB(work / "model" / "project.db"), work / "model" / HISTORY_DIR)
        stores = {
            "without history": CheckedLocalDatastore(
                str(work / "studies"), allowed_values=lambda p: {0, 1, 2}, auto_reload=False
            ),
            "with history": CheckedLocalDatastore(
                str(work / "studies"), allowed_values=lambda p: {0, 1, 2}, auto_reload=False, history=history
            ),
        }
        print(f"label save, seconds (median of {args.saves}; min-max)")
        for case, image in cases.items():
            labels = [_label(image, work / f"{case}{i % 2}.nii.gz", i % 2) for i in range(2)]
            times: dict[str, list[float]] = {mode: [] for mode in stores}
            for i in range(args.saves):
                for mode, store in stores.items():
                    started = time.perf_counter()
                    store.save_label(case, labels[i % 2], "final", {})
                    times[mode].append(time.perf_counter() - started)
            size = Path(stores["with history"].get_label_uri(case, "final")).stat().st_size
            for mode, t in times.items():
                print(
                    f"  {case} {nib.load(image).shape} ({size / 1024:.1f} KB stored): {mode}: "
                    f"{statistics.median(t):.4f} ({min(t):.4f}-{max(t):.4f})"
                )

        entry = {"ts": 0.0, "user": "u", "client": None, "method": "PUT", "path": "/datastore/label"}
        entry |= {"query": "image=x&tag=final", "status": 200, "duration_ms": 1.0}
        t = []
        for _ in range(args.entries):
            started = time.perf_counter()
            record_request(history.db, entry)
            t.append(time.perf_counter() - started)
        print(
            f"audit entry, ms (median of {args.entries}; p95): {statistics.median(t) * 1000:.2f}; "
            f"{np.percentile(t, 95) * 1000:.2f}"
        )

        books = {
            "JSON file": ReservationBook(600, path=work / "reservations.json"),
            "database": ReservationBook(600, db=history.db),
        }
        images = [f"img{i}" for i in range(args.entries + 10)]
        for name, book in books.items():
            t = []
            for _ in range(args.entries):
                started = time.perf_counter()
                book.pick(images, lambda free: free[:1], "client")
                t.append(time.perf_counter() - started)
            print(
                f"reservation pick of 1 among {len(images)}, {name}, ms (median; p95): "
                f"{statistics.median(t) * 1000:.2f}; {np.percentile(t, 95) * 1000:.2f}"
            )


if __name__ == "__main__":
    main()
