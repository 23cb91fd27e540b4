"""``--shuffle``: run the suite in a random order that keeps each module's and class's tests together.

Tests must pass alone and in any order; CI runs the suite shuffled (``make test`` passes
``--shuffle random``) and the header prints the seed, so a failure is replayed with
``pytest --shuffle <seed>``. Modules, classes within a module and tests within a class are
shuffled, but never interleaved: a module-scoped fixture (a server, a PACS) is still set up once.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import pytest

T = TypeVar("T")


def _seed(config: pytest.Config) -> int | None:
    value = config.getoption("shuffle")
    if value in (None, "off"):
        return None
    if value == "random":
        if not hasattr(config, "_shuffle_seed"):
            config._shuffle_seed = random.SystemRandom().randrange(10**6)  # type: ignore[attr-defined]
        return int(config._shuffle_seed)  # type: ignore[attr-defined]
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"--shuffle takes an integer seed, 'random' or 'off', got {value!r}") from None


def shuffled_groups(items: Sequence[T], key: Callable[[T], Hashable], rng: random.Random) -> list[list[T]]:
    """``items`` grouped by ``key`` (first-seen order), the groups in a random order."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    order = list(groups.values())
    rng.shuffle(order)
    return order


def shuffle_items(items: list[pytest.Item], seed: int) -> list[pytest.Item]:
    """Modules in random order; within each, classes (and free functions) in random order; within those, tests.

    The order inside a module depends on the seed and the module's path only, so running one file
    with the seed of a whole-suite run (``pytest tests/x/test_y.py --shuffle <seed>``) replays that
    file's order as the suite ran it.
    """
    result: list[pytest.Item] = []
    for module in shuffled_groups(items, _module_of, random.Random(seed)):
        rng = random.Random(f"{seed}:{_module_of(module[0])}")
        for group in shuffled_groups(module, lambda item: item.cls, rng):  # type: ignore[attr-defined]
            group = list(group)
            rng.shuffle(group)
            result.extend(group)
    return result


def _module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shuffle",
        default="off",
        help="run modules, classes and tests in a random order: an integer seed, 'random' (a new seed, "
        "printed in the header) or 'off' (default)",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = _seed(config)
    return None if seed is None else f"shuffled order, seed {seed} (replay: pytest --shuffle {seed})"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = _seed(config)
    if seed is not None:
        items[:] = shuffle_items(items, seed)
