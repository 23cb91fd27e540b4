"""OHIF labeling panel, in the browser: "Next case" to the proposal in the viewer, and "Save" to the SEG stored.

For each dataset a real Orthanc holds its series and a real server serves the model; headless
Chromium (``/usr/bin/chromium``) clicks the panel's buttons, as ``tests/e2e/test_ohif_labeling.py``
does. A repetition: click "Next case" (the viewer reloads on the study the server picked and loads
its proposal), then "Save" the proposal unchanged. Between repetitions the saved label is deleted
over REST, so that the case can be handed out again (``reservation_s 0``).

- ``next_to_proposal_s``: from the click on "Next case" to the proposal's label map in the viewer
  (the page's ``data-labeling-proposal``): the hand-out, OHIF's reload and the series' images, and
  the proposal (computed from the hand-out on; a series whose proposal the server computed before
  for the same weights is answered from its cache).
- ``in_page_viewer_ready_to_proposal_s``: measured by the panel, from the new page's mode entry to the
  proposal in the viewer (the part after OHIF's own start-up).
- ``save_s``: from the click on "Save" to the panel's answer: the SEG written and stored in Orthanc
  (STOW-RS), the SEG saved before deleted, the final label cached.

- ``click_s`` (hippocampus): with "Clicks" on, from a mouse click on the image (near the middle of
  the viewport, for the first segment) to the panel's labelmap holding the interactive model's answer
  (``data-labeling-clicks``): the request with every click so far, ``hippocampus_interactive`` (the
  click-conditioned network, on the cached proposal), the frames back into the labelmap. One click
  first, not counted (it loads the click network), then ``repeats`` clicks, the session growing.

``hippocampus``: five MR cases, a new one each repetition (each saved label stays, so every
proposal is computed cold).
``ct_abdomen``: the one real CT series (512 x 512 x 20, JPEG 2000) with ``organs_ct`` (untrained:
an empty proposal after the same pre-processing), the first repetition cold, the others cached.

Usage: ``python -m benchmarks.ohif_labeling [--repeats 5] [--out benchmarks/out/ohif_labeling.json]``
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from appcore.dicom.client import DicomWebClient
from appcore.dicom.pacs import Orthanc, hippocampus_series, load, real_series
from tests.conftest import SHARED
from tests.e2e.servers import free_port, monailabel_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-sync"]
HIPPOCAMPUS = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_008")


def measure_clicks(page: Any, repeats: int) -> dict[str, Any]:
    """Clicks on, then one click not counted and ``repeats`` timed clicks around the viewport's middle."""
    page.locator('[data-cy="labeling-clicks-toggle"]').click()
    box = page.locator(".cornerstone-canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    offsets = [(0, 0), (12, 0), (-12, 0), (0, 12), (0, -12), (12, 12)]
    times, in_page, first = [], [], 0.0
    for n in range(repeats + 1):
        dx, dy = offsets[n % len(offsets)]
        started = time.perf_counter()
        page.mouse.click(x + dx, y + dy)
        page.wait_for_function(  # the answer in the labelmap, or the panel saying why not
            f"document.body.dataset.labelingClicks === '{n + 1}' || /not applied|outside|off the case/"
            ".test(document.querySelector('[data-cy=\"labeling-message\"]').innerText)",
            polling=50,
        )
        elapsed = time.perf_counter() - started
        if page.evaluate("document.body.dataset.labelingClicks") != str(n + 1):
            raise RuntimeError(page.locator('[data-cy="labeling-message"]').inner_text())
        if n:  # the first click loads the click network
            times.append(elapsed)
            in_page.append(page.evaluate("window.labelingTimes.clickMs") / 1000)
        else:
            first = elapsed
    return {
        "first_click_s": round(first, 3),
        "click_s": [round(t, 3) for t in times],
        "median_click_s": round(statistics.median(times), 3),
        "in_page_click_s": [round(t, 3) for t in in_page],
    }


def measure(
    name: str, series: dict[str, Any], model: str, repeats: int, root: Path, *, again: bool, clicks: bool = False
) -> dict[str, Any]:
    """``repeats`` times next case and save; ``again``: delete each saved label so the case comes back;
    ``clicks``: then time clicks on the last case (``measure_clicks``)."""
    from playwright.sync_api import sync_playwright

    with Orthanc(root / "orthanc", free_port()) as orthanc:
        uids = load(DicomWebClient(orthanc.dicomweb_url), series)
        conf = {"models": model, "score_on_start": "false", "score_new_images": "false", "reservation_s": "0"}
        (root / "server").mkdir()
        with monailabel_server(root / "server", orthanc.dicomweb_url, conf) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.set_default_timeout(600_000)
            page.goto(f"{server.url}/ohif/", wait_until="domcontentloaded")
            page.get_by_text(re.compile(f"^{next(iter(series))}")).first.click()
            page.get_by_role("button", name="Segmentation").first.click()
            page.locator('[data-cy="labeling-next"]').wait_for()
            nexts, saves, shown, saved_in_page = [], [], [], []
            for _ in range(repeats):
                page.evaluate("delete document.body.dataset.labelingProposal")  # the new page sets it
                started = time.perf_counter()
                page.locator('[data-cy="labeling-next"]').click()
                page.wait_for_function("document.body && document.body.dataset.labelingProposal", polling=50)
                nexts.append(time.perf_counter() - started)
                shown.append(page.evaluate("window.labelingTimes.proposalShownMs") / 1000)
                image = page.evaluate("document.body.dataset.labelingProposal")
                started = time.perf_counter()
                page.locator('[data-cy="labeling-save"]').click()
                page.wait_for_function("document.body.dataset.labelingSaved", polling=50)
                saves.append(time.perf_counter() - started)
                saved_in_page.append(page.evaluate("window.labelingTimes.savedMs") / 1000)
                page.evaluate("delete document.body.dataset.labelingSaved")
                if again:
                    r = server.http.delete("/datastore/label", params={"id": image, "tag": "final"})
                    assert r.status_code == 200, r.text
            clicking = measure_clicks(page, repeats) if clicks else {}
            browser.close()
    return {
        **clicking,
        "dataset": name,
        "model": model,
        "series": len(uids),
        "next_to_proposal_s": [round(t, 3) for t in nexts],
        "save_s": [round(t, 3) for t in saves],
        "median_next_to_proposal_s": round(statistics.median(nexts), 3),
        "median_save_s": round(statistics.median(saves), 3),
        "in_page_viewer_ready_to_proposal_s": [round(t, 3) for t in shown],
        "in_page_save_s": [round(t, 3) for t in saved_in_page],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/ohif_labeling.json"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        mr = hippocampus_series(SHARED, HIPPOCAMPUS)
        results.append(
            measure("hippocampus MR", mr, "hippocampus", args.repeats, Path(tmp) / "h", again=False, clicks=True)
        )
        ct = {"ct_abdomen": real_series(SHARED)["ct_abdomen"]}
        results.append(measure("ct_abdomen", ct, "organs_ct", args.repeats, Path(tmp) / "c", again=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("| dataset | model | next case to proposal (s) | of which after OHIF's start (s) | save to SEG stored (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['dataset']} | {r['model']} | {r['median_next_to_proposal_s']:.2f} {r['next_to_proposal_s']} | "
            f"{statistics.median(r['in_page_viewer_ready_to_proposal_s']):.2f} | "
            f"{r['median_save_s']:.2f} {r['save_s']} |"
        )
    for r in results:
        if "click_s" in r:
            print(
                f"\n{r['dataset']}: click to labelmap updated, median {r['median_click_s']:.2f} s {r['click_s']} "
                f"(in the page {statistics.median(r['in_page_click_s']):.2f} s; first click {r['first_click_s']:.2f} s)"
            )


if __name__ == "__main__":
    main()
