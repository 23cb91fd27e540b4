"""OHIF labeling panel, in the browser: "Next case" to the proposal in the viewer, and "Save" to the SEG stored.

For each dataset a real Orthanc holds its series and a real server serves the model; headless
Chromium (``/usr/bin/chromium``) clicks the panel's buttons, as ``tests/e2e/test_ohif_labeling.py``
does. A repetition: click "Next case" (the viewer opens the study the server picked, inside the
page, and loads its proposal), then "Save" the proposal unchanged (after ``--think-s`` seconds).
Between repetitions of ``ct_abdomen`` the saved label is deleted over REST, so that the case can be
handed out again (``reservation_s 0``). ``--before`` also measures, right before, the way it was
before issue 25: a page load on "Next case" and no proposal computed ahead.

- ``next_to_proposal_s``: from the click on "Next case" to the proposal's label map in the viewer
  (the page's ``data-labeling-proposal``): the hand-out, OHIF leaving and entering the mode on the
  study (or its page load), the series' images, and the proposal (computed ahead, or from the
  hand-out on; a series whose proposal the server computed before for the same weights is answered
  from its cache).
- ``in_page_viewer_ready_to_proposal_s``: measured by the panel, from its mode entry to the proposal
  in the viewer; ``steps``: the panel's steps since its click handler ran (``window.labelingTimes``)
  and the server's stages of the proposal and the save (their answers' ``timings``).
- ``save_s``: from the click on "Save" to the panel's answer, as Playwright sees it;
  ``in_page_save_s`` from the panel's click handler to the answer: the label map read and
  compressed, the label checked, the SEG written and stored in Orthanc (STOW-RS), the SEG saved
  before deleted, the final label kept; ``save_click_to_handler_ms``: Playwright's click to that
  handler (the page's main thread busy, Playwright's checks that the button is steady).

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
    name: str,
    series: dict[str, Any],
    model: str,
    repeats: int,
    root: Path,
    *,
    again: bool,
    clicks: bool = False,
    before: bool = False,
    think_s: float = 0.0,
) -> dict[str, Any]:
    """``repeats`` times next case and save; ``again``: delete each saved label so the case comes back;
    ``clicks``: then time clicks on the last case (``measure_clicks``); ``before``: as before issue 25's
    changes, a page load on "Next case" (``labeling.reloadOnNext``) and no proposal ahead; ``think_s``:
    seconds between the proposal shown and "Save" (the annotator's correction; 0: at once)."""
    from playwright.sync_api import sync_playwright

    with Orthanc(root / "orthanc", free_port()) as orthanc:
        uids = load(DicomWebClient(orthanc.dicomweb_url), series)
        conf = {"models": model, "score_on_start": "false", "score_new_images": "false", "reservation_s": "0"}
        conf["proposals_ahead"] = str(not before).lower()
        (root / "server").mkdir()
        with monailabel_server(root / "server", orthanc.dicomweb_url, conf) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.set_default_timeout(600_000)
            page.goto(f"{server.url}/ohif/", wait_until="domcontentloaded")
            page.evaluate(f"localStorage.setItem('labeling.reloadOnNext', '{str(before).lower()}')")
            page.get_by_text(re.compile(f"^{next(iter(series))}")).first.click()
            page.get_by_role("button", name="Segmentation").first.click()
            page.locator('[data-cy="labeling-next"]').wait_for()
            nexts, saves, shown, saved_in_page, steps = [], [], [], [], []
            for _ in range(repeats):
                page.evaluate("delete document.body.dataset.labelingProposal")  # the new page sets it
                started = time.perf_counter()
                page.locator('[data-cy="labeling-next"]').click()
                page.wait_for_function("document.body && document.body.dataset.labelingProposal", polling=50)
                nexts.append(time.perf_counter() - started)
                shown.append(page.evaluate("window.labelingTimes.proposalShownMs") / 1000)
                times = page.evaluate("window.labelingTimes")
                steps.append({"page": times.get("next"), "proposal": times.get("proposalServer")})
                steps[-1]["computed_by"] = times.get("proposalComputedBy")
                image = page.evaluate("document.body.dataset.labelingProposal")
                time.sleep(think_s)
                clicked_at = page.evaluate("Date.now()")
                started = time.perf_counter()
                page.locator('[data-cy="labeling-save"]').click()
                page.wait_for_function("document.body.dataset.labelingSaved", polling=50)
                saves.append(time.perf_counter() - started)
                times = page.evaluate("window.labelingTimes")
                saved_in_page.append(times["savedMs"] / 1000)
                steps[-1]["save_server"] = times.get("saveServer")
                steps[-1]["save_request_ms"] = times.get("saveRequestMs")
                steps[-1]["save_click_to_handler_ms"] = times["saveHandlerAt"] - clicked_at
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
        "variant": "before (page load, no proposal ahead)" if before else "after (no page load, proposals ahead)",
        "series": len(uids),
        "next_to_proposal_s": [round(t, 3) for t in nexts],
        "save_s": [round(t, 3) for t in saves],
        "median_next_to_proposal_s": round(statistics.median(nexts), 3),
        "median_save_s": round(statistics.median(saves), 3),
        "in_page_viewer_ready_to_proposal_s": [round(t, 3) for t in shown],
        "in_page_save_s": [round(t, 3) for t in saved_in_page],
        "median_in_page_save_s": round(statistics.median(saved_in_page), 3),
        "think_s": think_s,
        "median_save_click_to_handler_s": round(
            statistics.median(s["save_click_to_handler_ms"] for s in steps) / 1000, 3
        ),
        "steps": steps,
    }


def median_steps(steps: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per part (page steps since the click, the proposal's and the save's server stages): each
    stage's median over the repetitions, in seconds."""
    out: dict[str, dict[str, float]] = {}
    for part, scale in (("page", 1000), ("proposal", 1), ("save_server", 1)):
        names = {k for s in steps if s.get(part) for k in s[part]}
        out[part] = {
            k: round(statistics.median([s[part][k] / scale for s in steps if s.get(part) and k in s[part]]), 3)
            for k in sorted(names)
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/ohif_labeling.json"))
    parser.add_argument(
        "--before",
        action="store_true",
        help="also measure as before issue 25 (a page load on Next case, no proposal ahead), each dataset's "
        "run right before the current one's",
    )
    parser.add_argument(
        "--think-s",
        type=float,
        default=0.0,
        help="seconds between the proposal shown and Save, as an annotator's correction (default 0: at once)",
    )
    args = parser.parse_args(argv)
    results = []
    variants = [True, False] if args.before else [False]
    with tempfile.TemporaryDirectory() as tmp:
        mr = hippocampus_series(SHARED, HIPPOCAMPUS)
        ct = {"ct_abdomen": real_series(SHARED)["ct_abdomen"]}
        for before in variants:
            root = Path(tmp) / f"h{int(before)}"
            results.append(
                measure(
                    "hippocampus MR",
                    mr,
                    "hippocampus",
                    args.repeats,
                    root,
                    again=False,
                    clicks=not before,
                    before=before,
                )
            )
        for before in variants:
            root = Path(tmp) / f"c{int(before)}"
            results.append(
                measure(
                    "ct_abdomen", ct, "organs_ct", args.repeats, root, again=True, before=before, think_s=args.think_s
                )
            )
    for r in results:
        r["median_steps"] = median_steps(r["steps"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("| dataset | variant | next case to proposal (s) | save to SEG stored, in page (s) | save, Playwright (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['dataset']} | {r['variant']} | {r['median_next_to_proposal_s']:.2f} {r['next_to_proposal_s']} | "
            f"{r['median_in_page_save_s']:.2f} {r['in_page_save_s']} | {r['median_save_s']:.2f} {r['save_s']} |"
        )
    for r in results:
        print(f"\n{r['dataset']}, {r['variant']}: median stages (s) {json.dumps(r['median_steps'])}")
        print(f"  proposals computed by: {[s['computed_by'] for s in r['steps']]}")
        print(f"  Save: click to the panel's handler, median {r['median_save_click_to_handler_s']:.3f} s")
    for r in results:
        if "click_s" in r:
            print(
                f"\n{r['dataset']}: click to labelmap updated, median {r['median_click_s']:.2f} s {r['click_s']} "
                f"(in the page {statistics.median(r['in_page_click_s']):.2f} s; first click {r['first_click_s']:.2f} s)"
            )


if __name__ == "__main__":
    main()
