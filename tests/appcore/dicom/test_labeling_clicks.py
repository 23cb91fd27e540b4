"""``POST /labeling/clicks``, the OHIF panel's click tool, on a real server over a real Orthanc.

The panel sends each click as a pixel of one of the series' images (SOP Instance UID, row, column);
the server answers the interactive model's label as frames. The click on the liver of the real CT
series must land on the voxel meant: the answer labels that pixel, and the organ around it, liver.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections.abc import Iterator
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from appcore.dicom.series import load_series
from radiology.registry import MODELS
from research.radiology.label_mapping import load_class_map, remap_by_name
from tests.conftest import SHARED, TOTALSEG, requires_shared
from tests.e2e.servers import (
    LoadedPacs,
    Server,
    loaded_orthanc,
    monailabel_server,
    requires_dicom_data,
    requires_orthanc,
)

pytestmark = [requires_shared, requires_dicom_data, requires_orthanc, pytest.mark.slow]

CT_LABELS = MODELS["organs_ct"].labels
LIVER = next(label.id for label in CT_LABELS if label.name == "liver")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedPacs]:
    with loaded_orthanc(tmp_path_factory.mktemp("orthanc"), ("hippocampus_008",)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def server(pacs: LoadedPacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    conf = {"models": "organs_ct,hippocampus", "score_on_start": "false", "score_new_images": "false"}
    with monailabel_server(tmp_path_factory.mktemp("server"), pacs.orthanc.dicomweb_url, conf) as running:
        yield running


@pytest.fixture(scope="module")
def ct(pacs: LoadedPacs) -> dict[str, Any]:
    """The CT series as the PACS holds it: its instances in slice order and its TotalSegmentator organs
    on the series' ``[column, row, slice]`` grid (tests/appcore/dicom/test_pacs.py checks that alignment)."""
    uid = pacs.series["ct_abdomen"]
    study = str(pacs.client.search_series({"SeriesInstanceUID": uid})[0].StudyInstanceUID)
    volume = load_series(pacs.client.retrieve_series(study, uid), uid)
    reference = np.asarray(nib.load(SHARED / "dicom" / "ct_abdomen_labels_totalseg.nii.gz").dataobj)[:, ::-1, :]
    truth = remap_by_name(reference, load_class_map(TOTALSEG / "class_map.json"), CT_LABELS)
    return {"uid": uid, "sops": list(volume.sop_instance_uids), "truth": truth}


def clicks(server: Server, image: str, model: str, *points: dict[str, Any]) -> Any:
    return server.http.post(f"/labeling/clicks?image={image}", json={"model": model, "clicks": list(points)})


def answered(answer: dict[str, Any]) -> dict[str, np.ndarray]:
    """The answer's frames by SOP Instance UID (``rows x columns`` each)."""
    raw = np.frombuffer(zlib.decompress(base64.b64decode(answer["data"])), np.uint8)
    frames = raw.reshape(len(answer["instances"]), answer["rows"], answer["columns"])
    return dict(zip(answer["instances"], frames, strict=True))


def test_a_click_on_the_liver_lands_on_that_voxel_and_segments_the_liver(server: Server, ct: dict[str, Any]) -> None:
    liver = ct["truth"] == LIVER
    k = int(np.argmax(liver.sum(axis=(0, 1))))  # the slice with the most liver
    depth = ndimage.distance_transform_edt(liver[..., k])  # the liver's centre on that slice
    column, row = (int(n) for n in np.unravel_index(np.argmax(depth), depth.shape))
    assert not liver[row, column, k], "the test needs a click whose row and column swapped is off the liver"

    r = clicks(
        server, ct["uid"], "organs_ct", {"label": "liver", "instance": ct["sops"][k], "row": row, "column": column}
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["interactive_model"] == "organs_ct_interactive"
    assert answer["clicks"][0]["voxel"] == [column, row, k]
    frames = answered(answer)
    assert set(frames) == set(ct["sops"])
    assert frames[ct["sops"][k]][row, column] == LIVER, "the pixel clicked is liver"
    label = np.stack([frames[sop] for sop in ct["sops"]]).transpose(2, 1, 0)  # [column, row, slice]
    found = label == LIVER
    inside, covered = (found & liver).sum() / found.sum(), (found & liver).sum() / liver.sum()
    # measured: 0.99 of it in the liver, 0.34 of the liver (one click, 20 slices)
    assert inside > 0.9 and covered > 0.25, f"{inside:.2f} of the answer is liver, {covered:.2f} of the liver found"


def test_a_background_click_is_sent_with_the_label_s_clicks(server: Server, ct: dict[str, Any]) -> None:
    """Every click of the session goes each time, background ones too: a background click on the liver
    beside a liver click takes that part off the answer."""
    liver = ct["truth"] == LIVER
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    columns, rows = np.nonzero(liver[..., k])
    first = {"label": "liver", "instance": ct["sops"][k], "row": int(rows[0]), "column": int(columns[0])}
    far = int(np.argmax((columns - columns[0]) ** 2 + (rows - rows[0]) ** 2))
    second = {"label": "background", "instance": ct["sops"][k], "row": int(rows[far]), "column": int(columns[far])}
    r = clicks(server, ct["uid"], "organs_ct", first, second)
    assert r.status_code == 200, r.text
    frames = answered(r.json())[ct["sops"][k]]
    assert frames[first["row"], first["column"]] == LIVER and frames[second["row"], second["column"]] == 0
    assert [c["voxel"] for c in r.json()["clicks"]] == [
        [first["column"], first["row"], k],
        [second["column"], second["row"], k],
    ]


def _bad(ct: dict[str, Any], pacs: LoadedPacs, case: str) -> tuple[str, dict[str, Any]]:
    ok = {"label": "liver", "instance": ct["sops"][0], "row": 10, "column": 10}
    mr_uid = pacs.series["hippocampus_008"]
    study = str(pacs.client.search_series({"SeriesInstanceUID": mr_uid})[0].StudyInstanceUID)
    mr_sop = str(pacs.client.retrieve_series(study, mr_uid)[0].SOPInstanceUID)
    return {
        "unknown label": (ct["uid"], {"model": "organs_ct", "clicks": [ok, {**ok, "label": "brain"}]}),
        "hippocampus image": (ct["uid"], {"model": "organs_ct", "clicks": [{**ok, "instance": mr_sop}]}),
        "row past the end": (ct["uid"], {"model": "organs_ct", "clicks": [{**ok, "row": 512}]}),
        "negative column": (ct["uid"], {"model": "organs_ct", "clicks": [{**ok, "column": -1}]}),
        "fractional row": (ct["uid"], {"model": "organs_ct", "clicks": [{**ok, "row": 10.5}]}),
        "string column": (ct["uid"], {"model": "organs_ct", "clicks": [{**ok, "column": "10"}]}),
        "too many": (ct["uid"], {"model": "organs_ct", "clicks": [ok] * 201}),
        "other model": (ct["uid"], {"model": "hippocampus", "clicks": [ok]}),
        "no clicks field": (ct["uid"], {"model": "organs_ct"}),
    }[case]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("unknown label", r"Click 2 \('brain' on image .*\) is for no label of the model: click for one of \['spleen'"),
        ("hippocampus image", r"is on an image that is not one of the case's series \(20 images\)"),
        ("row past the end", r"row 512, column 10\) is outside the image, whose rows run from 0 to 511"),
        ("negative column", r"column -1\) is outside the image"),
        ("fractional row", r"clicks.0.row.*valid integer"),
        ("string column", r"clicks.0.column.*valid integer"),
        ("too many", r"201 clicks in one request; at most 200 are taken \(--conf max_clicks\)"),
        ("other model", r"is labelled with 'organs_ct''s labels, not 'hippocampus'"),
        ("no clicks field", r"clicks.*Field required"),
    ],
)
def test_bad_clicks_are_a_422_that_says_which_and_nothing_is_saved(
    server: Server, pacs: LoadedPacs, ct: dict[str, Any], case: str, match: str
) -> None:
    image, body = _bad(ct, pacs, case)
    r = server.http.post(f"/labeling/clicks?image={image}", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    text = (
        detail if isinstance(detail, str) else "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
    )
    assert re.search(match, text), text
    assert server.http.get("/datastore/label", params={"label": image, "tag": "final"}).status_code == 404


def test_clicks_on_a_series_the_pacs_does_not_hold_are_a_404(server: Server) -> None:
    r = clicks(server, "1.2.3.4.5", "organs_ct")
    assert r.status_code == 404, r.text
