from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from appcore.errors import RequestError
from strategies.ranked import RankedStrategy
from strategies.reservations import ReservationBook
from strategies.scores import Score, ScoreStore
from strategies.scoring import UncertaintyScoring


class FakeDatastore:
    def __init__(self, images: list[str], labelled: set[str]) -> None:
        self.images, self.labelled = images, labelled

    def get_unlabeled_images(self, tag: str = "final") -> list[str]:
        assert tag == "final"
        return [i for i in self.images if i not in self.labelled]

    def get_image_uri(self, image_id: str) -> str:
        return f"/data/{image_id}.nii.gz"


SCORES = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1, "e": 0.05}


def _strategy(scores: dict | None = SCORES, window: float = 600) -> RankedStrategy:
    return RankedStrategy(
        "test", book=ReservationBook(window), scores=(lambda: scores) if scores else None, rng=random.Random(0)
    )


def test_skips_labelled_and_honours_k() -> None:
    ds = FakeDatastore(list("abcde"), labelled={"a"})
    result = _strategy()({"k": 2, "client_id": "u1"}, ds)
    assert result["id"] == "b" and result["ids"] == ["b", "c"]
    assert result["scores"] == {"b": 0.8, "c": 0.7}


def test_reserved_images_are_skipped_until_the_window_ends() -> None:
    ds = FakeDatastore(list("abcde"), labelled=set())
    strategy = _strategy()
    assert strategy({"client_id": "u1"}, ds)["id"] == "a"
    assert strategy({"client_id": "u2"}, ds)["id"] == "b"
    assert strategy({"client_id": "u1"}, ds)["id"] == "c", "the same client is not handed its image twice either"


def test_empty_and_exhausted() -> None:
    assert _strategy()({}, FakeDatastore([], set())) is None
    ds = FakeDatastore(["a"], set())
    strategy = _strategy()
    assert strategy({}, ds)["id"] == "a"
    assert strategy({}, ds) is None


@pytest.mark.parametrize("k", ["x", 0, -2])
def test_bad_k_is_a_400(k: object) -> None:
    with pytest.raises(RequestError, match="'k' must be a positive integer") as e:
        _strategy()({"k": k}, FakeDatastore(["a"], set()))
    assert e.value.status_code == 400


@pytest.mark.parametrize("scores", [SCORES, None])
def test_concurrent_requests_get_distinct_images(scores: dict | None) -> None:
    ds = FakeDatastore([f"i{n}" for n in range(30)] + list("abcde"), set())
    strategy = _strategy(scores)
    got: list[str] = []
    barrier = threading.Barrier(12)

    def ask(n: int) -> None:
        barrier.wait()
        result = strategy({"client_id": f"c{n}", "k": 2}, ds)
        got.extend(result["ids"])

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 24 and len(set(got)) == 24
    if scores:
        assert set("abcde") <= set(got), "the most uncertain images go out first"


class CountingScorer:
    def __init__(self, version: str) -> None:
        self._version = version
        self.calls: list[str] = []

    def version(self) -> str:
        return self._version

    def score(self, image_path: str) -> dict[str, float]:
        self.calls.append(image_path)
        return {"entropy": len(image_path) / 100, "bald": 0.01}


def test_scoring_only_rescores_stale_images(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "scores.json")
    ds = FakeDatastore(["a", "b", "c"], labelled={"c"})
    scorer = CountingScorer("v1")
    method = UncertaintyScoring("t", scorer=lambda: scorer, store=store, key="entropy")

    first = method({}, ds)
    assert first["scored"] == 2 and sorted(scorer.calls) == ["/data/a.nii.gz", "/data/b.nii.gz"]
    assert store.load()["a"].extra == {"bald": 0.01}

    scorer.calls.clear()
    assert method({}, ds)["scored"] == 0 and scorer.calls == []

    ds.images.append("d")
    assert method({}, ds)["scored"] == 1 and scorer.calls == ["/data/d.nii.gz"]

    scorer._version = "v2"  # new weights published: everything is stale
    scorer.calls.clear()
    assert method({}, ds)["scored"] == 3


def test_score_store_roundtrip_and_filter(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "sub" / "s.json")
    assert store.load() == {}
    store.update({"a": Score(0.5, "v1", 1.0, {}), "b": Score(0.7, "v2", 2.0, {"bald": 0.1})})
    assert store.values() == {"a": 0.5, "b": 0.7}
    assert store.values("v2") == {"b": 0.7}
    assert not list((tmp_path / "sub").glob("*.tmp")), "no temporary file is left behind"
