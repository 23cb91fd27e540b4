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
    press_next_case,
    series_order,
    shot,
    show_slice,
    viewer_label,
    world_of,
)

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

CASES = ("hippocampus_001", "hippocampus_003")
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
