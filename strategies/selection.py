"""Pure selection logic: which of the candidate images to hand out, given scores and a random source."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence


def rank(candidates: Sequence[str], scores: Mapping[str, float], rng: random.Random) -> list[str]:
    """Candidates by descending score, ties in random order; unscored ones last, shuffled.

    Unscored images (new since the last scoring run) go last rather than first: a scored image is
    known to be uncertain, an unscored one is not known to be anything.
    """
    scored = [c for c in candidates if c in scores]
    unscored = [c for c in candidates if c not in scores]
    tiebreak = {c: rng.random() for c in scored}
    scored.sort(key=lambda c: (-scores[c], tiebreak[c]))
    rng.shuffle(unscored)
    return scored + unscored


def top_k(candidates: Sequence[str], scores: Mapping[str, float], k: int, rng: random.Random) -> list[str]:
    """The ``k`` best-ranked candidates (fewer if there are fewer)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return rank(candidates, scores, rng)[:k]
