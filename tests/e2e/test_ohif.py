"""OHIF in headless Chromium against the DICOMweb-backed server and a real Orthanc, end to end.

Study list, a study opened in the MONAI Label mode, auto-segmentation shown in the viewport (a
screenshot is kept in a temporary folder whose path the test prints, or in
``$E2E_ARTIFACTS`` when set), the label saved as a DICOM SEG in Orthanc, and
"Next Sample" opening another study. Playwright drives the system's ``/usr/bin/chromium``; its
own browser download is never used.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from appcore.dicom.prepare import stable_uid
from tests.conftest import requires_shared
from tests.e2e.servers import (
    LoadedPacs,
    Server,
    loaded_orthanc,
    monailabel_server,
    requires_dicom_data,
    requires_orthanc,
)

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MR_CASES = ("hippocampus_001", "hippocampus_003")

pytestmark = [
    requires_shared,
    requires_dicom_data,
    requires_orthanc,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (make test installs chromium)"),
]


def coloured(png: bytes) -> np.ndarray:
    """Where a viewport screenshot is coloured: the MR itself is grey, a segmentation overlay is not."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return pixels.max(axis=-1) - pixels.min(axis=-1) > 20  # a tinted fill counts, grey never does


def new_colour(before: list[bytes], after: list[bytes]) -> int:
    """Pixels coloured after and not before, over the viewports (the orientation markers are coloured
    in both). Segment colours are not compared: the extension picks them from its own table or
    cornerstone's default one depending on when its segmentation was created (seen to vary run to
    run), not from the server."""
    return sum(int((coloured(new) & ~coloured(old)).sum()) for old, new in zip(before, after, strict=True))


VIEWPORTS = 3  # axial, sagittal, coronal


def look(canvases) -> list[bytes] | None:
    """A screenshot of each viewport, or ``None`` while the layout is still changing: another number
    of viewports, or one gone between counting them and taking its picture."""
    if canvases.count() != VIEWPORTS:
        return None
    try:
        return [canvases.nth(i).screenshot(timeout=5_000) for i in range(VIEWPORTS)]
    except playwright.Error:  # its TimeoutError too
        return None


def settled(page, canvases, timeout_s: float = 60) -> list[bytes]:
    """The viewports once two looks half a second apart show the same pixels (the last look at
    ``timeout_s``)."""
    shots, deadline = None, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        again = look(canvases)
        if again is not None and again == shots:
            break
        shots = again if again is not None else shots
        page.wait_for_timeout(500)
    assert shots is not None, f"never {VIEWPORTS} viewports to look at within {timeout_s:g} s"
    return shots


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedPacs]:
    with loaded_orthanc(tmp_path_factory.mktemp("orthanc"), MR_CASES) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def server(pacs: LoadedPacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    conf = {
        "models": "organs_ct,hippocampus",
        "score_on_start": "false",
        "score_new_images": "false",
        "reservation_s": "1",
    }
    with monailabel_server(tmp_path_factory.mktemp("server"), pacs.orthanc.dicomweb_url, conf) as running:
        yield running


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots and the browser console go: ``$E2E_ARTIFACTS`` (emptied first) or a temporary
    folder; never the source tree. The path is printed (pytest shows it with ``-s`` or on failure)."""
    named = os.environ.get("E2E_ARTIFACTS")
    folder = Path(named) if named else tmp_path / "artifacts"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"OHIF screenshots and console log: {folder}")
    return folder


@pytest.fixture
def page(server: Server, artifacts: Path) -> Iterator[object]:
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        # Where the extension finds the server (it defaults to port 8000 of the page's host).
        context.add_cookies([{"name": "MONAILABEL_SERVER_URL", "value": f"{server.url}/", "url": server.url}])
        page = context.new_page()
        page.set_default_timeout(60_000)
        console: list[str] = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("dialog", lambda d: d.accept())  # "This action will reload current page" on next sample
        try:
            yield page
        finally:
            (artifacts / "console.log").write_text("\n".join(console))
            page.screenshot(path=str(artifacts / "last.png"))
            browser.close()


def test_label_in_ohif_over_dicomweb(page, server: Server, pacs: LoadedPacs, artifacts: Path) -> None:
    first = pacs.series["hippocampus_001"]
    first_study = stable_uid("hippocampus_001", "study")

    # 1. The study list shows the PACS's studies (through the server's DICOMweb proxy).
    page.goto(f"{server.url}/ohif/", wait_until="domcontentloaded")
    for patient in ("ct_abdomen", *MR_CASES):
        page.get_by_text(patient, exact=True).first.wait_for()
    page.screenshot(path=str(artifacts / "1-study-list.png"))

    # 2. Open one in the MONAI Label mode.
    page.get_by_text("hippocampus_001", exact=True).first.click()
    page.get_by_role("button", name="MONAI Label").first.click()
    page.wait_for_url(f"**/ohif/monai-label?StudyInstanceUIDs={first_study}*")
    page.locator("#monailabelServerURL").wait_for()
    canvases = page.locator(".cornerstone-canvas")
    canvases.first.wait_for()
    before = settled(page, canvases)  # the volume has finished loading

    # 3. Connect and run auto-segmentation with the hippocampus model.
    page.locator(".settingsTable button.actionButton").click()
    page.locator("#tab-2 ~ .tab-content select.selectBox").select_option("hippocampus")
    with page.expect_response(lambda r: "/infer/hippocampus" in r.url, timeout=120_000) as answer:
        page.locator('button[title="Run Segmentation"]').click()
    assert answer.value.status == 200
    page.get_by_text("Running Segmentation - Successful").wait_for()
    # Software rendering on a busy machine may take a while to draw the overlay: look until it shows.
    deadline, drawn, after = time.monotonic() + 60, 0, None
    while drawn <= 1000 and time.monotonic() < deadline:
        page.wait_for_timeout(500)
        after = look(canvases) or after
        drawn = new_colour(before, after) if after else 0
    page.screenshot(path=str(artifacts / "2-segmentation.png"))
    assert after is not None and len(after) == 3  # axial, sagittal, coronal
    assert drawn > 1000, f"no segmentation drawn over the MR within 60 s ({drawn} new pixels)"

    # 4. Save the label. The extension in the monailabel 0.8.5 wheel has no save control (its
    #    client's save_label is never called), so send what that client would send: the label as a
    #    raw uint8 buffer on the image grid ("label.bin"), to the same endpoint.
    infer = server.http.post(f"/infer/hippocampus?image={first}&output=image")
    assert infer.status_code == 200, infer.text
    pred = nib.Nifti1Image.from_bytes(gzip.decompress(infer.content))
    raw = np.asarray(pred.dataobj, dtype=np.uint8).tobytes(order="F")
    label_info = [{"name": "anterior", "idx": 1}, {"name": "posterior", "idx": 2}]
    r = server.http.put(
        "/datastore/label",
        params={"image": first},
        data={"params": json.dumps({"label_info": label_info})},
        files={"label": ("label.bin", raw)},
    )
    assert r.status_code == 200, r.text
    segs = [s for s in pacs.client.search_series({"Modality": "SEG"}) if s.StudyInstanceUID == first_study]
    assert len(segs) == 1
    (seg,) = pacs.client.retrieve_series(first_study, str(segs[0].SeriesInstanceUID))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]

    # 5. Next sample opens another study, never the one just labelled.
    page.get_by_text("Active Learning", exact=True).click()
    page.get_by_role("button", name="Next Sample").click()
    page.get_by_role("button", name="OK").click()
    page.wait_for_url(lambda url: "StudyInstanceUIDs=" in url and first_study not in url)
    others = {stable_uid(name, "study") for name in ("ct_abdomen", MR_CASES[1])}
    opened = page.url.split("StudyInstanceUIDs=")[1].split("&")[0]
    assert opened in others
    page.locator(".cornerstone-canvas").first.wait_for()
    page.wait_for_timeout(2000)
    page.screenshot(path=str(artifacts / "3-next-sample.png"))

    # 6. The viewer, reading the PACS through the server's proxy, shows the labelled study with its SEG.
    #    (Its study browser lists the open patient's studies: the proxy passes QIDO's query on, which
    #    MONAI Label's own proxy dropped, so every study of the PACS used to be listed.)
    r = server.http.get("/proxy/dicom/qido/studies", params={"StudyInstanceUID": first_study})
    assert r.status_code == 200 and len(r.json()) == 1, r.text
    assert set(r.json()[0]["00080061"]["Value"]) == {"MR", "SEG"}
    page.goto(page.url.replace(opened, first_study))
    page.get_by_text("MR\\SEG", exact=True).wait_for()
    page.wait_for_timeout(2000)
    page.screenshot(path=str(artifacts / "4-labelled-study.png"))
