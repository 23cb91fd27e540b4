"""OHIF's own "Export > DICOM SEG > Save" (a STOW-RS of one SEG) saved as a label, on a real server over a real Orthanc.

OHIF posts the SEG to ``<wadoRoot>/studies`` (``/proxy/dicom/wado/studies``). The server reads it,
checks it against the series it segments and saves it as the panel's Save does: the ``final`` label,
a new version in the history (``saved_from: ohif-export``) and a SEG the server writes itself. OHIF's
SEG never reaches the PACS. Everything else below ``/proxy/dicom/`` that is not a read stays refused.
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from appcore.dicom.seg import SEG_MANUFACTURER
from appcore.dicom.series import load_series
from tests.conftest import HIPPO, requires_shared
from tests.e2e.servers import (
    LoadedPacs,
    Server,
    loaded_orthanc,
    monailabel_server,
    requires_dicom_data,
    requires_orthanc,
)
from tests.realm import ANNOTATOR, USER, serve_realm
from tests.realm import Realm as StandInRealm
from tests.segs import foreign_seg, label_map_seg

pytestmark = [requires_shared, requires_dicom_data, requires_orthanc, pytest.mark.slow]

CASE = "hippocampus_008"
BOUNDARY = "OHIF-boundary-7"
STOW = "/proxy/dicom/wado/studies"  # where OHIF posts: <wadoRoot>/studies
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedPacs]:
    with loaded_orthanc(tmp_path_factory.mktemp("orthanc"), (CASE,)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def server(pacs: LoadedPacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # hippocampus only: the PACS's CT series are no series of a served model
    conf = {
        "models": "hippocampus",
        "score_on_start": "false",
        "score_new_images": "false",
        "max_upload_mb": str(MAX_UPLOAD_MB),
    }
    with monailabel_server(tmp_path_factory.mktemp("server"), pacs.orthanc.dicomweb_url, conf) as running:
        yield running


@pytest.fixture(scope="module")
def mr(pacs: LoadedPacs) -> dict[str, Any]:
    """The MR series as the PACS holds it (instances in slice order) and its true label on that grid."""
    uid = pacs.series[CASE]
    study = str(pacs.client.search_series({"SeriesInstanceUID": uid})[0].StudyInstanceUID)
    datasets = pacs.client.retrieve_series(study, uid)
    volume = load_series(datasets, uid)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    truth = np.rint(np.asarray(nib.load(HIPPO / "labelsTr" / f"{CASE}.nii.gz").dataobj)).astype(np.uint8)
    assert truth.shape == volume.data.shape
    return {"uid": uid, "study": study, "sources": [by_uid[u] for u in volume.sop_instance_uids], "truth": truth}


def part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, write_like_original=False)
    return out.getvalue()


def stow_body(*instances: bytes) -> bytes:
    """A STOW-RS body as OHIF's dicomweb-client writes it (``multipartEncode``)."""
    head = f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + i for i in instances) + f"\r\n--{BOUNDARY}--".encode()


HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'}


def make_seg(kind: str, label: np.ndarray, sources: list[Dataset]) -> Dataset:
    """``kind``: "highdicom" (a binary SEG), "ohif" (binary, as OHIF's bitmap export writes it) or
    "label_map" (OHIF's default: a Label Map SEG, RLE, painted slices only)."""
    if kind == "label_map":
        return label_map_seg(label, sources, rle=True, by_position=False)
    return foreign_seg(label, sources, kind="binary" if kind == "highdicom" else "ohif")


def final_label(server: Server, image: str) -> np.ndarray | None:
    r = server.http.get("/datastore/label", params={"label": image, "tag": "final"})
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj, dtype=np.uint8)


def versions(server: Server, image: str) -> list[dict[str, Any]]:
    r = server.http.get("/datastore/label/versions", params={"image": image, "tag": "final"})
    assert r.status_code in (200, 404), r.text
    return r.json()["versions"] if r.status_code == 200 else []


def pacs_segs(pacs: LoadedPacs, image: str) -> list[Dataset]:
    found = []
    for series in pacs.client.search_series({"Modality": "SEG"}):
        for ds in pacs.client.retrieve_series(str(series.StudyInstanceUID), str(series.SeriesInstanceUID)):
            if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == image:
                found.append(ds)
    return found


def _corrected(truth: np.ndarray, seed: int) -> np.ndarray:
    """The true label with a few voxels of a random slice painted posterior: a label unlike the last one."""
    label = truth.copy()
    k = int(np.random.default_rng(seed).integers(0, truth.shape[2]))
    label[10:14, 10:14, k] = 2
    return label


@pytest.mark.parametrize("kind", ["highdicom", "ohif", "label_map"])
def test_a_stored_seg_becomes_the_final_label_and_the_last_save_wins(
    server: Server, pacs: LoadedPacs, mr: dict[str, Any], kind: str
) -> None:
    uid = mr["uid"]
    before = versions(server, uid)
    first = _corrected(mr["truth"], 1)
    seg = make_seg(kind, first, mr["sources"])
    r = server.http.post(STOW, content=stow_body(part10(seg)), headers=HEADERS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    answer = Dataset.from_json(r.json())
    assert "FailedSOPSequence" not in answer
    (item,) = answer.ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (seg.SOPClassUID, seg.SOPInstanceUID)
    assert answer.RetrieveURL.endswith(f"/proxy/dicom/wado/studies/{mr['study']}")

    # OHIF reads its SEG back by its own UIDs: the PACS does not hold it, the proxy answers what was sent
    echoed = server.http.get(
        f"/proxy/dicom/wado/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert echoed.status_code == 200, echoed.text
    assert part10(seg) in echoed.content and echoed.headers["content-type"].startswith("multipart/related")

    # the stored final label is the SEG's content; the PACS holds the server's SEG of it, not OHIF's
    np.testing.assert_array_equal(final_label(server, uid), first)
    (stored,) = pacs_segs(pacs, uid)
    assert stored.Manufacturer == SEG_MANUFACTURER and stored.SeriesInstanceUID != seg.SeriesInstanceUID
    assert item.RetrieveURL.endswith(f"/series/{stored.SeriesInstanceUID}")
    latest = versions(server, uid)[-1]
    assert len(versions(server, uid)) == len(before) + 1
    assert latest["info"]["saved_from"] == "ohif-export" and latest["user"] == "anonymous"
    assert latest["client"] == "ohif" and latest["info"]["received_seg"]["SOPInstanceUID"] == seg.SOPInstanceUID

    # a second export of the same series wins (no conflict check: the history keeps the first)
    second = _corrected(mr["truth"], 2) * (np.arange(mr["truth"].shape[2]) % 2 == 0)
    r = server.http.post(
        f"{STOW}/{mr['study']}?client_id=alice",
        content=stow_body(part10(make_seg(kind, second.astype(np.uint8), mr["sources"]))),
        headers=HEADERS,
    )
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(final_label(server, uid), second)
    assert len(pacs_segs(pacs, uid)) == 1, "the server's earlier SEG is replaced"
    kept = versions(server, uid)
    assert len(kept) == len(before) + 2 and kept[-1]["client"] == "alice"
    older = server.http.get("/datastore/label", params={"label": uid, "tag": "final", "version": kept[-2]["version"]})
    assert older.status_code == 200, older.text
    np.testing.assert_array_equal(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(older.content)).dataobj), first)


def _ct_seg(pacs: LoadedPacs, mr: dict[str, Any]) -> bytes:
    """A SEG of the CT series: in the PACS, but no served model (hippocampus only) segments CT."""
    uid = pacs.series["ct_abdomen"]
    study = str(pacs.client.search_series({"SeriesInstanceUID": uid})[0].StudyInstanceUID)
    datasets = pacs.client.retrieve_series(study, uid)
    volume = load_series(datasets, uid)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    label = np.zeros(volume.data.shape, np.uint8)
    label[200:220, 200:220, 3:6] = 1
    return part10(foreign_seg(label, [by_uid[u] for u in volume.sop_instance_uids], kind="ohif"))


def _seg_with(change: Callable[[Dataset], None]) -> Callable[[LoadedPacs, dict[str, Any]], bytes]:
    def made(pacs: LoadedPacs, mr: dict[str, Any]) -> bytes:
        seg = pydicom.dcmread(io.BytesIO(part10(foreign_seg(mr["truth"], mr["sources"], kind="ohif"))))
        change(seg)
        return part10(seg)

    return made


def _ohif(pacs: LoadedPacs, mr: dict[str, Any]) -> bytes:
    return part10(foreign_seg(mr["truth"], mr["sources"], kind="ohif"))


def _mr_image(pacs: LoadedPacs, mr: dict[str, Any]) -> bytes:
    return part10(mr["sources"][0])


def _renamed(seg: Dataset) -> None:
    seg.SegmentSequence[0].SegmentLabel = "Segment 1"
    seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "85756007"  # Tissue: no label's code


def _unknown_series(seg: Dataset) -> None:
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"


def _moved(seg: Dataset) -> None:
    plane = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    plane.ImagePositionPatient = [float(v) + 0.5 for v in plane.ImagePositionPatient]


# (case, path, headers, body made from the PACS and the MR series, status, message)
REFUSALS: list[tuple[str, str, dict[str, str], Any, int, str]] = [
    ("an MR image, not a SEG", STOW, HEADERS, lambda p, m: stow_body(_mr_image(p, m)), 422, r"not a DICOM SEG"),
    (
        "two instances",
        STOW,
        HEADERS,
        lambda p, m: stow_body(_ohif(p, m), _ohif(p, m)),
        400,
        r"holds 2 parts; .*Store the SEG alone",
    ),
    (
        "unknown series",
        STOW,
        HEADERS,
        lambda p, m: stow_body(_seg_with(_unknown_series)(p, m)),
        422,
        r"segments series 1.2.826.0.1.3680043.8.498.1, which is not labelled here: .* is not in the PACS",
    ),
    (
        "a series no served model is for",
        STOW,
        HEADERS,
        lambda p, m: stow_body(_ct_seg(p, m)),
        422,
        r"which is not labelled here: .* is not in the PACS at .* as a MR series",
    ),
    (
        "frames of another grid",
        STOW,
        HEADERS,
        lambda p, m: stow_body(_seg_with(lambda s: setattr(s, "Rows", 20))(p, m)),
        422,
        r"The SEG's frames are 20 x \d+ \(rows x columns\) and the images of series",
    ),
    (
        "frames between the slices",
        STOW,
        HEADERS,
        lambda p, m: stow_body(_seg_with(_moved)(p, m)),
        422,
        r"frame 1 lies at .* mm, 0.87 mm from the nearest image of series",
    ),
    (
        "a segment of no label",
        STOW,
        HEADERS,
        lambda p, m: stow_body(_seg_with(_renamed)(p, m)),
        422,
        r"segment 'Segment 1' \(code 85756007\) is none of the labels \['anterior', 'posterior'\]",
    ),
    (
        "another study in the path",
        f"{STOW}/1.2.3",
        HEADERS,
        lambda p, m: stow_body(_ohif(p, m)),
        422,
        r"not of study 1.2.3 the request's path names",
    ),
    ("not multipart", STOW, {"Content-Type": "application/dicom"}, _ohif, 415, r"The body is application/dicom"),
    (
        "bad multipart",
        STOW,
        HEADERS,
        lambda p, m: stow_body(_ohif(p, m))[:-10],
        400,
        r"does not end with its closing boundary",
    ),
    (
        "too big",
        STOW,
        HEADERS,
        lambda p, m: stow_body(b"\0" * (MAX_UPLOAD_MB + 1) * 2**20),
        413,
        r"uploads are limited to 1 MB \(--conf max_upload_mb\)",
    ),
    (
        "too big, no length given",
        STOW,
        HEADERS,
        lambda p, m: iter([b"\0" * 2**20] * (MAX_UPLOAD_MB + 2)),  # chunked: no Content-Length
        413,
        r"passed 1 MB, the limit for uploads \(--conf max_upload_mb\)",
    ),
    ("a query the store does not take", f"{STOW}?x=1", HEADERS, lambda p, m: stow_body(_ohif(p, m)), 422, r"\['x'\]"),
    ("below a series", f"{STOW}/1.2/series", HEADERS, lambda p, m: stow_body(_ohif(p, m)), 405, r"is not forwarded"),
    ("to the QIDO root", "/proxy/dicom/qido/studies", HEADERS, lambda p, m: stow_body(_ohif(p, m)), 405, "forwarded"),
    ("escaped path", "/proxy/dicom/wado/%73tudies", HEADERS, lambda p, m: stow_body(_ohif(p, m)), 400, "escapes"),
]


@pytest.mark.parametrize(("case", "path", "headers", "body", "status", "match"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_anything_but_one_seg_of_a_labelled_series_is_refused_and_nothing_is_stored(
    server: Server,
    pacs: LoadedPacs,
    mr: dict[str, Any],
    case: str,
    path: str,
    headers: dict[str, str],
    body: Callable[[LoadedPacs, dict[str, Any]], Any],
    status: int,
    match: str,
) -> None:
    uid = mr["uid"]
    segs_before = sorted(str(s.SeriesInstanceUID) for s in pacs_segs(pacs, uid))
    label_before, versions_before = final_label(server, uid), len(versions(server, uid))
    all_segs_before = len(pacs.client.search_series({"Modality": "SEG"}))
    try:
        r = server.http.post(path, content=body(pacs, mr), headers=headers)
    except httpx.RemoteProtocolError:  # the server may answer 413 and close before the body is sent
        pytest.fail(f"{case}: the connection closed without an answer")
    assert r.status_code == status, r.text
    assert re.search(match, r.json()["detail"]), r.json()["detail"]
    assert sorted(str(s.SeriesInstanceUID) for s in pacs_segs(pacs, uid)) == segs_before
    assert len(pacs.client.search_series({"Modality": "SEG"})) == all_segs_before, "nothing reached the PACS"
    after = final_label(server, uid)
    assert (after is None and label_before is None) or np.array_equal(after, label_before)
    assert len(versions(server, uid)) == versions_before


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_writes_are_still_not_forwarded(server: Server, method: str) -> None:
    r = server.http.request(method, STOW, content=b"x", headers=HEADERS)
    assert r.status_code == 405, r.text


def test_reads_are_still_forwarded(server: Server, mr: dict[str, Any]) -> None:
    r = server.http.get(f"/proxy/dicom/qido/studies/{mr['study']}/series", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    assert mr["uid"] in r.text


def test_with_authentication_the_store_needs_an_annotator_and_the_version_is_theirs(
    pacs: LoadedPacs, mr: dict[str, Any], tmp_path: Path
) -> None:
    """ANNOTATOR, as the panel's save (it was ADMIN, as every write below /proxy/dicom/); the label's
    author is the token's user, whatever the SEG or the query says."""
    users = {"ulla": ("pw-u", [USER]), "anna": ("pw-a", [USER, ANNOTATOR])}
    conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    with serve_realm(StandInRealm(users=dict(users))) as realm:
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url}
        with monailabel_server(tmp_path, pacs.orthanc.dicomweb_url, conf, env=env, probe="/auth/") as authed:

            def bearer(name: str) -> dict[str, str]:
                return {**HEADERS, "Authorization": f"Bearer {realm.token(name, users[name][1])}"}

            label = _corrected(mr["truth"], 3)
            body = stow_body(part10(make_seg("label_map", label, mr["sources"])))
            assert authed.http.post(STOW, content=body, headers=HEADERS).status_code == 401
            refused = authed.http.post(STOW, content=body, headers=bearer("ulla"))
            assert refused.status_code == 403 and "annotator" in refused.text, refused.text
            r = authed.http.post(f"{STOW}?client_id=mallory", content=body, headers=bearer("anna"))
            assert r.status_code == 200, r.text
            answer = authed.http.get(
                "/datastore/label/versions", params={"image": mr["uid"], "tag": "final"}, headers=bearer("anna")
            )
            assert answer.status_code == 200, answer.text
            latest = answer.json()["versions"][-1]
            assert latest["user"] == "anna" and latest["info"]["saved_from"] == "ohif-export", latest
