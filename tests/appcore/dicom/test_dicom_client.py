"""``appcore.dicom.client.DicomWebClient`` against stand-in PACS sockets: which failures it sends a
request again for (a kept-alive connection the PACS closed under it) and which it does not (a refused
connection, a PACS that does not answer in time), so a live PACS never gives a 503 by chance and a
dead or hung one still fails at once."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from appcore.dicom.client import DicomWebClient, PacsUnavailable
from tests.servers import free_port

EMPTY = b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 2\r\n\r\n[]"


class CountingSession(requests.Session):
    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.sent += 1
        return super().request(*args, **kwargs)


def _read_request(conn: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    return True


@contextmanager
def stand_in(answers_per_connection: int | None, answer: bool = True) -> Iterator[str]:
    """A PACS on a free port: each connection gets ``answers_per_connection`` answers, then is closed
    as its next request arrives (None: never closed); ``answer=False``: requests are read, never answered."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        served = 0
        with conn:
            while not stop.is_set() and _read_request(conn):
                if not answer:
                    held.append(conn)
                    stop.wait()
                    return
                if answers_per_connection is not None and served >= answers_per_connection:
                    return  # closed without an answer, as an idle connection is closed
                conn.sendall(EMPTY)
                served += 1

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/dicom-web"
    finally:
        stop.set()
        thread.join()
        server.close()


def test_a_kept_alive_connection_the_pacs_closed_is_not_a_503() -> None:
    session = CountingSession()
    with stand_in(answers_per_connection=1) as url:
        client = DicomWebClient(url, session=session)
        assert client.search_series() == []
        assert client.search_series() == [], "the second search went out on the connection the PACS closed"
    assert session.sent == 3, "sent once more, on a new connection"


def test_a_pacs_that_keeps_closing_is_a_503_after_one_more_try() -> None:
    session = CountingSession()
    with (
        stand_in(answers_per_connection=0) as url,
        pytest.raises(PacsUnavailable, match=r"did not answer while searching for series") as e,
    ):
        DicomWebClient(url, session=session).search_series()
    assert e.value.status_code == 503 and session.sent == 2


def test_a_refused_connection_is_not_tried_again() -> None:
    session = CountingSession()
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsUnavailable, match=r"did not answer while searching for series .*ConnectionError"):
        DicomWebClient(url, session=session).search_series()
    assert session.sent == 1


def test_a_pacs_that_does_not_answer_in_time_is_not_tried_again() -> None:
    session = CountingSession()
    with stand_in(answers_per_connection=None, answer=False) as url:
        client = DicomWebClient(url, query_timeout=0.5, session=session)
        with pytest.raises(PacsUnavailable, match=r"did not answer while searching for series .*ReadTimeout"):
            client.search_series()
    assert session.sent == 1
