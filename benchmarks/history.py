"""What label history, the audit log, reservations and scores in the project database cost (``--help``).

Measured through the project's own classes on a real hippocampus MR case and a synthetic CT-sized
volume (512 x 512 x 120), alternating saves with and without history so that a loaded machine
slows both alike:

- seconds per label save (``CheckedLocalDatastore.save_label``: checks, write, rename) with and
  without a version kept (``appcore.history``);
- milliseconds per audit entry (``appcore.history.record_request``, one write transaction);
- milliseconds per reservation pick, in the JSON file and in the database;
- milliseconds per score flush of a scoring run (10 scores, one transaction) and per strategy read
  of every score (parsed again after a change; cached otherwise), with a JSON file's parse of the
  same scores beside it.

The database is SQLite in a temporary folder, or ``--database-url postgresql://...`` (an empty
database: the benchmark's tables are made in it).
"""

from __future__ import annotations

import argparse
import json
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
from strategies.scores import Score, ScoreStore

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
    parser.add_argument("--scores", type=int, default=2000, help="scored images (64-float embeddings each)")
    parser.add_argument("--database-url", default="", help="a PostgreSQL database (default: SQLite, temporary)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="history-bench.") as tmp:
        work = Path(tmp)
        cases = _cases(work)
        db = ProjectDB(args.database_url or work / "model" / "project.db")
        print(f"database: {db.engine} ({db.where})")
        history = LabelHistory(db, work / "model" / HISTORY_DIR)
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
        _scores(work, db, args.scores)


def _ms(t: list[float]) -> str:
    return f"{statistics.median(t) * 1000:.2f}; {np.percentile(t, 95) * 1000:.2f}"


def _scores(work: Path, db: ProjectDB, n: int) -> None:
    rng = np.random.default_rng(0)
    store = ScoreStore(work / "model" / "scores_bench.json", db=db)
    scores = {
        f"img{i}": Score(float(rng.random()), "v1", time.time(), {"bald": 0.1, "embedding": rng.random(64).tolist()})
        for i in range(n)
    }
    names, flush = list(scores), []
    for start in range(0, n, 10):
        batch = {k: scores[k] for k in names[start : start + 10]}
        started = time.perf_counter()
        store.update(batch)
        flush.append(time.perf_counter() - started)
    print(f"score flush of 10 scores, ms (median of {len(flush)}; p95): {_ms(flush)}")
    changed, cached = [], []
    for i in range(20):
        store.update({names[i]: scores[names[i]]})  # a change: the next read parses every score again
        started = time.perf_counter()
        assert len(store.load()) == n
        changed.append(time.perf_counter() - started)
        started = time.perf_counter()
        store.load()
        cached.append(time.perf_counter() - started)
    print(f"read of {n} scores after a change, ms (median of 20; p95): {_ms(changed)}")
    print(f"read of {n} scores, nothing changed (cached), ms (median of 20; p95): {_ms(cached)}")
    path = work / "scores.json"
    path.write_text(json.dumps({k: vars(v) for k, v in scores.items()}))
    parse = []
    for _ in range(20):
        started = time.perf_counter()
        {k: Score(**v) for k, v in json.loads(path.read_text()).items()}
        parse.append(time.perf_counter() - started)
    print(f"the same {n} scores parsed from a JSON file (the old store after a change), ms: {_ms(parse)}")


if __name__ == "__main__":
    main()
