from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from strategies.reservations import ReservationBook
from strategies.selection import rank, top_k


@pytest.mark.parametrize(
    ("candidates", "scores", "k", "expected"),
    [
        ([], {}, 3, []),
        (["a", "b", "c"], {"a": 0.1, "b": 0.9, "c": 0.5}, 1, ["b"]),
        (["a", "b", "c"], {"a": 0.1, "b": 0.9, "c": 0.5}, 2, ["b", "c"]),
        (["a", "b", "c"], {"a": 0.1, "b": 0.9, "c": 0.5}, 10, ["b", "c", "a"]),
        (["a", "b"], {"a": 0.1, "b": 0.9, "zz": 5.0}, 2, ["b", "a"]),  # scores of non-candidates ignored
    ],
)
def test_top_k(candidates: list, scores: dict, k: int, expected: list) -> None:
    assert top_k(candidates, scores, k, random.Random(0)) == expected


def test_unscored_go_last() -> None:
    order = rank(["new1", "old", "new2"], {"old": 0.01}, random.Random(1))
    assert order[0] == "old" and set(order[1:]) == {"new1", "new2"}


def test_ties_are_broken_at_random_but_reproducibly() -> None:
    candidates = [f"img{i}" for i in range(6)]
    scores = dict.fromkeys(candidates, 0.5)
    firsts = Counter(top_k(candidates, scores, 1, random.Random(seed))[0] for seed in range(200))
    assert len(firsts) == 6, "every tied image must get its turn"
    assert top_k(candidates, scores, 3, random.Random(7)) == top_k(candidates, scores, 3, random.Random(7))


@pytest.mark.parametrize("k", [0, -1])
def test_bad_k(k: int) -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k(["a"], {}, k, random.Random(0))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reservation_window() -> None:
    clock = FakeClock()
    book = ReservationBook(60, clock=clock)
    first = book.pick(["a", "b"], lambda free: free[:1], "alice")
    second = book.pick(["a", "b"], lambda free: free[:1], "bob")
    assert (first, second) == (["a"], ["b"])
    assert book.pick(["a", "b"], lambda free: free[:1], "carol") == []
    assert book.reserved() == {"a": "alice", "b": "bob"}
    clock.now += 60
    assert book.pick(["a", "b"], lambda free: free[:1], "carol") == ["a"]
    book.release("a")
    assert "a" not in book.reserved()


def test_zero_window_reserves_nothing() -> None:
    book = ReservationBook(0)
    assert book.pick(["a"], lambda f: f, "x") == ["a"]
    assert book.pick(["a"], lambda f: f, "y") == ["a"]


def test_negative_window() -> None:
    with pytest.raises(ValueError, match="window_s must be >= 0"):
        ReservationBook(-1)


def test_concurrent_callers_never_share_an_image() -> None:
    book = ReservationBook(600)
    candidates = [f"img{i}" for i in range(40)]
    results: list[list[str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker(n: int) -> None:
        barrier.wait()
        for _ in range(3):
            got = book.pick(candidates, lambda free: free[:1], f"client{n}")
            with lock:
                results.append(got)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handed = [img for r in results for img in r]
    assert len(handed) == 40 and len(set(handed)) == 40
    assert sum(1 for r in results if not r) == 16 * 3 - 40
