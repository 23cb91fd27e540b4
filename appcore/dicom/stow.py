"""A STOW-RS request of one DICOM SEG (OHIF's "Export > DICOM SEG > Save"), checked before it becomes a label.

OHIF stores a segmentation with ``POST <wadoRoot>/studies`` (multipart/related; type="application/dicom",
one PS3.10 file per part). The server takes such a request as a label save (``appcore.dicom.labeling``):
nothing of it is forwarded to the PACS. This module only reads and checks: the multipart body
(``stow_part``), the one instance in it (``read_seg``), that it is a SEG of one series of the study
named (``referenced_series``), and that its frames lie on that series' grid (``check_seg_frames``);
every refusal is a ``RequestError`` saying what was expected. ``store_answer`` is the PS3.18 store
response a STOW-RS client (OHIF) reads as success.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from email.message import Message
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from appcore.dicom.seg import LABEL_MAP_SEG
from appcore.errors import RequestError, bad_request, unprocessable

# The Segmentation Storage SOP class (binary and fractional SEG; OHIF's export in its "bitmap" mode).
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_CLASSES = {SEG: "Segmentation", LABEL_MAP_SEG: "Label Map Segmentation"}

# The transfer syntaxes a SEG is taken in: those OHIF and highdicom write. Not Deflated Explicit VR
# Little Endian: pydicom inflates a whole deflated dataset before reading it, so a 0.4 MB part became
# 400 MB of memory (a zip bomb); nor the image compressions, which no SEG writer here uses.
SEG_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

_UID = r"\d{1,64}(?:\.\d{1,64}){0,63}"
# The proxy paths a STOW-RS client posts to: <root>/studies[/{study}] below the bare proxy, its WADO
# root (OHIF's stow root when none is configured) or its STOW root.
STOW_OPS = ("", "wado", "stow")
STOW_PATH = re.compile(rf"studies(?:/({_UID}))?")
STOW_MEDIA_TYPE = "application/dicom"
ANSWER_MEDIA_TYPE = "application/dicom+json"

# Positions (mm) and direction cosines closer than these are the same; far below any real voxel.
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE = 1e-3  # relative

ACCEPTED = (
    "POST /proxy/dicom/[wado/|stow/]studies[/{study}] stores a label: a multipart/related; "
    'type="application/dicom" body with exactly one part, a DICOM SEG (binary or Label Map) of one series '
    "of the PACS that a served model segments, as OHIF's Export > DICOM SEG > Save sends it"
)


def stow_target(method: str, op: str, path: str) -> tuple[bool, str | None]:
    """Whether a proxy request is a STOW-RS store (a POST to ``studies`` or ``studies/{uid}`` below one of
    ``STOW_OPS``), and the study UID its path names (None for ``studies``)."""
    match = STOW_PATH.fullmatch(path) if method == "POST" and op in STOW_OPS else None
    return (match is not None, match.group(1) if match else None)


def stow_part(content_type: str, body: bytes) -> bytes:
    """The one ``application/dicom`` part of a STOW-RS body.

    Raises:
        RequestError: 415 for another media type (not multipart/related, or a part that is not
            application/dicom: metadata with bulk data is not taken); 400 for a body that is not
            multipart as its boundary says (no boundary, no closing delimiter, a part without a
            blank line after its headers) or holds no part or several.
    """
    header = Message()
    header["content-type"] = content_type or "text/plain"
    if header.get_content_type() != "multipart/related":
        raise RequestError(415, f"The body is {header.get_content_type()}; {ACCEPTED}")
    root = str(header.get_param("type") or STOW_MEDIA_TYPE).lower()
    if root != STOW_MEDIA_TYPE:
        raise RequestError(415, f'The multipart body\'s type is "{root}", not "{STOW_MEDIA_TYPE}"; {ACCEPTED}')
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 70 or not boundary.isascii():
        raise bad_request(
            f"The Content-Type names no boundary (1 to 70 ASCII characters) for the multipart body; {ACCEPTED}"
        )
    parts = _split(b"\r\n" + body, boundary.encode("ascii"))
    if len(parts) != 1:
        raise bad_request(
            f"The multipart body holds {len(parts)} parts; {ACCEPTED}. Store the SEG alone, one request per SEG"
        )
    headers, content = parts[0]
    media = headers.get("content-type")
    if media is not None:
        part = Message()
        part["content-type"] = media
        if part.get_content_type() != STOW_MEDIA_TYPE:
            raise RequestError(415, f"The part is {part.get_content_type()}, not {STOW_MEDIA_TYPE}; {ACCEPTED}")
    return content


def _split(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body (RFC 2046; ``body`` given a leading CRLF so that a delimiter at its
    very start is found too), each as its headers (names lower-case) and content."""
    delimiter = b"\r\n--" + boundary
    pieces = body.split(delimiter)
    if len(pieces) < 2:
        raise bad_request(f"The multipart body has no boundary {boundary.decode('ascii')!r}; {ACCEPTED}")
    parts = []
    for piece in pieces[1:]:  # pieces[0] is the preamble
        if piece.startswith(b"--"):  # the close delimiter: the rest is the epilogue
            return parts
        line_end = piece.find(b"\r\n")
        if line_end < 0 or piece[:line_end].strip(b" \t"):
            raise bad_request("A multipart boundary is not followed by the end of its line; the body is not multipart")
        rest = piece[line_end + 2 :]
        if rest.startswith(b"\r\n"):  # no headers
            head, content = b"", rest[2:]
        else:
            head, blank, content = rest.partition(b"\r\n\r\n")
            if not blank:
                raise bad_request("A part of the multipart body has no blank line after its headers")
        headers = {}
        for line in head.split(b"\r\n") if head else []:
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name.strip():
                raise bad_request(f"A part of the multipart body has a header line that is not 'Name: value': {line!r}")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    raise bad_request(
        f"The multipart body does not end with its closing boundary '--{boundary.decode('ascii')}--': "
        "it was cut off, or is not multipart"
    )


@contextlib.contextmanager
def _read_as_part10() -> Iterator[None]:
    """A 422 for whatever pydicom raises reading the part: it raises many kinds on a malformed file."""
    try:
        yield
    except Exception as e:
        raise unprocessable(f"The part is no DICOM file (PS3.10) pydicom can read: {type(e).__name__}: {e}") from None


def _uid_name(uid: str) -> str:
    """The name pydicom knows a UID by (the UID itself if none), or ``none`` for an empty one."""
    return getattr(pydicom.uid.UID(uid), "name", uid) if uid else "none"


def read_seg(content: bytes) -> Dataset:
    """The part as a DICOM SEG (a PS3.10 file, read with pydicom without guessing: ``force=False``).

    Raises:
        RequestError: 422 for a part that is not a DICOM file, an instance of another SOP class
            (the message names the class and the ones taken), or a SEG without its UIDs or pixel data.
    """
    with _read_as_part10():
        fp = io.BytesIO(content)
        pydicom.filereader.read_preamble(fp, False)
        syntax = str(pydicom.filereader._read_file_meta_info(fp).get("TransferSyntaxUID", ""))
    if syntax not in SEG_SYNTAXES:
        raise unprocessable(
            f"The SEG is encoded in transfer syntax {syntax or 'none'} ({_uid_name(syntax)}); taken: "
            f"{', '.join(f'{uid} ({n})' for uid, n in SEG_SYNTAXES.items())}, as OHIF and highdicom write SEGs"
        )
    with _read_as_part10():
        ds = pydicom.dcmread(io.BytesIO(content), force=False)
        sop_class = str(ds.get("SOPClassUID", ""))
        ds.get("PixelData")  # read now: a cut-off file fails here, not later
    if sop_class not in SEG_CLASSES:
        raise unprocessable(
            f"The instance is of SOP class {sop_class or 'none'} ({_uid_name(sop_class)}), not a DICOM SEG "
            f"({', '.join(f'{uid} {n}' for uid, n in SEG_CLASSES.items())}): only segmentations are stored, as labels"
        )
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not str(ds.get(k, ""))]
    if missing:
        raise unprocessable(f"The SEG has no {', '.join(missing)}: a stored instance names its study, series and self")
    if "PixelData" not in ds:
        raise unprocessable("The SEG has no pixel data: it segments nothing")
    return ds


def referenced_series(seg: Dataset, study_in_path: str | None) -> str:
    """The one series the SEG segments (its ReferencedSeriesSequence), after checking that its study is
    the one the path names.

    Raises:
        RequestError: 422 when it references no series or several, or its StudyInstanceUID is not
            the path's.
    """
    refs = seg.get("ReferencedSeriesSequence") or []
    uids = sorted({str(item.get("SeriesInstanceUID", "")) for item in refs})
    if len(uids) != 1 or not uids[0]:
        raise unprocessable(
            f"The SEG references {len(uids)} series ({', '.join(uids) or 'none'}) in its ReferencedSeriesSequence; "
            "a label segments exactly one series: segment one series per SEG"
        )
    study = str(seg.get("StudyInstanceUID", ""))
    if study_in_path is not None and study != study_in_path:
        raise unprocessable(
            f"The SEG is of study {study or 'none'}, not of study {study_in_path} the request's path names: "
            "post it to .../studies or to its own study"
        )
    return uids[0]


def check_seg_frames(seg: Dataset, sources: Sequence[Dataset], series: str, labels: int) -> None:
    """Check that the SEG's frames lie on the series' grid before any pixel is decoded.

    ``sources`` are the series' instances (headers) in slice order; ``labels`` the number of the
    model's labels. The frames must have the series' rows and columns, orientation and pixel
    spacing (where the SEG states them), each frame must name images of the series or lie at one
    of its slice positions, and there may be no more frames than one per slice (Label Map) or one
    per slice and segment (binary, at most one segment per label).

    Raises:
        RequestError: 422 saying which frame or attribute does not fit and what the series has, or
            that an attribute read is malformed.
    """
    try:
        _check_frames(seg, sources, series, labels)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise unprocessable(f"The SEG's frame attributes cannot be read: {type(e).__name__}: {e}") from None


def _check_frames(seg: Dataset, sources: Sequence[Dataset], series: str, labels: int) -> None:
    first = sources[0]
    rows, columns = int(first.Rows), int(first.Columns)
    if (int(seg.get("Rows", 0)), int(seg.get("Columns", 0))) != (rows, columns):
        raise unprocessable(
            f"The SEG's frames are {seg.get('Rows')} x {seg.get('Columns')} (rows x columns) and the images of "
            f"series {series} {rows} x {columns}: the SEG was made on another grid; segment that series' images"
        )
    segments = len(seg.get("SegmentSequence") or [])
    if not 0 < segments <= labels:
        raise unprocessable(
            f"The SEG has {segments} segments; a label of this series has {labels} (one segment per label at most)"
        )
    per_slice = 1 if str(seg.SOPClassUID) == LABEL_MAP_SEG else segments
    frames = int(seg.get("NumberOfFrames", 1) or 1)
    if not 0 < frames <= per_slice * len(sources):
        raise unprocessable(
            f"The SEG has {frames} frames; series {series} has {len(sources)} images, so at most "
            f"{per_slice * len(sources)} frames ({per_slice} per image) fit it"
        )
    groups = seg.get("PerFrameFunctionalGroupsSequence") or []
    if len(groups) != frames:
        raise unprocessable(f"The SEG has {frames} frames but {len(groups)} per-frame functional groups")
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient])
    spacing = np.asarray([float(v) for v in first.PixelSpacing])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
    instances = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    _check_plane(shared, orientation, spacing, "The SEG")
    for k, group in enumerate(groups, start=1):
        what = f"The SEG's frame {k}"
        _check_plane(group, orientation, spacing, what)
        named = [
            str(source.get("ReferencedSOPInstanceUID", ""))
            for derivation in group.get("DerivationImageSequence") or []
            for source in derivation.get("SourceImageSequence") or []
        ]
        foreign = [uid for uid in named if uid not in instances]
        if foreign:
            raise unprocessable(
                f"{what} is derived from instance {foreign[0]}, which is no image of series {series}: "
                "the SEG was made on another series"
            )
        plane = group.get("PlanePositionSequence") or []
        if plane and "ImagePositionPatient" in plane[0]:
            at = np.asarray([float(v) for v in plane[0].ImagePositionPatient])
            distances = np.linalg.norm(positions - at, axis=1)
            nearest = int(distances.argmin())
            if distances[nearest] > POSITION_TOLERANCE_MM:
                raise unprocessable(
                    f"{what} lies at {at.round(3).tolist()} mm, {distances[nearest]:.2f} mm from the nearest image of "
                    f"series {series}: its frames are not the series' slices"
                )
            if named and nearest not in {instances[uid] for uid in named}:
                raise unprocessable(
                    f"{what} lies on image {nearest + 1} of series {series} (in slice order) but is derived from "
                    f"image {sorted(instances[uid] + 1 for uid in named)[0]}: its position and its source disagree"
                )
        elif not named:
            raise unprocessable(f"{what} names no image of series {series} and no position: it cannot be placed")


def _check_plane(group: Dataset, orientation: np.ndarray, spacing: np.ndarray, what: str) -> None:
    """The orientation and pixel spacing a functional group states, where it states them, against the series'."""
    planes = group.get("PlaneOrientationSequence") or []
    if planes and "ImageOrientationPatient" in planes[0]:
        theirs = np.asarray([float(v) for v in planes[0].ImageOrientationPatient])
        if theirs.shape != orientation.shape or np.abs(theirs - orientation).max() > ORIENTATION_TOLERANCE:
            raise unprocessable(
                f"{what} is oriented {theirs.round(4).tolist()}, the series' images "
                f"{orientation.round(4).tolist()}: the SEG was made on another grid"
            )
    measures = group.get("PixelMeasuresSequence") or []
    if measures and "PixelSpacing" in measures[0]:
        theirs = np.asarray([float(v) for v in measures[0].PixelSpacing])
        if theirs.shape != spacing.shape or np.abs(theirs - spacing).max() > SPACING_TOLERANCE * spacing.max():
            raise unprocessable(
                f"{what} has a pixel spacing of {theirs.round(4).tolist()} mm, the series' images "
                f"{spacing.round(4).tolist()} mm: the SEG was made on another grid"
            )


def store_answer(seg: Dataset, study_url: str, stored_url: str) -> dict[str, Any]:
    """The PS3.18 store response (DICOM JSON) for the received SEG: its study's RetrieveURL, and the
    instance among the ReferencedSOPSequence (stored: no FailedSOPSequence), whose RetrieveURL is the
    SEG the server wrote for it."""
    item = {
        "00081150": {"vr": "UI", "Value": [str(seg.SOPClassUID)]},
        "00081155": {"vr": "UI", "Value": [str(seg.SOPInstanceUID)]},
        "00081190": {"vr": "UR", "Value": [stored_url]},
    }
    return {"00081190": {"vr": "UR", "Value": [study_url]}, "00081199": {"vr": "SQ", "Value": [item]}}


class ReceivedSegs:
    """The SEGs OHIF stored lately, byte for byte, by (study, series, instance) UIDs: read back through the
    proxy only where the PACS has no such instance.

    OHIF shows the SEG it has just stored and fetches it again by its own UIDs (a Part 10 prefetch of
    the whole instance). The PACS holds the server's SEG instead, under new UIDs, so that fetch got a
    404 and OHIF's viewport stayed at "Loading SEG..." (measured: over 120 s). The proxy answers it with
    the bytes OHIF sent (``appcore.dicom.proxy``), and only after the PACS said 404, so nothing the PACS
    holds is ever shadowed; the PACS itself never gets them. Kept: the newest ``keep``, for ``ttl_s``.
    """

    def __init__(self, keep: int = 8, ttl_s: float = 900.0) -> None:
        self._keep, self._ttl_s = keep, ttl_s
        self._items: OrderedDict[tuple[str, str, str], tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, seg: Dataset, content: bytes) -> None:
        key = (str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID))
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (time.monotonic(), content)
            while len(self._items) > self._keep:
                self._items.popitem(last=False)

    def recall(self, path: str) -> bytes | None:
        """The bytes of the instance a WADO-RS path (``studies/{uid}/series/{uid}/instances/{uid}``) names."""
        match = _INSTANCE_PATH.fullmatch(path)
        if match is None:
            return None
        with self._lock:
            at, content = self._items.get(match.groups(), (0.0, b""))
            if not content or time.monotonic() - at > self._ttl_s:
                return None
            return content


_INSTANCE_PATH = re.compile(rf"studies/({_UID})/series/({_UID})/instances/({_UID})")
RECEIVED = ReceivedSegs()


def multipart_instance(content: bytes) -> tuple[bytes, str]:
    """One PS3.10 instance as a WADO-RS answer: the body and its Content-Type."""
    boundary = "active-label-server-instance"
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + content
    media_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return body + f"\r\n--{boundary}--\r\n".encode(), media_type
