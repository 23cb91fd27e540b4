"""The labeling panel's proposal cache (``appcore.dicom.proposals``): keyed by series, model and served
version, shared, bounded, dropped on new weights."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

import pytest

from appcore.dicom.proposals import ProposalCache


def _answer(value: str) -> dict[str, Any]:
    return {"value": value}


@pytest.fixture
def executor() -> Any:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def test_a_proposal_asked_again_is_the_same_computation(executor: ThreadPoolExecutor) -> None:
    cache = ProposalCache(executor, keep=4)
    calls: list[str] = []
    first, hit = cache.start(("s1", "m", 0), lambda: calls.append("s1") or _answer("s1"))
    again, hit_again = cache.start(("s1", "m", 0), lambda: calls.append("again") or _answer("again"))
    assert (hit, hit_again) == (False, True)
    assert again is first and again.result() == {"value": "s1"} and calls == ["s1"]


def test_new_weights_drop_the_other_versions_of_that_model_only(executor: ThreadPoolExecutor) -> None:
    cache = ProposalCache(executor, keep=8)
    for key in [("s1", "m", 0), ("s2", "m", 0), ("s1", "other", 0)]:
        cache.start(key, lambda key=key: _answer(str(key)))[0].result()
    future, hit = cache.start(("s1", "m", 1), lambda: _answer("v1"))
    assert not hit and future.result() == {"value": "v1"}
    assert set(cache.keys()) == {("s1", "other", 0), ("s1", "m", 1)}
    _, hit = cache.start(("s2", "m", 1), lambda: _answer("s2 v1"))
    assert not hit, "the old version's proposal is never answered for the new one"


def test_a_waiting_proposal_of_old_weights_is_cancelled() -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        cache = ProposalCache(pool, keep=8)
        gate = threading.Event()
        cache.start(("busy", "m", 0), lambda: gate.wait(30) and _answer("busy"))
        queued, _ = cache.start(("s1", "m", 0), lambda: _answer("old"))
        cache.start(("s1", "m", 1), lambda: _answer("new"))
        gate.set()
        with pytest.raises(CancelledError):
            queued.result()


def test_the_oldest_proposal_is_dropped_beyond_the_bound(executor: ThreadPoolExecutor) -> None:
    cache = ProposalCache(executor, keep=2)
    for image in ["s1", "s2"]:
        cache.start((image, "m", 0), lambda image=image: _answer(image))[0].result()
    cache.start(("s1", "m", 0), lambda: _answer("again"))  # used again: now the newest
    cache.start(("s3", "m", 0), lambda: _answer("s3"))[0].result()
    assert cache.keys() == [("s1", "m", 0), ("s3", "m", 0)]


def test_a_failed_proposal_is_computed_again(executor: ThreadPoolExecutor) -> None:
    cache = ProposalCache(executor, keep=2)

    def fail() -> dict[str, Any]:
        raise RuntimeError("the PACS went away")

    failed, _ = cache.start(("s1", "m", 0), fail)
    with pytest.raises(RuntimeError, match="the PACS went away"):
        failed.result()
    again, hit = cache.start(("s1", "m", 0), lambda: _answer("s1"))
    assert not hit and again.result() == {"value": "s1"}


def test_keep_must_be_positive(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        ProposalCache(executor, keep=0)
