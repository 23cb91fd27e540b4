"""OHIF 3.13's own "Export > DICOM SEG > Save" of the segmentation panel saves the label (issue 25).

A real Orthanc holds two hippocampus MR studies; the labeling panel hands out a case with its proposal.
The annotator paints a stroke with OHIF's brush and saves with OHIF's own menu (the "..."
button of the segmentation, Export, DICOM SEG, the "Store Segmentation" dialog's Save), not the
panel's Save: OHIF STOWs its SEG to ``/proxy/dicom/wado/studies``. Checked: OHIF's request is
answered 200 with a store response, the datastore's final label is the labelmap OHIF held (the
proposal with the stroke), its version says ``ohif-export``, and the PACS holds the SEG the server
wrote (OHIF's own SEG never reaches it). Screenshots go to ``$E2E_ARTIFACTS/export`` (emptied first)
or a temporary folder whose path the test prints.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from appcore.dicom.pacs import Orthanc
from appcore.dicom.seg import SEG_MANUFACTURER, seg_to_label
from radiology.registry import MODELS
from tests.e2e import test_ohif_labeling as ohif
from tests.e2e.servers import Server
from tests.e2e.test_ohif_labeling import (
    annotator,
    open_segmentation_mode,
    pacs_segs,
    press_next_case,
    series_order,
    shot,
    show_slice,
    stroke,
    viewer_label,
)

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

# Images of an even number of pixels: OHIF 3.13.2's SEG export fails on hippocampus_001's 35 x 51 before
# it sends anything ("start offset of Uint16Array should be a multiple of 2", dcmjs's SEGImageNormalizer).
CASES = ("hippocampus_003", "hippocampus_004")
LABELS = MODELS["hippocampus"].labels

pytestmark = ohif.pytestmark  # the labeling test's: shared data, Orthanc, Chromium and OHIF present


pacs = ohif.pacs_of(CASES)


# The same server and browser as the labeling test, on this module's PACS and artifacts folder.
server = ohif.server
browser = ohif.browser


artifacts = ohif.artifacts_in("export")


def final_label(server: Server, image: str) -> np.ndarray:
    r = server.http.get("/datastore/label", params={"label": image, "tag": "final"})
    assert r.status_code == 200, r.text
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj, dtype=np.uint8)


def export_dicom_seg(page: Any, name: str) -> Any:
    """OHIF's own menu: the segmentation's "...", Export, DICOM SEG, then the "Store Segmentation"
    dialog's name and Save. Answers OHIF's STOW-RS request's response."""
    page.locator('[data-cy="segmentation-collapsed-more-btn-Labelmap"]').first.click()
    page.get_by_role("menuitem", name="Export").click()
    page.get_by_role("menuitem", name="DICOM SEG").click()
    page.locator('[data-cy="dialog-input"]').fill(name)
    with page.expect_response(
        lambda r: r.request.method == "POST" and "/proxy/dicom/" in r.url and r.url.split("?")[0].endswith("/studies"),
        timeout=300_000,
    ) as stored:
        page.locator('[data-cy="input-dialog-save-button"]').click()
    return stored.value


def test_a_brush_stroke_saved_with_ohif_s_own_export_is_the_final_label(
    browser: Any, server: Server, pacs: tuple[Orthanc, dict[str, str]], artifacts: Path
) -> None:
    page = annotator(browser, artifacts, "export")
    open_segmentation_mode(page, server.url, CASES[0])
    case = press_next_case(page)
    sops, positions = series_order(pacs, case["image"])
    proposal = viewer_label(page, case, sops)

    # A stroke with OHIF's brush across the image with the most proposal, in the segment chosen.
    for label in LABELS:
        page.get_by_text(label.name, exact=True).first.wait_for()
    page.get_by_text("posterior", exact=True).first.click()
    k = int(np.argmax((proposal > 0).sum(axis=(0, 1))))
    show_slice(page, sops, k)
    stroke(page, "Brush")
    painted = viewer_label(page, case, sops)
    stroke_voxels = painted != proposal
    (segment,) = np.unique(painted[stroke_voxels]).tolist() or [0]
    assert segment in {label.id for label in LABELS}, f"the brush painted one segment, {segment}"
    shot(page, artifacts, "export-1-painted")

    # Saved with OHIF's own Export > DICOM SEG > Save, not the panel's Save.
    response = export_dicom_seg(page, "Exported from OHIF")
    shot(page, artifacts, "export-2-stored")
    assert response.status == 200, response.text()
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert "00081199" in response.json(), "a store response: the stored instance in ReferencedSOPSequence"
    page.get_by_text(re.compile("saved successfully")).first.wait_for()  # OHIF's own notification
    # OHIF then shows the SEG it made, from the copy it keeps (the PACS holds the server's SEG instead)
    page.get_by_text("Loading SEG").wait_for(state="hidden", timeout=120_000)
    assert page.get_by_text("Something went wrong").count() == 0
    shot(page, artifacts, "export-3-shown")

    final = final_label(server, case["image"])
    np.testing.assert_array_equal(final, painted, "the final label is the labelmap OHIF exported")
    assert np.all(final[stroke_voxels] == segment), "the stroke is in the final label"
    versions = server.http.get("/datastore/label/versions", params={"image": case["image"], "tag": "final"})
    assert versions.status_code == 200, versions.text
    assert versions.json()["versions"][-1]["info"]["saved_from"] == "ohif-export"
    (seg,) = pacs_segs(pacs, case["image"])
    assert seg.Manufacturer == SEG_MANUFACTURER, "the PACS holds the server's SEG, not OHIF's"
    np.testing.assert_array_equal(seg_to_label(seg, sops, LABELS, positions), painted)
    page.close()
