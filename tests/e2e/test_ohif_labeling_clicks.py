"""The labeling panel's click tool in OHIF 3.13: a click on the image for a segment, Shift+click for the
background, undo, save.

A real Orthanc holds two hippocampus MR studies and the server serves ``hippocampus`` (its interactive
model is the click-conditioned network). The test picks a voxel next to the proposal's segment on the
slice shown, computes where it is in the world from the series' DICOM headers (not from the viewer's
code), turns that into a point of the canvas with the viewport's camera, and clicks there with the
mouse. Checked: the click sent is that voxel, the labelmap changed at it, the labelmap is the proposal
with that segment replaced by the server's answer for the session's clicks (the other segment kept),
undo goes back, the SEG stored by Save holds it, a click beside the image is no click and a click
the server refuses (answered 422 by the browser's routing) is dropped with the labelmap kept.
Screenshots go to ``$E2E_ARTIFACTS/clicks`` (emptied first) or a temporary folder whose path the
test prints.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from appcore.dicom.pacs import Orthanc
from appcore.dicom.seg import seg_to_label
from radiology.registry import MODELS
from tests.e2e import test_ohif_labeling as ohif
from tests.e2e.servers import Server
from tests.e2e.test_ohif_labeling import (
    WORLD_TO_PAGE,
    annotator,
    headers,
    open_segmentation_mode,
    pacs_segs,
    point_at_viewport,
    press_next_case,
    proposed_pixel,
    series_order,
    shot,
    show_slice,
    stroke,
    viewer_label,
    world_of,
)

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")
LABELS = MODELS["hippocampus"].labels

pytestmark = ohif.pytestmark  # the labeling test's: shared data, Orthanc, Chromium and OHIF present


pacs = ohif.pacs_of(CASES)


# The same server and browser as the labeling test, on this module's PACS and artifacts folder.
server = ohif.server
browser = ohif.browser


artifacts = ohif.artifacts_in("clicks")


def server_answer(server: Server, case: dict[str, Any], clicks: list[dict[str, Any]], sops: list[str]) -> np.ndarray:
    """What the server answers for ``clicks`` over REST, as a ``[column, row, slice]`` volume."""
    r = server.http.post(f"/labeling/clicks?image={case['image']}", json={"model": case["model"], "clicks": clicks})
    assert r.status_code == 200, r.text
    answer = r.json()
    raw = np.frombuffer(zlib.decompress(base64.b64decode(answer["data"])), np.uint8)
    frames = dict(zip(answer["instances"], raw.reshape(-1, answer["rows"], answer["columns"]), strict=True))
    return np.stack([frames[sop] for sop in sops]).transpose(2, 1, 0)


def replaced(before: np.ndarray, answer: np.ndarray, label: int) -> np.ndarray:
    """``before`` with segment ``label`` replaced by the answer's (the other segment kept where the answer
    does not take it)."""
    after = before.copy()
    after[before == label] = 0
    after[answer == label] = label
    return after


def click(page: Any, world: list[float], *, background: bool = False) -> dict[str, Any]:
    """Click at a world point (Shift held for a background click); the click the panel sent, with the
    voxel the server took it for, once the labelmap has the answer."""
    count = int(page.evaluate("document.body.dataset.labelingClicks || '0'"))
    x, y = page.evaluate(WORLD_TO_PAGE, world)
    if background:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if background:
        page.keyboard.up("Shift")
    message = page.locator('[data-cy="labeling-message"]')
    page.wait_for_function(  # the answer in the labelmap, or the panel saying why not
        f"""document.body.dataset.labelingClicks === '{count + 1}' || /not applied|outside|off the case|No case/
        .test(document.querySelector('[data-cy="labeling-message"]').innerText)""",
        timeout=300_000,
    )
    assert page.evaluate("document.body.dataset.labelingClicks") == str(count + 1), message.inner_text()
    return json.loads(page.evaluate("document.body.dataset.labelingClick"))


def test_a_click_for_a_segment_changes_the_labelmap_at_that_voxel_and_is_saved(
    browser: Any, server: Server, pacs: tuple[Orthanc, dict[str, str]], artifacts: Path
) -> None:
    page = annotator(browser, artifacts, "clicks")
    open_segmentation_mode(page, server.url, CASES[0])
    case = press_next_case(page)
    sops, positions = series_order(pacs, case["image"])
    by_sop = headers(pacs, case["image"])
    proposal = viewer_label(page, case, sops)

    # The slice with the most of the proposal's larger segment, shown with the arrow keys, and the
    # background voxel next to that segment that the most of its neighbours in the slice belong to.
    label = max(LABELS, key=lambda lab: int((proposal == lab.id).sum()))
    k = int(np.argmax((proposal == label.id).sum(axis=(0, 1))))
    show_slice(page, sops, k)
    shot(page, artifacts, "clicks-0-proposal")
    shown = proposal[..., k]
    neighbours = ndimage.convolve((shown == label.id).astype(int), np.ones((3, 3), int), mode="constant")
    candidates = np.where(shown == 0, neighbours, -1)
    column, row = (int(n) for n in np.unravel_index(np.argmax(candidates), candidates.shape))
    assert shown[column, row] == 0 and candidates[column, row] >= 3, (
        f"a background voxel beside the segment on slice {k}; by slice {(proposal > 0).sum(axis=(0, 1)).tolist()}"
    )
    sent = {"label": label.name, "instance": sops[k], "row": row, "column": column}
    expected = replaced(proposal, server_answer(server, case, [sent], sops), label.id)
    assert expected[column, row, k] == label.id, f"the model's answer to a click at {sent} includes it"

    # Clicks on, the segment chosen, one click on that voxel.
    page.locator('[data-cy="labeling-clicks-toggle"]').click()
    page.locator('[data-cy="labeling-click-segment"]').select_option(label.name)
    world = world_of(by_sop[sops[k]], row, column)
    first = click(page, world)
    assert first["voxel"] == [column, row, k] and first["instance"] == sops[k], first
    assert (first["row"], first["column"], first["label"]) == (row, column, label.name)
    after = viewer_label(page, case, sops)
    assert proposal[column, row, k] == 0 and after[column, row, k] == label.id, "the labelmap changed at the voxel"
    np.testing.assert_array_equal(after, expected, "the segment is the answer's, the other one is kept")
    assert "1 click" in page.locator('[data-cy="labeling-clicks-info"]').inner_text()
    shot(page, artifacts, "clicks-1-after-a-click")

    # Shift+click: a background click, sent with the first; the labelmap is the answer to both.
    inside = np.argwhere(after[..., k] == label.id)
    far = inside[np.argmax(((inside - [column, row]) ** 2).sum(axis=1))]
    second = click(page, world_of(by_sop[sops[k]], int(far[1]), int(far[0])), background=True)
    assert second["label"] == "background" and second["voxel"] == [int(far[0]), int(far[1]), k], second
    both = [sent, {"label": "background", "instance": sops[k], "row": int(far[1]), "column": int(far[0])}]
    np.testing.assert_array_equal(
        viewer_label(page, case, sops), replaced(proposal, server_answer(server, case, both, sops), label.id)
    )
    shot(page, artifacts, "clicks-2-background-click")

    # Undo the background click, then the first: back to the answer to one click, then to the proposal.
    page.locator('[data-cy="labeling-click-undo"]').click()
    page.wait_for_function("document.body.dataset.labelingClicks === '1'")
    np.testing.assert_array_equal(viewer_label(page, case, sops), expected, "undo of the background click")
    page.locator('[data-cy="labeling-click-undo"]').click()
    page.wait_for_function("document.body.dataset.labelingClicks === '0'")
    np.testing.assert_array_equal(viewer_label(page, case, sops), proposal, "undo of the first click")

    # Click again, turn clicks off (a click is the active tool's again), save: the SEG holds the click's label.
    click(page, world)
    page.locator('[data-cy="labeling-clicks-toggle"]').click()
    assert page.locator('[data-cy="labeling-clicks-toggle"]').inner_text() == "Clicks: off"
    labelled = viewer_label(page, case, sops)
    np.testing.assert_array_equal(labelled, expected)
    page.locator('[data-cy="labeling-save"]').click()
    page.wait_for_function("document.body.dataset.labelingSaved")
    shot(page, artifacts, "clicks-3-saved")
    (seg,) = pacs_segs(pacs, case["image"])
    stored = seg_to_label(seg, sops, LABELS, positions)
    np.testing.assert_array_equal(stored, labelled)
    assert stored[column, row, k] == label.id, "the clicked voxel is in the saved SEG"

    # A click beside the image is no click; a click the server refuses is dropped, the labelmap kept.
    page.locator('[data-cy="labeling-clicks-toggle"]').click()
    message = page.locator('[data-cy="labeling-message"]')
    page.mouse.click(*page.evaluate(WORLD_TO_PAGE, world_of(by_sop[sops[k]], row, -3)))
    message.filter(has_text="outside the image (row").wait_for()
    refusal = {"detail": "Click 2 (...) is outside the image"}
    page.route("**/labeling/clicks?*", lambda route: route.fulfill(status=422, json=refusal))
    page.mouse.click(*page.evaluate(WORLD_TO_PAGE, world))
    message.filter(has_text="the last click was dropped").wait_for()
    assert "Clicks not applied: Click 2 (...) is outside the image" in message.inner_text()
    assert page.evaluate("document.body.dataset.labelingClicks") == "1"
    assert "1 click;" in page.locator('[data-cy="labeling-clicks-info"]').inner_text()
    np.testing.assert_array_equal(viewer_label(page, case, sops), labelled, "a refused click changes nothing")
    shot(page, artifacts, "clicks-4-refused")
    page.close()


# The click markers drawn over the viewport: [{label, segment, row, column, x, y (page), fill, stroke}].
MARKERS = """() => [...document.querySelectorAll('[data-cy="labeling-click-marker"]')].map(g => {
  const box = g.getBoundingClientRect();
  const shape = g.querySelector('circle:last-of-type');
  return { label: g.dataset.label, segment: g.dataset.segment, row: Number(g.dataset.row),
           column: Number(g.dataset.column), x: box.left + box.width / 2, y: box.top + box.height / 2,
           fill: shape.getAttribute('fill'), stroke: shape.getAttribute('stroke') };
})"""

# What the page has under a point: the element the mouse would reach, and whether it is in a marker layer.
UNDER = """([x, y]) => {
  const hit = document.elementFromPoint(x, y);
  return { tag: hit.tagName.toLowerCase(), inMarkers: Boolean(hit.closest('[data-cy="labeling-click-markers"]')) };
}"""


def markers(page: Any) -> list[dict[str, Any]]:
    return page.evaluate(MARKERS)


def pixel_colour(page: Any, x: float, y: float) -> tuple[int, int, int]:
    """The colour the screen shows at a page point (a screenshot of that one pixel)."""
    from io import BytesIO

    from PIL import Image

    png = page.screenshot(clip={"x": round(x), "y": round(y), "width": 1, "height": 1})
    return Image.open(BytesIO(png)).convert("RGB").getpixel((0, 0))


ACTIVE_SEGMENT = "(id) => window.cornerstoneTools.segmentation.segmentIndex.getActiveSegmentIndex(id)"


def choose_segment(page: Any, case: dict[str, Any], index: int, name: str) -> None:
    """Choose the segment OHIF's brush paints in its segment list, until it stays chosen (OHIF may make the
    proposal's first segment active once more while it finishes showing the new labelmap)."""
    for _ in range(5):
        page.get_by_text(name, exact=True).first.click()
        page.wait_for_timeout(1000)
        if page.evaluate(ACTIVE_SEGMENT, case["segmentationId"]) == index:
            return
    raise AssertionError(f"segment {name} does not stay chosen in OHIF's list")


def check_markers(page: Any, by_sop: dict[str, Any], k_sop: str, expected: list[dict[str, Any]]) -> None:
    """The markers shown are the clicks ``expected`` ({label, segment, row, column}), each at its pixel's
    centre on the screen (the viewport's camera now), a segment's in its colour, the background's a white ring."""
    shown = markers(page)
    assert [(m["label"], m["segment"], m["row"], m["column"]) for m in shown] == [
        (e["label"], e["segment"], e["row"], e["column"]) for e in expected
    ], shown
    colours = {label.name: label.color for label in LABELS}
    for m in shown:
        x, y = page.evaluate(WORLD_TO_PAGE, world_of(by_sop[k_sop], m["row"], m["column"]))
        assert abs(m["x"] - x) < 1.5 and abs(m["y"] - y) < 1.5, f"marker at {m}, its pixel at {(x, y)}"
        assert page.evaluate(UNDER, [x, y])["inMarkers"] is False, "a marker catches the mouse"
        seen = pixel_colour(page, x, y)
        if m["label"] == "background":
            assert (m["fill"], m["stroke"]) == ("none", "#fff"), m
        else:
            assert m["fill"] == "rgb({},{},{})".format(*colours[m["segment"]]), m
            assert max(abs(a - b) for a, b in zip(seen, colours[m["segment"]], strict=True)) < 40, (seen, m)


def test_clicks_are_drawn_undone_with_ctrl_z_and_keep_the_hand_edits(
    browser: Any, server: Server, pacs: tuple[Orthanc, dict[str, str]], artifacts: Path
) -> None:
    page = annotator(browser, artifacts, "hand")
    open_segmentation_mode(page, server.url, CASES[0])
    case = press_next_case(page)
    sops, _ = series_order(pacs, case["image"])
    by_sop = headers(pacs, case["image"])
    proposal = viewer_label(page, case, sops)
    label = max(LABELS, key=lambda lab: int((proposal == lab.id).sum()))
    k = int(np.argmax((proposal == label.id).sum(axis=(0, 1))))

    # Hand edits first: a brush stroke of the segment across the image, an eraser stroke down through it.
    choose_segment(page, case, label.id, label.name)
    show_slice(page, sops, k)  # choosing a segment in OHIF's list shows its centre: back to image k
    assert page.evaluate(ACTIVE_SEGMENT, case["segmentationId"]) == label.id
    stroke(page, "Brush")
    painted = viewer_label(page, case, sops)
    row, column = proposed_pixel(np.where(painted == label.id, painted, 0), k)
    stroke(page, "Eraser", through=page.evaluate(WORLD_TO_PAGE, world_of(by_sop[sops[k]], row, column)))
    edited = viewer_label(page, case, sops)
    hand = edited != proposal
    assert (edited[hand] == label.id).any() and (edited[hand] == 0).any(), "painted and erased by hand"

    # A click elsewhere: a background voxel no hand edit touched, beside the segment.
    shown = edited[..., k]
    neighbours = ndimage.convolve((shown == label.id).astype(int), np.ones((3, 3), int), mode="constant")
    candidates = np.where((shown == 0) & ~hand[..., k], neighbours, -1)
    column, row = (int(n) for n in np.unravel_index(np.argmax(candidates), candidates.shape))
    assert candidates[column, row] >= 1, f"a background voxel beside the segment on slice {k}"
    sent = {"label": label.name, "instance": sops[k], "row": row, "column": column}
    answer = server_answer(server, case, [sent], sops)
    expected = replaced(edited, answer, label.id)
    assert (expected[hand] != edited[hand]).any(), "the answer alone would undo hand edits: the test means something"
    expected[hand] = edited[hand]

    page.locator('[data-cy="labeling-clicks-toggle"]').click()
    page.locator('[data-cy="labeling-click-segment"]').select_option(label.name)
    made = click(page, world_of(by_sop[sops[k]], row, column))
    assert made["voxel"] == [column, row, k] and made["instance"] == sops[k], made
    np.testing.assert_array_equal(viewer_label(page, case, sops), expected, "the answer, the hand edits kept")
    one = [{"label": label.name, "segment": label.name, "row": row, "column": column}]
    check_markers(page, by_sop, sops[k], one)

    # Shift+click inside the segment, away from the first: a background marker too.
    inside = np.argwhere((viewer_label(page, case, sops)[..., k] == label.id) & ~hand[..., k])
    far = inside[np.argmax(((inside - [column, row]) ** 2).sum(axis=1))]
    click(page, world_of(by_sop[sops[k]], int(far[1]), int(far[0])), background=True)
    two = [*one, {"label": "background", "segment": label.name, "row": int(far[1]), "column": int(far[0])}]
    check_markers(page, by_sop, sops[k], two)
    assert np.array_equal(viewer_label(page, case, sops)[hand], edited[hand]), "hand edits kept after two clicks"
    shot(page, artifacts, "hand-1-two-clicks-drawn")

    # Another slice shows none of them; back on the slice, zoomed in (right-drag), they follow the image.
    other = k + 1 if k + 1 < len(sops) else k - 1
    show_slice(page, sops, other)
    assert markers(page) == [], "the clicks are drawn on their own image only"
    show_slice(page, sops, k)
    before = markers(page)
    box = page.locator(".cornerstone-canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down(button="right")
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 4, steps=8)
    page.mouse.up(button="right")
    page.wait_for_timeout(500)
    assert markers(page)[0]["x"] != before[0]["x"] or markers(page)[0]["y"] != before[0]["y"], "the view zoomed"
    check_markers(page, by_sop, sops[k], two)
    shot(page, artifacts, "hand-2-zoomed")

    # Ctrl+Z undoes the background click, Cmd+Z the first; the panel says which; the hand edits stay.
    point_at_viewport(page)
    message = page.locator('[data-cy="labeling-message"]')
    page.keyboard.press("Control+z")
    page.wait_for_function("document.body.dataset.labelingClicks === '1'")
    assert f"Undone (Ctrl+Z): the background click (for {label.name}) at row {far[1]}, column {far[0]}" in (
        message.inner_text()
    )
    np.testing.assert_array_equal(viewer_label(page, case, sops), expected)
    check_markers(page, by_sop, sops[k], one)
    page.keyboard.press("Meta+z")
    page.wait_for_function("document.body.dataset.labelingClicks === '0'")
    assert f"Undone (Cmd+Z): the click for {label.name} at row {row}, column {column}" in message.inner_text()
    np.testing.assert_array_equal(viewer_label(page, case, sops), edited, "no click: the hand-edited labelmap")
    assert markers(page) == []

    # No click left: Ctrl+Z is OHIF's undo again (the eraser stroke).
    page.keyboard.press("Control+z")
    np.testing.assert_array_equal(viewer_label(page, case, sops), painted, "OHIF's undo of the eraser stroke")

    # The Undo click button takes a marker away too; Next case clears them.
    click(page, world_of(by_sop[sops[k]], row, column))
    click(page, world_of(by_sop[sops[k]], int(far[1]), int(far[0])), background=True)
    page.locator('[data-cy="labeling-click-undo"]').click()
    page.wait_for_function("document.body.dataset.labelingClicks === '1'")
    assert "Undone: the background click" in message.inner_text()
    check_markers(page, by_sop, sops[k], one)
    press_next_case(page)
    page.wait_for_timeout(500)
    assert markers(page) == [], "the old case's clicks are not drawn on the new one"
    assert "0 clicks" in page.locator('[data-cy="labeling-clicks-info"]').inner_text()
    page.close()
