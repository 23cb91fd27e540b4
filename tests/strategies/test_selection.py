from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from strategies.reservations import ReservationBook
from strategies.selection import diverse_top_k, rank, top_k


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


def test_reservations_outlive_a_restart(tmp_path: Path) -> None:
    clock, path = FakeClock(), tmp_path / "model" / "reservations.json"
    book = ReservationBook(60, clock=clock, path=path)
    assert book.pick(["a", "b", "c"], lambda free: free[:2], "alice") == ["a", "b"]
    book.release("b")
    clock.now += 30
    restarted = ReservationBook(60, clock=clock, path=path)  # a new server process on the same folder
    assert restarted.reserved() == {"a": "alice"}
    assert restarted.pick(["a", "b", "c"], lambda free: free[:1], "bob") == ["b"]
    clock.now += 31  # alice's hold has ended; bob's has 29 s left
    assert ReservationBook(60, clock=clock, path=path).reserved() == {"b": "bob"}
    assert not [p for p in path.parent.iterdir() if p.name != "reservations.json"], "no temporary file left"


@pytest.mark.parametrize("content", ["{not json", '["a", "b"]', '{"a": 5}'])
def test_a_damaged_reservations_file_is_ignored(tmp_path: Path, content: str, caplog) -> None:
    path = tmp_path / "reservations.json"
    path.write_text(content)
    book = ReservationBook(60, clock=FakeClock(), path=path)
    assert book.reserved() == {} and "cannot be read" in caplog.text
    assert book.pick(["a"], lambda free: free, "alice") == ["a"]


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


# Embeddings for diversity: "a1"/"a2"/"a3" are near-duplicates, "b" and "c" point elsewhere.
EMB = {
    "a1": [1.0, 0.0, 0.0],
    "a2": [0.99, 0.01, 0.0],
    "a3": [0.98, 0.0, 0.02],
    "b": [0.0, 1.0, 0.0],
    "c": [0.0, 0.0, 1.0],
}
UNC = {"a1": 0.9, "a2": 0.89, "a3": 0.88, "b": 0.5, "c": 0.4}


@pytest.mark.parametrize(
    ("candidates", "k", "covered", "expected"),
    [
        # top-k by uncertainty would be a1, a2, a3: diversity takes one of the cluster and moves on
        (list(EMB), 3, (), ["a1", "b", "c"]),
        (list(EMB), 1, (), ["a1"]),
        # the cluster is already represented by a labelled image: start elsewhere
        (["a1", "a2", "b", "c"], 2, ("a3",), ["b", "c"]),
        ([], 2, (), []),
    ],
)
def test_diverse_top_k(candidates: list, k: int, covered: tuple, expected: list) -> None:
    assert diverse_top_k(candidates, UNC, EMB, k, random.Random(0), covered=covered) == expected


def test_diverse_top_k_unscored_last_and_k_honoured() -> None:
    picked = diverse_top_k(["x", "a1", "y", "b"], UNC, EMB, 4, random.Random(0))
    assert picked[:2] == ["a1", "b"] and set(picked[2:]) == {"x", "y"}
    assert len(diverse_top_k(list(EMB), UNC, EMB, 2, random.Random(0))) == 2
    with pytest.raises(ValueError):
        diverse_top_k(list(EMB), UNC, EMB, 0, random.Random(0))


def test_diverse_top_k_prefers_uncertain_when_equally_far() -> None:
    emb = {"p": [1.0, 0.0], "q": [0.0, 1.0], "r": [-1.0, 0.0], "s": [0.0, -1.0]}
    unc = {"p": 0.1, "q": 0.2, "r": 0.9, "s": 0.3}
    assert diverse_top_k(list(emb), unc, emb, 1, random.Random(0)) == ["r"]
