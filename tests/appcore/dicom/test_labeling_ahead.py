"""Proposals computed ahead for the OHIF panel, on a real server over a real Orthanc.

A hand-out (``POST /labeling/next``) names the case the strategy would hand the same annotator next
(``ahead``) and computes its proposal once the current case's is done; the next hand-out is that
case, and its proposal is the one computed ahead, of the served version. New weights make the
server compute it again, never answer the old one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from radiology.registry import MODELS
from tests.conftest import requires_shared
from tests.e2e.servers import LoadedPacs, Server, loaded_orthanc, monailabel_server, requires_orthanc

pytestmark = [requires_shared, requires_orthanc, pytest.mark.slow]

CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedPacs]:
    with loaded_orthanc(tmp_path_factory.mktemp("orthanc"), CASES) as loaded:
        yield loaded


@pytest.fixture
def server(pacs: LoadedPacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of each test's own: its proposals, reservations and weights start afresh."""
    conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
    with monailabel_server(tmp_path_factory.mktemp("server"), pacs.orthanc.dicomweb_url, conf) as running:
        yield running


def hand_out(server: Server, client: str) -> dict[str, Any]:
    r = server.http.post("/labeling/next", params={"strategy": "random", "client_id": client})
    assert r.status_code == 200, r.text
    return r.json()


def proposal(server: Server, image: str) -> dict[str, Any]:
    r = server.http.get("/labeling/proposal", params={"image": image})
    assert r.status_code == 200, r.text
    return r.json()


def wait_computed(server: Server, image: str, version: int) -> None:
    """Until the server log says the proposal of ``image`` (``version``) computed ahead is done."""
    deadline = time.monotonic() + 300
    mark = f"Proposal of series {image} (hippocampus v{version}, ahead) computed"
    while mark not in server.log.read_text():
        assert time.monotonic() < deadline, f"no {mark!r} in the server log"
        time.sleep(0.5)


def test_the_next_case_is_the_one_announced_and_its_proposal_was_computed_ahead(server: Server) -> None:
    first = hand_out(server, "ann")
    assert first["ahead"] not in (None, first["image"])
    assert proposal(server, first["image"])["computed_by"] == "hand-out"
    wait_computed(server, first["ahead"], 0)
    second = hand_out(server, "ann")  # the first case still held by ann (not saved): skipped
    assert second["image"] == first["ahead"]
    answer = proposal(server, second["image"])
    assert (answer["computed_by"], answer["version"], answer["source"]) == ("ahead", 0, "model")
    assert answer["timings"]["model's proposal (waited)"] < 1, answer["timings"]
    assert "not computed ahead" not in server.log.read_text()


def test_new_weights_are_never_answered_with_a_proposal_of_the_old_ones(server: Server) -> None:
    first = hand_out(server, "bob")
    wait_computed(server, first["ahead"], 0)
    shipped = MODELS["hippocampus"].shipped_weights_path
    assert shipped is not None
    upload = {"file": ("w.pt", shipped.read_bytes())}
    r = server.http.put("/model/hippocampus", params={"client_id": "admin"}, files=upload)
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    second = hand_out(server, "bob")
    assert second["image"] == first["ahead"]
    answer = proposal(server, second["image"])
    assert answer["version"] == 1 and answer["computed_by"] == "hand-out", answer["computed_by"]


def test_with_proposals_ahead_off_nothing_is_computed_ahead(pacs: LoadedPacs, tmp_path: Path) -> None:
    conf = {"models": "hippocampus", "score_on_start": "false", "proposals_ahead": "false"}
    with monailabel_server(tmp_path, pacs.orthanc.dicomweb_url, conf) as server:
        first = hand_out(server, "cy")
        assert first["ahead"] is None and "timings" in first
        assert proposal(server, first["image"])["computed_by"] == "hand-out"
        second = hand_out(server, "cy")
        assert proposal(server, second["image"])["computed_by"] == "hand-out"
        assert ", ahead)" not in server.log.read_text()
