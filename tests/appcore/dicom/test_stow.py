"""appcore.dicom.stow without a server: the STOW-RS body of OHIF's SEG export, read and checked."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from appcore.dicom import stow
from appcore.errors import RequestError
from tests.appcore.dicom.test_dicom import _hippocampus_phantom
from tests.segs import foreign_seg, label_map_seg

BOUNDARY = "b0undary-1234"


def part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, write_like_original=False)
    return out.getvalue()


def ohif_body(*contents: bytes, boundary: str = BOUNDARY) -> bytes:
    """A body as OHIF's dicomweb-client writes one (``multipartEncode``): CRLF before the first delimiter."""
    head = f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + c for c in contents) + f"\r\n--{boundary}--".encode()


def client_body(*contents: bytes, boundary: str = BOUNDARY) -> bytes:
    """A body as appcore.dicom.client writes one: the first delimiter at the start, a CRLF after the close."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + c + b"\r\n" for c in contents) + f"--{boundary}--\r\n".encode()


OHIF_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


@pytest.mark.parametrize(
    ("method", "op", "path", "expected"),
    [
        ("POST", "wado", "studies", (True, None)),  # where OHIF posts (its WADO root)
        ("POST", "", "studies/1.2.840.5", (True, "1.2.840.5")),
        ("POST", "stow", "studies", (True, None)),
        ("POST", "qido", "studies", (False, None)),
        ("POST", "wado", "studies/1.2/series", (False, None)),
        ("POST", "", "tools/create-dicom", (False, None)),
        ("POST", "wado", "studies/..", (False, None)),
        ("GET", "wado", "studies", (False, None)),
        ("PUT", "wado", "studies", (False, None)),
    ],
)
def test_only_a_post_to_studies_is_a_store(method: str, op: str, path: str, expected: tuple[bool, str | None]) -> None:
    assert stow.stow_target(method, op, path) == expected


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (OHIF_TYPE, ohif_body(b"DICOM")),
        (f"multipart/related; type=application/dicom; boundary={BOUNDARY}", client_body(b"DICOM")),
        (f"Multipart/Related; boundary={BOUNDARY}", b"preamble\r\n" + client_body(b"DICOM") + b"epilogue"),
        (OHIF_TYPE, f"\r\n--{BOUNDARY}\r\n\r\nDICOM\r\n--{BOUNDARY}--".encode()),  # a part without headers
    ],
    ids=["as OHIF writes it", "as our client writes it", "preamble, epilogue, no type", "no part headers"],
)
def test_the_one_part_is_found(content_type: str, body: bytes) -> None:
    assert stow.stow_part(content_type, body) == b"DICOM"


@pytest.mark.parametrize(
    ("content_type", "body", "status", "match"),
    [
        (
            "application/dicom",
            b"DICM",
            415,
            r"The body is application/dicom; POST /proxy/dicom/\[wado/\|stow/\]",
        ),
        ("", b"x", 415, "The body is text/plain"),
        (
            f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
            ohif_body(b"{}"),
            415,
            'type is "application/dicom\\+json", not "application/dicom"',
        ),
        ('multipart/related; type="application/dicom"', ohif_body(b"x"), 400, "names no boundary"),
        (f"multipart/related; boundary={'b' * 71}", ohif_body(b"x", boundary="b" * 71), 400, "names no boundary"),
        ('multipart/related; boundary="bö"', b"x", 400, r"names no boundary \(1 to 70 ASCII characters\)"),
        (OHIF_TYPE, b"DICM but no multipart", 400, f"has no boundary '{BOUNDARY}'"),
        (OHIF_TYPE, ohif_body(b"one", b"two"), 400, "holds 2 parts; .* Store the SEG alone"),
        (OHIF_TYPE, f"\r\n--{BOUNDARY}--".encode(), 400, "holds 0 parts"),
        (OHIF_TYPE, ohif_body(b"cut")[:-4], 400, f"does not end with its closing boundary '--{BOUNDARY}--'"),
        (
            OHIF_TYPE,
            f"\r\n--{BOUNDARY}x\r\n\r\nz\r\n--{BOUNDARY}--".encode(),
            400,
            "not followed by the end of its line",
        ),
        (OHIF_TYPE, f"\r\n--{BOUNDARY}\r\nContent-Type: a\r\nz\r\n--{BOUNDARY}--".encode(), 400, "no blank line"),
        (OHIF_TYPE, f"\r\n--{BOUNDARY}\r\nbroken\r\n\r\nz\r\n--{BOUNDARY}--".encode(), 400, "not 'Name: value'"),
        (
            OHIF_TYPE,
            f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom+xml\r\n\r\n<x/>\r\n--{BOUNDARY}--".encode(),
            415,
            "The part is application/dicom\\+xml, not application/dicom",
        ),
    ],
    ids=[
        "one instance, not multipart",
        "no content type",
        "metadata (json)",
        "no boundary",
        "boundary too long",
        "boundary not ascii",
        "boundary absent from the body",
        "two instances",
        "no instance",
        "cut off",
        "delimiter runs on",
        "no blank line after the headers",
        "malformed part header",
        "metadata part (xml)",
    ],
)
def test_a_body_that_is_not_one_dicom_part_is_refused(content_type: str, body: bytes, status: int, match: str) -> None:
    with pytest.raises(RequestError, match=match) as refused:
        stow.stow_part(content_type, body)
    assert refused.value.status_code == status


def _seg(kind: str = "ohif") -> tuple[Dataset, list[Dataset]]:
    label, sources, _ = _hippocampus_phantom()
    if kind == "label_map":
        return label_map_seg(label, sources, rle=True, by_position=False), sources
    return foreign_seg(label, sources, kind=kind), sources  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["binary", "ohif", "label_map"])
def test_a_seg_is_read_from_its_part(kind: str) -> None:
    seg, _ = _seg(kind)
    read = stow.read_seg(stow.stow_part(OHIF_TYPE, ohif_body(part10(seg))))
    assert read.SOPInstanceUID == seg.SOPInstanceUID and "PixelData" in read


def test_instances_that_are_no_seg_are_refused() -> None:
    _, sources = _seg()
    ct = sources[0].copy()
    ct.PixelData = b"\0" * (int(ct.Rows) * int(ct.Columns) * 2)
    no_pixels = pydicom.dcmread(io.BytesIO(part10(_seg()[0])))
    del no_pixels.PixelData
    no_uid = pydicom.dcmread(io.BytesIO(part10(_seg()[0])))
    no_uid.SOPInstanceUID = ""
    del no_uid.StudyInstanceUID
    cases = [
        (part10(no_uid), "The SEG has no StudyInstanceUID, SOPInstanceUID: a stored instance names"),
        (b"plain text, no DICOM file", "The part is no DICOM file \\(PS3.10\\) pydicom can read: InvalidDicomError"),
        (part10(ct), r"SOP class 1.2.840.10008.5.1.4.1.1.4 \(MR Image Storage\), not a DICOM SEG"),
        (part10(no_pixels), "The SEG has no pixel data"),
    ]
    for content, match in cases:
        with pytest.raises(RequestError, match=match) as refused:
            stow.read_seg(content)
        assert refused.value.status_code == 422


def test_a_deflated_seg_is_refused_before_it_is_inflated() -> None:
    """Deflated Explicit VR Little Endian: pydicom inflates the whole dataset as it reads it, so a small
    part became hundreds of MB (here 0.4 MB of zeros inflating to 200 MB). Refused from its file meta."""
    seg, _ = _seg()
    seg.PixelData = bytes(200_000_000)
    seg.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    seg.is_little_endian, seg.is_implicit_VR = True, False
    content = part10(seg)
    assert len(content) < 1_000_000, "a zip bomb: small on the wire"
    match = r"transfer syntax 1.2.840.10008.1.2.1.99 \(Deflated Explicit VR Little Endian\); taken: "
    with pytest.raises(RequestError, match=match) as refused:
        stow.read_seg(stow.stow_part(OHIF_TYPE, ohif_body(content)))
    assert refused.value.status_code == 422


def _other_series(seg: Dataset) -> None:
    extra = Dataset()
    extra.SeriesInstanceUID = "1.2.3.4.5"
    seg.ReferencedSeriesSequence.append(extra)


@pytest.mark.parametrize(
    ("change", "study", "match"),
    [
        (lambda s: setattr(s, "ReferencedSeriesSequence", []), None, r"references 0 series \(none\)"),
        (_other_series, None, "references 2 series"),
        (lambda s: None, "1.2.3", r"is of study .*, not of study 1.2.3 the request's path names"),
    ],
    ids=["no series", "two series", "another study"],
)
def test_a_seg_segments_one_series_of_the_study_named(
    change: Callable[[Dataset], None], study: str | None, match: str
) -> None:
    seg, _ = _seg()
    change(seg)
    with pytest.raises(RequestError, match=match):
        stow.referenced_series(seg, study)


def test_the_referenced_series_is_answered() -> None:
    seg, sources = _seg()
    assert stow.referenced_series(seg, str(seg.StudyInstanceUID)) == str(sources[0].SeriesInstanceUID)
    assert stow.referenced_series(seg, None) == str(sources[0].SeriesInstanceUID)


def _first_frame(seg: Dataset) -> Dataset:
    return seg.PerFrameFunctionalGroupsSequence[0]


def _foreign_source(seg: Dataset) -> None:
    _first_frame(seg).DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"


def _moved(seg: Dataset) -> None:
    plane = _first_frame(seg).PlanePositionSequence[0]
    plane.ImagePositionPatient = [float(plane.ImagePositionPatient[0]) + 0.4, *plane.ImagePositionPatient[1:]]


def _shared(keyword: str, sequence: str, value: list[float]) -> Callable[[Dataset], None]:
    def change(seg: Dataset) -> None:
        setattr(getattr(seg.SharedFunctionalGroupsSequence[0], sequence)[0], keyword, value)

    return change


def _elsewhere(seg: Dataset) -> None:
    """The first frame placed on another slice than the image it names."""
    groups = seg.PerFrameFunctionalGroupsSequence
    groups[0].PlanePositionSequence[0].ImagePositionPatient = groups[-1].PlanePositionSequence[0].ImagePositionPatient


def _two_coordinates(seg: Dataset) -> None:
    _first_frame(seg).PlanePositionSequence[0].ImagePositionPatient = [1.0, 2.0]


def _unplaced(seg: Dataset) -> None:
    group = _first_frame(seg)
    del group.PlanePositionSequence
    del group.DerivationImageSequence


@pytest.mark.parametrize(
    ("kind", "change", "match"),
    [
        ("ohif", lambda s: setattr(s, "Rows", 11), r"frames are 11 x 12 \(rows x columns\) and the images of series"),
        ("ohif", lambda s: setattr(s, "NumberOfFrames", 17), "has 17 frames; series .* has 8 images, so at most 16"),
        ("label_map", lambda s: setattr(s, "NumberOfFrames", 9), r"at most 8 frames \(1 per image\)"),
        ("ohif", _two_coordinates, "frame attributes cannot be read: ValueError"),
        ("ohif", lambda s: s.SegmentSequence.append(s.SegmentSequence[0]), "has 3 segments; a label of this"),
        ("ohif", _foreign_source, "frame 1 is derived from instance 1.2.3.4, which is no image of series"),
        ("label_map", _moved, r"frame 1 lies at .* mm, 0.40 mm from the nearest image of series"),
        ("ohif", _unplaced, "frame 1 names no image of series .* and no position"),
        ("label_map", _elsewhere, r"frame 1 lies on image \d+ of series .* but is derived from image \d+"),
        (
            "ohif",
            _shared("ImageOrientationPatient", "PlaneOrientationSequence", [0, 1, 0, 1, 0, 0]),
            r"The SEG is oriented \[0.0, 1.0, 0.0, 1.0, 0.0, 0.0\], the series' images",
        ),
        (
            "ohif",
            _shared("PixelSpacing", "PixelMeasuresSequence", [0.8, 0.9]),
            r"pixel spacing of \[0.8, 0.9\] mm, the series' images \[0.8, 0.8\] mm",
        ),
        (
            "ohif",
            lambda s: setattr(s, "PerFrameFunctionalGroupsSequence", s.PerFrameFunctionalGroupsSequence[1:]),
            "frames but .* per-frame functional groups",
        ),
    ],
    ids=[
        "rows",
        "too many frames",
        "too many label map frames",
        "malformed frame position",
        "more segments than labels",
        "frame of another series",
        "frame between slices",
        "frame placed nowhere",
        "frame placed on another image than its source",
        "orientation",
        "pixel spacing",
        "functional groups missing",
    ],
)
def test_frames_off_the_series_grid_are_refused(kind: str, change: Callable[[Dataset], None], match: str) -> None:
    seg, sources = _seg(kind)
    seg = pydicom.dcmread(io.BytesIO(part10(seg)))  # as the server reads it: a plain dataset
    change(seg)
    with pytest.raises(RequestError, match=match) as refused:
        stow.check_seg_frames(seg, sources, str(sources[0].SeriesInstanceUID), labels=2)
    assert refused.value.status_code == 422


@pytest.mark.parametrize("kind", ["binary", "ohif", "label_map"])
def test_frames_on_the_series_grid_pass(kind: str) -> None:
    seg, sources = _seg(kind)
    stow.check_seg_frames(pydicom.dcmread(io.BytesIO(part10(seg))), sources, "1.2", labels=2)


def test_the_store_answer_is_a_ps3_18_store_response() -> None:
    seg, _ = _seg()
    answer = Dataset.from_json(stow.store_answer(seg, "http://s/proxy/dicom/wado/studies/1", "http://s/x"))
    assert answer.RetrieveURL == "http://s/proxy/dicom/wado/studies/1" and "FailedSOPSequence" not in answer
    (item,) = answer.ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (seg.SOPClassUID, seg.SOPInstanceUID)
    assert item.RetrieveURL == "http://s/x"
    assert np.isscalar(len(answer.ReferencedSOPSequence))


def test_received_segs_are_recalled_by_their_exact_instance_path_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    seg, _ = _seg()
    kept = stow.ReceivedSegs(keep=2, ttl_s=60.0)
    kept.remember(seg, b"DICM bytes")
    path = f"studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}"
    assert kept.recall(path) == b"DICM bytes"
    for other in (f"{path}/frames/1", f"{path}/metadata", path.replace("studies/", "studies/9"), "studies"):
        assert kept.recall(other) is None, other
    later = stow.time.monotonic() + 61
    monkeypatch.setattr(stow.time, "monotonic", lambda: later)
    assert kept.recall(path) is None, "forgotten after ttl_s"


def test_only_the_newest_received_segs_are_kept() -> None:
    kept = stow.ReceivedSegs(keep=2)
    segs = [_seg()[0] for _ in range(3)]
    for n, seg in enumerate(segs):
        kept.remember(seg, bytes([n + 1]))
    paths = [f"studies/{s.StudyInstanceUID}/series/{s.SeriesInstanceUID}/instances/{s.SOPInstanceUID}" for s in segs]
    assert [kept.recall(p) for p in paths] == [None, b"\x02", b"\x03"]
