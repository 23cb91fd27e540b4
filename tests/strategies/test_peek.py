"""A strategy's next pick announced ahead (``RankedStrategy.peek``): the OHIF panel computes its proposal
meanwhile, and the next hand-out keeps it while it is free and ranks first."""

from __future__ import annotations

import random

import pytest

from strategies.ranked import RankedStrategy
from strategies.reservations import ReservationBook
from strategies.selection import keep_expected
from tests.strategies.test_strategies import SCORES, FakeDatastore


def _strategy(scores: dict | None, window: float = 600, seed: int = 0) -> RankedStrategy:
    return RankedStrategy(
        "test", book=ReservationBook(window), scores=(lambda: scores) if scores else None, rng=random.Random(seed)
    )


@pytest.mark.parametrize(
    ("chosen", "free", "scores", "expected", "kept"),
    [
        (["a"], ["a", "b"], {}, "b", ["b"]),  # both unscored: a random pick either way
        (["a"], ["a", "b"], {"a": 0.5, "b": 0.5}, "b", ["b"]),  # a tie
        (["a"], ["a", "b"], {"a": 0.9, "b": 0.5}, "b", ["a"]),  # a better-ranked image goes first
        (["a"], ["a", "b"], {"a": 0.9}, "b", ["a"]),  # a scored image before an unscored one
        (["a"], ["a"], {}, "b", ["a"]),  # taken or labelled meanwhile: not free
        (["a"], ["a", "b"], {}, None, ["a"]),  # nothing announced
        (["a", "c"], ["a", "b", "c"], {}, "b", ["a", "c"]),  # a batch is left as chosen
        ([], [], {}, "b", []),
    ],
    ids=["unscored", "tie", "better first", "scored first", "not free", "none", "batch", "empty"],
)
def test_keep_expected(
    chosen: list[str], free: list[str], scores: dict[str, float], expected: str | None, kept: list[str]
) -> None:
    assert keep_expected(chosen, free, scores, expected) == kept


@pytest.mark.parametrize("scores", [None, SCORES], ids=["random", "ranked"])
@pytest.mark.parametrize("seed", range(5))
def test_the_next_hand_out_is_the_pick_announced_and_peek_reserves_nothing(scores: dict | None, seed: int) -> None:
    ds = FakeDatastore(list("abcdefgh"), labelled=set())
    strategy = _strategy(scores, seed=seed)
    first = strategy({"client_id": "u1"}, ds)["id"]
    ahead = strategy.peek({"client_id": "u1"}, ds, exclude={first})
    assert ahead not in (None, first)
    assert set(strategy._book.reserved()) == {first}, "peek holds nothing"
    ds.labelled.add(first)  # the first case saved
    assert strategy({"client_id": "u1"}, ds)["id"] == ahead


def test_an_announced_pick_taken_by_another_annotator_is_not_handed_out_twice() -> None:
    ds = FakeDatastore(list("ab"), labelled=set())
    strategy = _strategy(None)
    ahead = strategy.peek({"client_id": "u1"}, ds)
    other = strategy.peek({"client_id": "u2"}, ds)
    assert strategy({"client_id": "u2"}, ds)["id"] == other
    if other == ahead:  # u2 got what u1 was told: u1 gets the other image
        assert strategy({"client_id": "u1"}, ds)["id"] != ahead


def test_a_better_ranked_image_since_the_announcement_goes_first() -> None:
    scores = dict(SCORES)
    ds = FakeDatastore(list("abcde"), labelled=set())
    strategy = _strategy(scores)
    assert strategy.peek({"client_id": "u1"}, ds, exclude={"a"}) == "b"
    scores["e"] = 2.0  # rescored with new weights
    assert strategy({"client_id": "u1"}, ds)["id"] == "e"


def test_peek_skips_images_held_by_anyone_and_answers_none_when_nothing_is_left() -> None:
    ds = FakeDatastore(list("abc"), labelled=set())
    strategy = _strategy(SCORES)
    assert strategy({"client_id": "u2"}, ds)["id"] == "a"
    assert strategy.peek({"client_id": "u1"}, ds, exclude={"b"}) == "c"
    assert strategy.peek({"client_id": "u1"}, ds, exclude={"b", "c"}) is None
