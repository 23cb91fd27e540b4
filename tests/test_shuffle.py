"""The ``--shuffle`` order: a permutation that keeps modules and classes together, replayable by seed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.shuffle import shuffle_items


@dataclass(frozen=True)
class FakeItem:
    nodeid: str
    cls: type | None = None


class A: ...


class B: ...


ITEMS = [
    FakeItem("tests/test_a.py::test_1"),
    FakeItem("tests/test_a.py::A::test_2", A),
    FakeItem("tests/test_a.py::A::test_3", A),
    FakeItem("tests/test_a.py::test_4"),
    FakeItem("tests/test_b.py::B::test_1", B),
    FakeItem("tests/test_b.py::B::test_2", B),
    FakeItem("tests/test_c.py::test_1[x]"),
    FakeItem("tests/test_c.py::test_1[y]"),
]


def contiguous(order: list[FakeItem], key) -> bool:
    seen: list = []
    for item in order:
        k = key(item)
        if seen and seen[-1] == k:
            continue
        if k in seen:
            return False
        seen.append(k)
    return True


@pytest.mark.parametrize("seed", range(20))
def test_a_permutation_with_modules_and_classes_kept_together(seed: int) -> None:
    order = shuffle_items(list(ITEMS), seed)  # type: ignore[arg-type]
    assert sorted(i.nodeid for i in order) == sorted(i.nodeid for i in ITEMS)
    assert contiguous(order, lambda i: i.nodeid.split("::")[0])
    assert contiguous(order, lambda i: (i.nodeid.split("::")[0], i.cls))


def test_the_same_seed_gives_the_same_order_and_seeds_differ() -> None:
    orders = {tuple(i.nodeid for i in shuffle_items(list(ITEMS), s)) for s in range(20)}  # type: ignore[arg-type]
    again = tuple(i.nodeid for i in shuffle_items(list(ITEMS), 3))  # type: ignore[arg-type]
    assert again == tuple(i.nodeid for i in shuffle_items(list(ITEMS), 3))  # type: ignore[arg-type]
    assert len(orders) > 5, "shuffling must change the order"


@pytest.mark.parametrize("seed", range(10))
def test_one_file_run_with_a_suite_s_seed_replays_that_file_s_order(seed: int) -> None:
    def of(order: list[FakeItem], module: str) -> list[str]:
        return [i.nodeid for i in order if i.nodeid.startswith(module)]

    whole = shuffle_items(list(ITEMS), seed)  # type: ignore[arg-type]
    for module in ("tests/test_a.py", "tests/test_b.py", "tests/test_c.py"):
        alone = shuffle_items([i for i in ITEMS if i.nodeid.startswith(module)], seed)  # type: ignore[arg-type]
        assert [i.nodeid for i in alone] == of(whole, module)


def test_a_bad_seed_is_a_usage_error(pytester: pytest.Pytester) -> None:
    hooks = "pytest_addoption, pytest_collection_modifyitems, pytest_report_header"
    pytester.makeconftest(f"from tests.shuffle import {hooks}")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--shuffle", "soon")
    result.stderr.fnmatch_lines(["*--shuffle takes an integer seed, 'random' or 'off', got 'soon'*"])
