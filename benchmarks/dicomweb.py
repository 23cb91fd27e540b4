"""Time from "next sample" to prediction, and to save a DICOM SEG, over DICOMweb on the real series.

``python -m benchmarks.dicomweb --repeats 3`` starts its own Orthanc (Debian's, no GDCM plugin) on a
free port, loads ``ct_abdomen`` (20 slices 512x512, JPEG 2000 lossless) and ``hippocampus_001``
(written as a 35-slice MR series), builds the radiology app in this process on that PACS, and for
each series, after one warm-up infer (weights loaded, as in a running server), and for each repeat
with the series evicted from the local cache: asks the strategy for the next sample, fetches the
series in its stored transfer syntax, decodes and converts it to NIfTI (``fetch+convert``), infers
(``infer``), and saves the prediction as the ``final`` label: SEG written and stored (``save SEG``;
the repeat's SEG is then removed, so the next save has no earlier SEG to delete). Prints a Markdown
table of medians. ``organs_ct`` gets freshly initialised weights (it ships untrained and would skip
the network otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from appcore.dicom.client import DicomWebClient
from appcore.dicom.pacs import Orthanc, hippocampus_series, load, real_series
from appcore.weights import save_weights_atomically
from benchmarks.radiology import free_port
from radiology.app import RadiologyApp
from radiology.registry import MODELS

CASES = (("ct_abdomen", "organs_ct"), ("hippocampus_001", "hippocampus"))


def run(shared: Path, repeats: int) -> list[tuple[str, float, float, float, int]]:
    from monailabel.config import settings
    from monailabel.datastore.local import LocalDatastore

    rows = []
    with tempfile.TemporaryDirectory() as tmp, Orthanc(Path(tmp) / "orthanc", free_port()) as orthanc:
        client = DicomWebClient(orthanc.dicomweb_url)
        series = real_series(shared)
        series = {"ct_abdomen": series["ct_abdomen"], **hippocampus_series(shared, ("hippocampus_001",))}
        uids = load(client, series)
        app_dir = Path(tmp) / "app"
        save_weights_atomically(MODELS["organs_ct"].network().state_dict(), app_dir / "model" / "organs_ct.pt")
        for name, model in CASES:
            settings.MONAI_LABEL_DICOMWEB_CACHE_PATH = str(Path(tmp) / f"cache-{name}")
            app = RadiologyApp(str(app_dir), orthanc.dicomweb_url, {"models": model, "score_on_start": "false"})
            datastore, uid = app.datastore(), uids[name]
            app.infer({"model": model, "image": uid})  # warm-up: weights loaded, as in a running server
            fetch, infer, save = [], [], []
            for _ in range(repeats):
                LocalDatastore.remove_image(datastore, uid)  # empty the local cache: fetch again
                t0 = time.perf_counter()
                assert uid in datastore.get_unlabeled_images(), f"{name} is not offered as a next sample"
                path = datastore.get_image_uri(uid)
                t1 = time.perf_counter()
                result = app.infer({"model": model, "image": uid})
                t2 = time.perf_counter()
                datastore.save_label(uid, result["file"], "final", {"model": model})
                t3 = time.perf_counter()
                assert Path(path).exists()
                fetch.append(t1 - t0)
                infer.append(t2 - t1)
                save.append(t3 - t2)
                # The next repeat must see the series unlabelled again: remove the SEG it just stored.
                datastore.remove_label(uid, "final")
            medians = statistics.median(fetch), statistics.median(infer), statistics.median(save)
            rows.append((name, *medians, len(series[name])))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = run(args.shared, args.repeats)
    print(f"\nload average before the run: {load_before:.2f}; medians of {args.repeats} repeats")
    print("(the series evicted from the local cache before each)\n")
    columns = ["series", "slices", "next sample + fetch + convert (s)", "infer (s)"]
    columns += ["next sample to prediction (s)", "save SEG (s)"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|")
    for name, fetch, infer, save, slices in rows:
        print(f"| {name} | {slices} | {fetch:.2f} | {infer:.2f} | {fetch + infer:.2f} | {save:.2f} |")


if __name__ == "__main__":
    main()
