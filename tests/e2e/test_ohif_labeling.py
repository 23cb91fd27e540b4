"""Labeling in OHIF 3.13 by clicks and key presses: next case, proposal, brush and eraser, save, train.

A real Orthanc holds three hippocampus MR studies; the server serves OHIF at ``/ohif/`` with the
labeling panel in the segmentation mode (``viewers_config/ohif/extension/labeling.js``). Two
browser contexts are two annotators. Next case, brush, eraser, save and train are driven by clicks
and key presses only; REST is used only to check what landed (Orthanc's SEG, the datastore's final
label, the served model version), to compute the proposals the viewer must show, and, as another
tool would, to save a label under the second annotator's feet (the conflict). Screenshots of every
step go to ``$E2E_ARTIFACTS`` (emptied first) or a temporary folder whose path the test prints.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from appcore.dicom.client import DicomWebClient
from appcore.dicom.pacs import Orthanc, hippocampus_series, load
from appcore.dicom.seg import seg_to_label
from appcore.dicom.series import load_series
from radiology.registry import MODELS
from tests.conftest import SHARED, requires_shared
from tests.e2e.servers import Server, free_port, monailabel_server, requires_orthanc

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

CHROMIUM = Path("/usr/bin/chromium")
# SwiftShader: headless Chromium's WebGL, which OHIF's viewports need.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")
OHIF_DIST = Path(__file__).resolve().parents[2] / "viewers_config" / "ohif" / "dist"
LABELS = MODELS["hippocampus"].labels
POSTERIOR = next(label.id for label in LABELS if label.name == "posterior")

pytestmark = [
    requires_shared,
    requires_orthanc,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (make test installs chromium)"),
    pytest.mark.skipif(not (OHIF_DIST / "index.html").is_file(), reason=f"OHIF is not in {OHIF_DIST}: run make ohif"),
]

# The labelmap the viewer holds for the open case, frame by frame: {SOP Instance UID: base64 of the
# uint8 pixels (rows x columns)}. Read to check what the viewer shows and what painting changed.
READ_LABELMAP = """(segmentationId) => {
  const seg = window.cornerstoneTools.segmentation.state.getSegmentation(segmentationId);
  const out = {};
  for (const id of seg.representationData.Labelmap.imageIds) {
    const image = window.cornerstone.cache.getImage(id);
    const pixels = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    const sop = /instances\\/([0-9.]+)/.exec(image.referencedImageId)[1];
    let text = '';
    for (let i = 0; i < pixels.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, Array.from(pixels.subarray(i, i + 0x8000)));
    }
    out[sop] = [image.rows, image.columns, btoa(text)];
  }
  return out;
}"""


def pacs_of(cases: tuple[str, ...]) -> Any:
    """A module's PACS fixture: a real Orthanc holding the hippocampus studies ``cases``."""

    @pytest.fixture(scope="module")
    def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, dict[str, str]]]:
        with Orthanc(tmp_path_factory.mktemp("orthanc"), free_port()) as orthanc:
            yield orthanc, load(DicomWebClient(orthanc.dicomweb_url), hippocampus_series(SHARED, cases))

    return pacs


def artifacts_in(subfolder: str) -> Any:
    """Another module's artifacts fixture: ``$E2E_ARTIFACTS/<subfolder>`` (emptied first) or a temporary folder."""

    @pytest.fixture
    def artifacts(tmp_path: Path) -> Path:
        named = os.environ.get("E2E_ARTIFACTS")
        folder = Path(named) / subfolder if named else tmp_path / "artifacts"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"OHIF screenshots and console logs: {folder}")
        return folder

    return artifacts


pacs = pacs_of(CASES)


@pytest.fixture(scope="module")
def server(pacs: tuple[Orthanc, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    with monailabel_server(tmp_path_factory.mktemp("server"), pacs[0].dicomweb_url, conf) as running:
        yield running


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    named = os.environ.get("E2E_ARTIFACTS")
    folder = Path(named) if named else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # this test's files; a folder in it is another test's (clicks/)
        if old.is_file():
            old.unlink()
    print(f"OHIF screenshots and console logs: {folder}")
    return folder


@pytest.fixture
def browser(artifacts: Path) -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def annotator(browser: Any, artifacts: Path, name: str) -> Any:
    """A page in a browser context of its own (another annotator: own storage, own name)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("close", lambda _: (artifacts / f"console-{name}.log").write_text("\n".join(console)))
    return page


def shot(page: Any, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"))


def open_segmentation_mode(page: Any, url: str, patient: str) -> None:
    """The study list, a study, the Segmentation mode: where the labeling panel is."""
    page.goto(f"{url}/ohif/", wait_until="domcontentloaded")
    page.get_by_text(re.compile(f"^{patient}")).first.click()
    page.get_by_role("button", name="Segmentation").first.click()
    page.locator('[data-cy="labeling-next"]').wait_for()


def press_next_case(page: Any) -> dict[str, Any]:
    """Click "Next case"; the case handed out once its proposal is in the viewer. The study opens
    inside OHIF's single-page app (no page load: a mark set before the click is still there), and
    the viewer then holds one segmentation, the new case's, on its series only."""
    page.evaluate("delete document.body.dataset.labelingProposal; window.labelingSamePage = true")
    page.locator('[data-cy="labeling-next"]').click()
    page.wait_for_function("document.body && document.body.dataset.labelingProposal", timeout=300_000)
    case = json.loads(page.evaluate("sessionStorage.getItem('labeling.case')"))
    assert page.evaluate("document.body.dataset.labelingProposal") == case["image"]
    assert f"StudyInstanceUIDs={case['study']}" in page.url
    assert page.evaluate("window.labelingSamePage === true"), "Next case loaded the page again"
    segmentations = page.evaluate("window.services.segmentationService.getSegmentations().map(s => s.segmentationId)")
    assert segmentations == [case["segmentationId"]], f"the old case's segmentation stays: {segmentations}"
    return case


def viewer_label(page: Any, case: dict[str, Any], sop_uids: list[str]) -> np.ndarray:
    """The viewer's labelmap as a ``[column, row, slice]`` volume in the server's slice order."""
    frames = page.evaluate(READ_LABELMAP, case["segmentationId"])
    assert set(frames) == set(sop_uids), "one labelmap frame per image of the series"
    slices = []
    for uid in sop_uids:
        rows, columns, data = frames[uid]
        slices.append(np.frombuffer(base64.b64decode(data), dtype=np.uint8).reshape(rows, columns))
    return np.stack(slices).transpose(2, 1, 0)


def series_order(pacs: tuple[Orthanc, dict[str, str]], series: str) -> tuple[list[str], list[list[float]]]:
    client = DicomWebClient(pacs[0].dicomweb_url)
    study = next(str(s.StudyInstanceUID) for s in client.search_series({"SeriesInstanceUID": series}))
    datasets = client.retrieve_series(study, series)
    volume = load_series(datasets, series)
    by_uid = {str(d.SOPInstanceUID): d for d in datasets}
    positions = [[float(v) for v in by_uid[u].ImagePositionPatient] for u in volume.sop_instance_uids]
    return list(volume.sop_instance_uids), positions


def predicted(server: Server, series: str) -> np.ndarray:
    """What the served model proposes for a series now (computed over REST, for comparison)."""
    r = server.http.post(f"/infer/hippocampus?image={series}&output=image")
    assert r.status_code == 200, r.text
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj, dtype=np.uint8)


def pacs_segs(pacs: tuple[Orthanc, dict[str, str]], series: str) -> list[Any]:
    """The SEG instances in the PACS that reference ``series``."""
    client = DicomWebClient(pacs[0].dicomweb_url)
    found = []
    for seg_series in client.search_series({"Modality": "SEG"}):
        (seg,) = client.retrieve_series(str(seg_series.StudyInstanceUID), str(seg_series.SeriesInstanceUID))
        if seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series:
            found.append(seg)
    return found


def unfocus(page: Any) -> None:
    """Click the panel's title, so that arrow keys go to the viewport again (not to a number field)."""
    page.locator('[data-cy="labeling-title"]').click()


def point_at_viewport(page: Any) -> None:
    """The pointer over the viewport and the focus off the panel's fields: arrow keys go to the viewport."""
    unfocus(page)
    box = page.locator(".cornerstone-canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


# A world point (mm) as a point of the page: the viewport's camera (worldToCanvas) plus the canvas' place.
WORLD_TO_PAGE = """(world) => {
  const canvas = document.querySelector('.cornerstone-canvas');
  const viewports = window.cornerstone.getRenderingEngines().flatMap(engine => engine.getViewports());
  const viewport = viewports.find(v => v.canvas === canvas);
  const [x, y] = viewport.worldToCanvas(world);
  const box = canvas.getBoundingClientRect();
  return [box.left + x, box.top + y];
}"""

SHOWN_SOP = """() => {
  const canvas = document.querySelector('.cornerstone-canvas');
  const viewports = window.cornerstone.getRenderingEngines().flatMap(engine => engine.getViewports());
  const imageId = viewports.find(v => v.canvas === canvas).getCurrentImageId();
  return /instances\\/([0-9.]+)/.exec(imageId)[1];
}"""


def headers(pacs: tuple[Orthanc, dict[str, str]], series: str) -> dict[str, Any]:
    """The series' instances by SOP Instance UID, as the PACS holds them."""
    client = DicomWebClient(pacs[0].dicomweb_url)
    study = next(str(s.StudyInstanceUID) for s in client.search_series({"SeriesInstanceUID": series}))
    return {str(d.SOPInstanceUID): d for d in client.retrieve_series(study, series)}


def world_of(instance: Any, row: int, column: int) -> list[float]:
    """The centre of a pixel in patient coordinates (mm), by DICOM's definitions: ImagePositionPatient is
    the first pixel's centre; ImageOrientationPatient a row's then a column's direction; PixelSpacing
    the distance between rows, then between columns."""
    orientation = np.asarray(instance.ImageOrientationPatient, dtype=float)
    spacing = np.asarray(instance.PixelSpacing, dtype=float)
    position = np.asarray(instance.ImagePositionPatient, dtype=float)
    return (position + column * spacing[1] * orientation[:3] + row * spacing[0] * orientation[3:]).tolist()


def show_slice(page: Any, sops: list[str], k: int) -> None:
    """Show the ``k``-th image of the series with the arrow keys, as a person would, the pointer on the viewport."""
    point_at_viewport(page)

    def shown() -> int:
        return sops.index(page.evaluate(SHOWN_SOP))

    def press(key: str) -> int:
        """Press ``key``; by how much the shown image's index changed (0 at the end of the series)."""
        before = shown()
        page.keyboard.press(key)
        for _ in range(40):
            if shown() != before:
                break
            page.wait_for_timeout(50)
        return shown() - before

    up = press("ArrowUp") or -press("ArrowDown")  # the index change of ArrowUp, learnt where it moves
    assert up in (1, -1), f"the arrow keys move one image at a time, moved {up}"
    for _ in range(2 * len(sops)):
        if shown() == k:
            return
        press("ArrowUp" if (k - shown()) * up > 0 else "ArrowDown")
    raise AssertionError(f"the arrow keys did not reach image {k} of {len(sops)}: it shows {shown()}")


def stroke(page: Any, tool: str, *, through: tuple[float, float] | None = None) -> None:
    """Pick ``tool`` (OHIF's Brush-btn, Eraser-btn), radius 3 mm, and drag across most of the viewport's
    width through its centre, or, given a page point ``through``, down most of its height through that point."""
    page.locator(f'[data-cy="{tool}-btn"]').click()
    radius = page.locator('[data-cy$="-radius"] input >> visible=true').first
    radius.fill("3")
    radius.press("Enter")
    unfocus(page)
    box = page.locator(".cornerstone-canvas").first.bounding_box()
    if through is None:
        y = box["y"] + box["height"] / 2
        start, end = (box["x"] + 0.1 * box["width"], y), (box["x"] + 0.9 * box["width"], y)
    else:
        x = through[0]
        start, end = (x, box["y"] + 0.1 * box["height"]), (x, box["y"] + 0.9 * box["height"])
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=24)
    page.mouse.up()
    page.wait_for_timeout(500)


def proposed_pixel(proposal: np.ndarray, k: int) -> tuple[int, int]:
    """(row, column) of a proposed voxel of slice ``k`` (a ``[column, row, slice]`` volume): the one
    nearest the slice's proposed voxels' centroid, so inside the structure whatever its shape."""
    columns, rows = np.nonzero(proposal[..., k])
    assert len(rows), f"nothing proposed on image {k}"
    nearest = np.argmin((rows - rows.mean()) ** 2 + (columns - columns.mean()) ** 2)
    return int(rows[nearest]), int(columns[nearest])


def test_label_train_and_next_case_in_ohif(
    browser: Any, server: Server, pacs: tuple[Orthanc, dict[str, str]], artifacts: Path
) -> None:
    first, second = annotator(browser, artifacts, "first"), annotator(browser, artifacts, "second")

    # 1. The first annotator asks for a case: the viewer opens its study with the model's proposal.
    open_segmentation_mode(first, server.url, CASES[0])
    shot(first, artifacts, "1-segmentation-mode")
    case = press_next_case(first)
    sops, positions = series_order(pacs, case["image"])
    proposal = viewer_label(first, case, sops)
    assert case["model"] == "hippocampus" and case["source"] == "model"
    np.testing.assert_array_equal(proposal, predicted(server, case["image"]), "the viewer shows the proposal")
    assert {1, 2} <= set(np.unique(proposal).tolist()), "both parts proposed"
    segments = first.locator('[data-cy="labeling-panel"]').inner_text()
    assert "proposal of hippocampus v0" in segments
    for label in LABELS:
        first.get_by_text(label.name, exact=True).first.wait_for()
    shot(first, artifacts, "2-proposal")

    # 2. A second annotator is never handed the first one's reserved case.
    open_segmentation_mode(second, server.url, CASES[1])
    other = press_next_case(second)
    assert other["image"] != case["image"] and other["study"] != case["study"]
    shot(second, artifacts, "3-second-annotator")

    # 3. Corrections on the image with the most proposed voxels: a posterior brush stroke across, an
    #    eraser stroke down through a proposed voxel (where it is computed from the DICOM headers, so
    #    whichever case the strategy handed out); undo and redo the eraser from the keyboard.
    first.get_by_text("posterior", exact=True).first.click()  # OHIF shows the segment's centre then
    k = int(np.argmax((proposal > 0).sum(axis=(0, 1))))
    show_slice(first, sops, k)
    stroke(first, "Brush")
    painted_label = viewer_label(first, case, sops)
    painted = painted_label != proposal
    assert painted.any(), "the brush changed the labelmap"
    assert np.all(painted_label[painted] == POSTERIOR), "the brush painted the posterior segment"
    (painted_slices,) = np.nonzero(painted.any(axis=(0, 1)))
    assert len(painted_slices) == 1, f"a circle brush paints one slice, painted {painted_slices}"
    assert painted_slices[0] == k, f"painted image {painted_slices[0]}, not the one shown ({k})"
    row, column = proposed_pixel(proposal, k)
    stroke(
        first,
        "Eraser",
        through=first.evaluate(WORLD_TO_PAGE, world_of(headers(pacs, case["image"])[sops[k]], row, column)),
    )
    corrected = viewer_label(first, case, sops)
    erased = corrected != painted_label
    assert erased.any() and np.all(corrected[erased] == 0), "the eraser cleared voxels"
    assert erased[..., painted_slices[0]].sum() == erased.sum(), "on the slice shown"
    assert (proposal[erased] > 0).any(), "the eraser cleared proposed voxels too, not only the stroke"
    first.keyboard.press("Control+z")
    np.testing.assert_array_equal(viewer_label(first, case, sops), painted_label, "undo")
    first.keyboard.press("Control+y")
    np.testing.assert_array_equal(viewer_label(first, case, sops), corrected, "redo")
    shot(first, artifacts, "4-corrected")

    # 4. Save: the SEG in Orthanc is the proposal with exactly those strokes, segments named and coded.
    first.locator('[data-cy="labeling-save"]').click()
    first.wait_for_function("document.body.dataset.labelingSaved")
    assert "Saved as the final label" in first.locator('[data-cy="labeling-message"]').inner_text()
    assert first.locator('[data-cy="labeling-progress"]').inner_text() == f"Labelled 1 / {len(CASES)}"
    shot(first, artifacts, "5-saved")
    expected = proposal.copy()
    expected[painted] = POSTERIOR
    expected[erased] = 0
    (seg,) = pacs_segs(pacs, case["image"])
    np.testing.assert_array_equal(seg_to_label(seg, sops, LABELS, positions), expected)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [label.name for label in LABELS]
    for item, label in zip(seg.SegmentSequence, LABELS, strict=True):
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert code.CodingSchemeDesignator == "SCT" and code.CodeValue == (label.snomed or "91723000"), item
    final = server.http.get("/datastore/label", params={"label": case["image"], "tag": "final"})
    assert final.status_code == 200, final.text
    unpacked = gzip.decompress(final.content) if final.content[:2] == b"\x1f\x8b" else final.content
    stored = nib.Nifti1Image.from_bytes(unpacked)
    np.testing.assert_array_equal(np.asarray(stored.dataobj, dtype=np.uint8), expected)

    # 5. Conflict: another tool saves the second annotator's case meanwhile; their save is refused.
    held = viewer_label(second, other, series_order(pacs, other["image"])[0])
    r = server.http.put(
        "/datastore/label",
        params={"image": other["image"]},
        data={"params": json.dumps({"model": "hippocampus"})},
        files={"label": ("label.bin", np.zeros(held.shape, np.uint8).tobytes(order="F"))},
    )
    assert r.status_code == 200, r.text
    second.locator('[data-cy="labeling-save"]').click()
    message = second.locator('[data-cy="labeling-message"]')
    message.filter(has_text="Conflict").wait_for()
    assert "saved by someone else" in message.inner_text() and "edits are still here" in message.inner_text()
    assert len(pacs_segs(pacs, other["image"])) == 1, "the other tool's SEG stays, nothing overwritten"
    np.testing.assert_array_equal(viewer_label(second, other, series_order(pacs, other["image"])[0]), held)
    shot(second, artifacts, "6-conflict")

    # 6. Train (one epoch, typed into the panel): new weights are published and shown.
    (remaining,) = set(pacs[1].values()) - {case["image"], other["image"]}
    before_training = predicted(server, remaining)
    first.locator('[data-cy="labeling-epochs"]').fill("1")
    first.locator('[data-cy="labeling-train"]').click()
    first.wait_for_function("document.body.dataset.labelingTrained", timeout=900_000)
    version = first.evaluate("document.body.dataset.labelingTrained")
    training = first.locator('[data-cy="labeling-training"]').inner_text()
    assert version.isdigit() and int(version) >= 1, training
    assert f"version {version} published" in training and "Dice" in training, training
    served = server.http.get("/info/").json()["models"]["hippocampus"]["served_version"]
    assert served == int(version)
    shot(first, artifacts, "7-trained")

    # 7. Next case: another study, its proposal from the new weights.
    after = press_next_case(first)
    assert after["image"] == remaining and after["study"] != case["study"]
    new_proposal = viewer_label(first, after, series_order(pacs, remaining)[0])
    assert after["source"] == "model"
    assert f"hippocampus v{version}" in first.locator('[data-cy="labeling-message"]').inner_text()
    np.testing.assert_array_equal(new_proposal, predicted(server, remaining))
    assert (new_proposal != before_training).any(), "the proposal comes from the new weights"
    shot(first, artifacts, "8-next-case-after-training")

    after_sops = series_order(pacs, remaining)[0]

    # 8. The PACS goes away: saving says so, and the edits stay in the viewer to save again.
    pacs[0].stop()
    first.locator('[data-cy="labeling-save"]').click()
    message = first.locator('[data-cy="labeling-message"]')
    message.filter(has_text="Not saved").wait_for()
    assert "PACS" in message.inner_text() and "edits are still here" in message.inner_text()
    np.testing.assert_array_equal(viewer_label(first, after, after_sops), new_proposal)
    shot(first, artifacts, "9-pacs-down")
    first.close()
    second.close()
