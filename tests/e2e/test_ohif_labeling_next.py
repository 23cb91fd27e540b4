"""Next case in OHIF without a page load (issue 25): the study opens inside the single-page app, and a
Next case pressed while the previous case's proposal is still on its way shows the newer case only.

The first case's proposal request is held back (Playwright's routing) until the second case is in the
viewer; then it is let through, and must change nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from appcore.dicom.pacs import Orthanc
from tests.e2e import test_ohif_labeling as ohif
from tests.e2e.servers import Server
from tests.e2e.test_ohif_labeling import annotator, open_segmentation_mode, series_order, shot, viewer_label

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")

pytestmark = ohif.pytestmark  # the labeling test's: shared data, Orthanc, Chromium and OHIF present


pacs = ohif.pacs_of(CASES)


# The same server and browser as the labeling test, on this module's PACS and artifacts folder.
server = ohif.server
browser = ohif.browser


artifacts = ohif.artifacts_in("next")


def stored_case(page: Any) -> dict[str, Any] | None:
    return json.loads(page.evaluate("sessionStorage.getItem('labeling.case') || 'null'"))


def test_a_next_case_while_the_proposal_loads_shows_only_the_newer_case(
    browser: Any, server: Server, pacs: tuple[Orthanc, dict[str, str]], artifacts: Path
) -> None:
    page = annotator(browser, artifacts, "next")
    open_segmentation_mode(page, server.url, CASES[0])
    held: list[Any] = []

    def hold_the_first(route: Any) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)  # the first case's proposal: let through once the second case is shown

    page.route("**/labeling/proposal*", hold_the_first)
    page.evaluate("window.labelingSamePage = true")
    page.locator('[data-cy="labeling-next"]').click()
    deadline = time.monotonic() + 120
    while not held:  # the first case handed out, its study open, its proposal asked for
        assert time.monotonic() < deadline, "the first case's proposal was never asked for"
        page.wait_for_timeout(100)
    first = stored_case(page)
    assert first is not None and "segmentationId" not in first

    page.locator('[data-cy="labeling-next"]').click()
    page.wait_for_function(
        "document.body.dataset.labelingProposal && document.body.dataset.labelingProposal !== "
        f"{json.dumps(first['image'])}",
        timeout=120_000,
    )
    second = stored_case(page)
    assert second is not None and second["image"] != first["image"]
    assert page.evaluate("window.labelingSamePage === true"), "Next case loaded the page again"
    shown = viewer_label(page, second, series_order(pacs, second["image"])[0])

    with page.expect_response("**/labeling/proposal*"):
        held[0].continue_()  # the first case's proposal arrives late
    page.evaluate("new Promise(resolve => setTimeout(resolve, 1000))")  # its handling: a few steps, then none
    assert page.evaluate("document.body.dataset.labelingProposal") == second["image"]
    assert stored_case(page) == second
    segmentations = page.evaluate("window.services.segmentationService.getSegmentations().map(s => s.segmentationId)")
    assert segmentations == [second["segmentationId"]], segmentations
    assert (viewer_label(page, second, series_order(pacs, second["image"])[0]) == shown).all()
    message = page.locator('[data-cy="labeling-message"]').inner_text()
    assert second["image"][-8:] in message and "proposal" in message, message
    shot(page, artifacts, "newer-case-only")
    page.close()
