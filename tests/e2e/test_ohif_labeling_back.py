"""The browser's Back and Forward in OHIF (issue 26): the panel follows the study shown.

Next case opens each study inside OHIF's single-page app (``navigateHistory``), so Back goes to the
previous case's study without a page load. The panel must then hold that case, with its proposal in
the viewer, not the later case's; Forward brings the later one back. A study the panel never handed
out (opened from inside the app, as the study list does) is said to have no proposal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appcore.dicom.client import DicomWebClient
from appcore.dicom.pacs import Orthanc
from tests.e2e import test_ohif_labeling as ohif
from tests.e2e.servers import Server
from tests.e2e.test_ohif_labeling import (
    annotator,
    open_segmentation_mode,
    predicted,
    press_next_case,
    series_order,
    shot,
    viewer_label,
)

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")

pytestmark = ohif.pytestmark  # the labeling test's: shared data, Orthanc, Chromium and OHIF present


pacs = ohif.pacs_of(CASES)


# The same server and browser as the labeling test, on this module's PACS and artifacts folder.
server = ohif.server
browser = ohif.browser


artifacts = ohif.artifacts_in("back")

# Open a study inside OHIF's single-page app, as its study list does (react-router, no page load).
OPEN_STUDY = """(study) => {
  const url = new URL(location.href);
  url.searchParams.set('StudyInstanceUIDs', study);
  const to = url.pathname.slice(window.config.routerBasename.length - 1) + url.search;
  window.commandsManager.runCommand('navigateHistory', { to, options: { replace: false } });
}"""


def shown_case(page: Any, image: str) -> dict[str, Any]:
    """Once the panel has put ``image``'s proposal in the viewer: the open case (one segmentation, its own)."""
    page.wait_for_function(f"document.body.dataset.labelingProposal === {json.dumps(image)}", timeout=120_000)
    case = json.loads(page.evaluate("sessionStorage.getItem('labeling.case')"))
    assert case["image"] == image and f"StudyInstanceUIDs={case['study']}" in page.url, (case, page.url)
    segmentations = page.evaluate("window.services.segmentationService.getSegmentations().map(s => s.segmentationId)")
    assert segmentations == [case["segmentationId"]], segmentations
    message = page.locator('[data-cy="labeling-message"]').inner_text()
    assert f"Case {image[-8:]}" in message and "proposal" in message, message
    return case


def test_back_and_forward_show_each_case_with_its_proposal(
    browser: Any, server: Server, pacs: tuple[Orthanc, dict[str, str]], artifacts: Path
) -> None:
    page = annotator(browser, artifacts, "back")
    open_segmentation_mode(page, server.url, CASES[0])
    first = press_next_case(page)
    second = press_next_case(page)
    assert second["study"] != first["study"]

    page.go_back()
    back = shown_case(page, first["image"])
    assert page.evaluate("window.labelingSamePage === true"), "Back loaded the page again"
    sops = series_order(pacs, first["image"])[0]
    proposal = predicted(server, first["image"])
    assert proposal.any(), "the model proposes something"
    assert (viewer_label(page, back, sops) == proposal).all(), "the previous case's proposal is in the viewer"
    shot(page, artifacts, "back-1-previous-case")

    page.go_forward()
    later = shown_case(page, second["image"])
    assert page.evaluate("window.labelingSamePage === true"), "Forward loaded the page again"
    later_sops = series_order(pacs, second["image"])[0]
    assert (viewer_label(page, later, later_sops) == predicted(server, second["image"])).all()

    # Another study opened inside the app (as from the study list), never handed out here: no proposal, said so.
    (never,) = set(pacs[1].values()) - {first["image"], second["image"]}
    client = DicomWebClient(pacs[0].dicomweb_url)
    study = next(str(s.StudyInstanceUID) for s in client.search_series({"SeriesInstanceUID": never}))
    page.evaluate(OPEN_STUDY, study)
    page.locator('[data-cy="labeling-message"]').filter(has_text="no proposal is loaded").wait_for()
    assert page.evaluate("document.body.dataset.labelingProposal") is None
    segmentations = page.evaluate("window.services.segmentationService.getSegmentations().map(s => s.segmentationId)")
    assert not any(s.startswith("labeling-") for s in segmentations), segmentations
    shot(page, artifacts, "back-2-no-case")
    page.close()
