"""MONAI Label strategies as thin adapters over the pure selection logic (``strategies.selection``)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from appcore.errors import bad_request
from appcore.identity import ANONYMOUS, user
from strategies.reservations import ReservationBook
from strategies.scores import ScoreStore
from strategies.selection import RANKED_STRATEGIES, diverse_top_k, keep_expected, top_k

logger = logging.getLogger(__name__)

# Announced picks kept (one per client, the oldest client dropped first).
_EXPECTED_CLIENTS = 1024

ScoreSource = Callable[[], Mapping[str, float]]
EmbeddingSource = Callable[[], Mapping[str, Sequence[float]]]


def request_k(request: Mapping[str, Any], default: int, book: ReservationBook | None = None) -> int:
    """The request's ``k`` (``default`` when it gives none); a 400 for anything but a positive
    integer, or for more than ``book`` lets one request hold (its ``max_pick``)."""
    raw = request.get("k", default)
    try:
        k = int(raw)  # a number, or a string of digits as a form field sends it
        integral = not isinstance(raw, bool) and (not isinstance(raw, float) or raw == k)
    except (TypeError, ValueError, OverflowError):
        integral = False
    if not integral or k < 1:
        raise bad_request(f"'k' must be a positive integer, got {raw!r}")
    if book is not None and book.window_s > 0 and book.max_pick is not None and k > book.max_pick:
        raise bad_request(
            f"'k' is {k}: one request is handed at most {book.max_pick} (--conf max_k), since each is "
            f"then held for this client for {book.window_s:g} s (--conf reservation_s)"
        )
    return k


def holder(request: Mapping[str, Any]) -> str:
    """Who a request's picks are reserved for: the authenticated user; with authentication off
    (every request anonymous) the request's ``client_id``, else ``anonymous``. A realm user named
    ``anonymous`` is a signed-in user like any other: told apart from ``ANONYMOUS`` by identity."""
    caller = user()
    if caller is not ANONYMOUS:
        return caller.name
    return str(request.get("client_id") or ANONYMOUS.name)


class RankedStrategy(Strategy):
    """Hands out the ``k`` most uncertain unlabelled images that nobody holds, and reserves them.

    The answer's ``id`` is the first pick (what MONAI Label clients open); ``ids`` has all ``k``.
    Images with a ``final`` label are never candidates. Without scores (``scores=None``) the
    order is random, which makes this the ``random`` strategy.

    Args:
        description: shown in ``/info``.
        book: reservations shared by every strategy of the app.
        scores: returns the current ``{image_id: score}``; higher is picked first.
        rng: random source for ties and unscored images.
        default_k: batch size when a request gives no ``k``.
        unusable: returns the images scoring found unusable (unreadable, not a volume, constant),
            which are never handed out.
    """

    def __init__(
        self,
        description: str,
        *,
        book: ReservationBook,
        scores: ScoreSource | None = None,
        rng: random.Random | None = None,
        default_k: int = 1,
        unusable: Callable[[], Collection[str]] | None = None,
    ) -> None:
        super().__init__(description)
        self._book = book
        self._scores = scores
        self._rng = rng or random.Random()
        self._default_k = default_k
        self._unusable = unusable
        self._expected: dict[str, str] = {}  # client -> the pick ``peek`` announced to it
        self._expected_lock = threading.Lock()

    @property
    def ranks_by_score(self) -> bool:
        """Whether stored scores order the picks (every strategy but ``random``)."""
        return self._scores is not None

    def _candidates(self, datastore: Datastore) -> list[str]:
        candidates = sorted(datastore.get_unlabeled_images("final"))
        if self._unusable is not None:
            unusable = set(self._unusable())
            candidates = [c for c in candidates if c not in unusable]
        return candidates

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        k = request_k(request, self._default_k, self._book)
        client = holder(request)
        candidates = self._candidates(datastore)
        scores = dict(self._scores()) if self._scores else {}
        with self._expected_lock:
            expected = self._expected.pop(client, None)

        def choose(free: list[str]) -> list[str]:
            return keep_expected(self.choose(free, scores, k, datastore), free, scores, expected)

        chosen = self._book.pick(candidates, choose, client)
        if not chosen:
            logger.info("No unlabelled image is free (%d candidates, all reserved or none)", len(candidates))
            return None
        return {"id": chosen[0], "ids": chosen, "scores": {c: scores.get(c) for c in chosen}}

    def choose(self, free: list[str], scores: Mapping[str, float], k: int, datastore: Datastore) -> list[str]:
        """The ``k`` images to hand out among the ``free`` ones (called under the reservation lock)."""
        return top_k(free, scores, k, self._rng)

    def peek(self, request: Mapping[str, Any], datastore: Datastore, exclude: Collection[str] = ()) -> str | None:
        """The image the next hand-out to the request's client (``holder``) would be, reserving nothing:
        one nobody holds, not in ``exclude`` (the case just handed out). That hand-out keeps it if it is
        still free and still ranks first (``keep_expected``), so that its proposal can be computed
        meanwhile; another annotator may take it first, and a better-ranked image still goes first."""
        client = holder(request)
        held = set(self._book.reserved())
        free = [c for c in self._candidates(datastore) if c not in held and c not in exclude]
        if not free:
            return None
        scores = dict(self._scores()) if self._scores else {}
        pick = self.choose(free, scores, 1, datastore)[0]
        with self._expected_lock:
            self._expected.pop(client, None)
            self._expected[client] = pick
            while len(self._expected) > _EXPECTED_CLIENTS:
                self._expected.pop(next(iter(self._expected)))
        return pick


class DiverseStrategy(RankedStrategy):
    """A batch of ``k`` images that are uncertain and unlike each other and the labelled images.

    Uses the feature embeddings stored by scoring (``strategies.selection.diverse_top_k``); with
    ``k`` 1 and nothing labelled yet it picks the most uncertain image, like ``epistemic``. Images
    other annotators hold count as covered too, so concurrent annotators get unlike images.

    Args:
        embeddings: returns ``{image_id: vector}`` for scored images.
        Others as for ``RankedStrategy``.
    """

    def __init__(self, description: str, *, embeddings: EmbeddingSource, **kwargs: Any) -> None:
        super().__init__(description, **kwargs)
        self._embeddings = embeddings

    def choose(self, free: list[str], scores: Mapping[str, float], k: int, datastore: Datastore) -> list[str]:
        held = set(datastore.get_unlabeled_images("final")) - set(free)
        covered = [*datastore.get_labeled_images("final"), *sorted(held)]
        return diverse_top_k(free, scores, self._embeddings(), k, self._rng, covered=covered)


def ranked_strategies(book: ReservationBook, store: ScoreStore, *, items: str, under: str) -> dict[str, Strategy]:
    """``random``, the score-ranked strategies of ``RANKED_STRATEGIES`` and ``diversity`` over the
    scores in ``store``, all holding their picks in ``book``: what both apps serve.

    Args:
        items: what is handed out, in the plural ("images", "tiles"), for the descriptions.
        under: the network the scores come from, for the descriptions ("'hippocampus'").
    """
    strategies: dict[str, Strategy] = {
        "random": RankedStrategy(
            f"Random unlabelled {items[:-1]}, never one another annotator holds", book=book, unusable=store.unusable
        )
    }
    for name, (key, what) in RANKED_STRATEGIES.items():
        strategies[name] = RankedStrategy(
            f"Most uncertain unlabelled {items} under {under} ({what})",
            book=book,
            scores=lambda key=key: store.measure(key),
            unusable=store.unusable,
        )
    strategies["diversity"] = DiverseStrategy(
        f"A batch of k uncertain {items} unlike each other and the labelled ones under {under} "
        "(uncertainty x distance in the network's feature space)",
        book=book,
        scores=lambda: store.measure(None),
        embeddings=store.embeddings,
        unusable=store.unusable,
    )
    return strategies
