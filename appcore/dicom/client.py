"""A small DICOMweb client with timeouts that retrieves instances in their stored transfer syntax."""

from __future__ import annotations

import http.client
import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import pydicom
import requests
from fastapi import HTTPException
from pydicom.dataset import Dataset
from requests_toolbelt.multipart.decoder import MultipartDecoder

logger = logging.getLogger(__name__)

# Ask for what the PACS stored: a PACS without a transcoder (Debian's Orthanc has no GDCM plugin)
# answers a plain series retrieve of a JPEG 2000 series with 500; we decode locally instead.
STORED_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class PacsUnavailable(HTTPException):
    """The PACS did not answer or answered with a server error; a 503 that names the PACS and the step."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=503, detail=detail)

    def __str__(self) -> str:
        return f"503: {self.detail}"


def _closed_under_it(error: requests.ConnectionError) -> bool:
    """Whether the PACS closed a connection the request was sent on (no answer, no time-out): not a
    refused connection or an unknown host, which a second try would meet again."""
    if isinstance(error, requests.Timeout):
        return False
    stack: list[BaseException] = [error]
    seen: set[int] = set()
    while stack:  # the causes, contexts and wrapped errors (urllib3's ProtocolError holds the cause)
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return True
        stack.extend(x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException))
    return False


def is_dicomweb_url(studies: str) -> bool:
    """Whether a ``--studies`` value names a DICOMweb server rather than a local folder."""
    return str(studies).startswith(("http://", "https://"))


class DicomWebClient:
    """QIDO-RS, WADO-RS and STOW-RS against one DICOMweb root, every call bounded by timeouts.

    Args:
        url: the DICOMweb root, for example ``http://127.0.0.1:8042/dicom-web``.
        connect_timeout: seconds to wait for a connection; an unreachable PACS fails this fast.
        read_timeout: seconds to wait for an answer once connected, retrieving or storing instances.
        query_timeout: the same for queries and metadata (QIDO-RS, small answers), so that a PACS that
            accepts connections but hangs fails listings and ``/info`` in seconds, not a minute.
        session: a ``requests.Session`` (authentication, proxies); a new one by default.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        query_timeout: float = 15.0,
        session: requests.Session | None = None,
    ) -> None:
        if not is_dicomweb_url(url):
            raise ValueError(f"DICOMweb URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self._timeout = (connect_timeout, read_timeout)
        self._query_timeout = (connect_timeout, query_timeout)
        self._session = session or requests.Session()

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        url = f"{self.url}/{path.lstrip('/')}"
        kwargs.setdefault("timeout", self._timeout)
        try:
            try:
                response = self._session.request(method, url, **kwargs)
            except requests.ConnectionError as e:
                if not _closed_under_it(e):
                    raise
                # A PACS closes kept-alive connections it found idle (Orthanc after its KeepAliveTimeout);
                # a request sent on one as it closed gets no answer. Sent again, on a new connection:
                # the reads are safe to repeat, and so is a STOW-RS (an instance stored twice is one).
                logger.info("PACS at %s closed the connection while %s; sent again (%s)", self.url, what, e)
                response = self._session.request(method, url, **kwargs)
        except requests.RequestException as e:
            raise PacsUnavailable(f"PACS at {self.url} did not answer while {what} ({type(e).__name__}: {e})") from e
        if response.status_code >= 500:
            raise PacsUnavailable(
                f"PACS at {self.url} failed while {what}: HTTP {response.status_code} {response.text[:200]}"
            )
        return response

    def _json(self, path: str, what: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        headers = {"Accept": "application/dicom+json"}
        response = self._request("GET", path, what, params=params, headers=headers, timeout=self._query_timeout)
        if response.status_code == 204 or not response.content:
            return []
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return response.json()

    def ping(self, timeout: float = 5.0) -> None:
        """Raise ``PacsUnavailable`` unless a DICOMweb server answers a QIDO-RS query within ``timeout`` s."""
        what = "checking that it answers"
        response = self._request(
            "GET",
            "studies",
            what,
            params={"limit": 1},
            headers={"Accept": "application/dicom+json"},
            timeout=(self._timeout[0], timeout),
        )
        if response.status_code not in (200, 204):
            raise PacsUnavailable(
                f"{self.url} is not a DICOMweb server: QIDO-RS /studies answered HTTP {response.status_code}"
            )

    def search_series(self, filters: dict[str, Any] | None = None) -> list[Dataset]:
        rows = self._json("series", "searching for series", {**(filters or {}), "includefield": "all"})
        return [Dataset.from_json(row) for row in rows]

    def search_instances(self, study_uid: str, series_uid: str) -> list[Dataset]:
        rows = self._json(f"studies/{study_uid}/series/{series_uid}/instances", f"listing series {series_uid}")
        return [Dataset.from_json(row) for row in rows]

    def series_metadata(self, study_uid: str, series_uid: str) -> list[Dataset]:
        rows = self._json(f"studies/{study_uid}/series/{series_uid}/metadata", f"reading metadata of {series_uid}")
        # Bulk data (pixels) is left out of metadata on purpose; its elements stay empty.
        return [Dataset.from_json(row, bulk_data_uri_handler=_no_bulk_data) for row in rows]

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """All instances of a series as pydicom datasets, in the transfer syntax the PACS stored."""
        response = self._request(
            "GET",
            f"studies/{study_uid}/series/{series_uid}",
            f"retrieving series {series_uid}",
            headers={"Accept": STORED_SYNTAX},
        )
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return [pydicom.dcmread(io.BytesIO(part)) for part in _parts(response)]

    def store(self, datasets: Iterable[Dataset]) -> None:
        """STOW-RS the datasets in one request; raise if the PACS refused any of them."""
        boundary = "monailabel-stow-boundary"
        body = io.BytesIO()
        for ds in datasets:
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, write_like_original=False)
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(buffer.getvalue())
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        response = self._request("POST", "studies", "storing a DICOM SEG", data=body.getvalue(), headers=headers)
        if response.status_code >= 400:
            raise PacsUnavailable(f"PACS at {self.url} refused the upload: HTTP {response.status_code} {response.text}")
        answer = Dataset.from_json(response.json()) if response.content else Dataset()
        failed = answer.get("FailedSOPSequence")
        if failed:
            raise PacsUnavailable(f"PACS at {self.url} refused {len(failed)} instance(s) of the upload")


def _no_bulk_data(tag: str, vr: str, uri: str) -> None:
    return None


def _parts(response: requests.Response) -> Iterator[bytes]:
    content_type = response.headers.get("Content-Type", "")
    if not content_type.lower().startswith("multipart/related"):
        # A single instance answered as application/dicom.
        yield response.content
        return
    for part in MultipartDecoder(response.content, content_type).parts:
        yield part.content


class OrthancAdmin:
    """The part of Orthanc's own REST API that DICOMweb lacks: deleting a series.

    Args:
        root: Orthanc's REST root, for example ``http://127.0.0.1:8042``.
        timeout: ``(connect, read)`` seconds.
    """

    def __init__(self, root: str, *, timeout: tuple[float, float] = (3.0, 60.0)) -> None:
        self.root = root.rstrip("/")
        self._timeout = timeout

    @classmethod
    def for_dicomweb(cls, url: str) -> OrthancAdmin | None:
        """Orthanc serves DICOMweb at ``<root>/dicom-web``; any other URL is not taken for Orthanc."""
        url = url.rstrip("/")
        return cls(url[: -len("/dicom-web")]) if url.endswith("/dicom-web") else None

    def delete_series(self, series_uid: str) -> bool:
        """Delete the series with this SeriesInstanceUID; ``False`` if Orthanc does not know it."""
        try:
            found = requests.post(f"{self.root}/tools/lookup", data=series_uid, timeout=self._timeout)
            found.raise_for_status()
            ids = [row["ID"] for row in found.json() if row.get("Type") == "Series"]
            for orthanc_id in ids:
                deleted = requests.delete(f"{self.root}/series/{orthanc_id}", timeout=self._timeout)
                if deleted.status_code != 404:  # 404: deleted by someone else since the lookup
                    deleted.raise_for_status()
        except requests.RequestException as e:
            raise PacsUnavailable(f"Orthanc at {self.root} failed to delete series {series_uid} ({e})") from e
        return bool(ids)
