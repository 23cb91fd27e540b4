"""Pure selection logic: which of the candidate images to hand out, given scores and a random source."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np

# Strategy name -> (stored measure, what it ranks by); ``None`` is the default measure (predictive
# entropy). One scoring pass stores them all. The server and the simulation both read this table.
RANKED_STRATEGIES: dict[str, tuple[str | None, str]] = {
    "epistemic": (None, "MC dropout predictive entropy"),
    "bald": ("bald", "BALD: mutual information between prediction and weights (MC dropout)"),
    "tta": ("tta", "disagreement across test-time augmentations"),
}


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


def keep_expected(
    chosen: list[str], free: Sequence[str], scores: Mapping[str, float], expected: str | None
) -> list[str]:
    """``chosen`` (one pick) as ``[expected]`` when ``expected`` is free and ranks as high as the pick:
    the same score, or both unscored (a random pick either way). A pick announced ahead (its proposal
    computed meanwhile) then stays the pick, and a better-ranked image still goes first."""
    if len(chosen) != 1 or expected is None or expected == chosen[0] or expected not in free:
        return chosen
    return [expected] if scores.get(expected) == scores.get(chosen[0]) else chosen


def top_k(candidates: Sequence[str], scores: Mapping[str, float], k: int, rng: random.Random) -> list[str]:
    """The ``k`` best-ranked candidates (fewer if there are fewer)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return rank(candidates, scores, rng)[:k]


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def diverse_top_k(
    candidates: Sequence[str],
    scores: Mapping[str, float],
    embeddings: Mapping[str, Sequence[float]],
    k: int,
    rng: random.Random,
    covered: Sequence[str] = (),
) -> list[str]:
    """``k`` candidates that are uncertain and unlike each other and unlike ``covered``.

    Greedy uncertainty-weighted coverage: each pick maximises ``score * distance`` where distance is
    the cosine distance, in the centred embedding space, to the nearest image already picked or
    already covered (labelled). With nothing picked or covered yet the first pick is the most
    uncertain image. Candidates without a score or an embedding come after all others, shuffled.

    Args:
        candidates: image ids to choose from.
        scores: uncertainty per image (higher first).
        embeddings: feature vector per image, all of one length.
        k: how many to pick.
        rng: breaks ties.
        covered: images whose embeddings count as already represented (the labelled ones).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    usable = [c for c in candidates if c in scores and c in embeddings]
    rest = [c for c in candidates if c not in set(usable)]
    rng.shuffle(rest)
    if not usable:
        return rest[:k]
    anchors = [c for c in covered if c in embeddings and c not in set(usable)]
    vectors = np.asarray([embeddings[c] for c in usable + anchors], dtype=np.float64)
    vectors = _unit_rows(vectors - vectors.mean(0))
    cand, anchor = vectors[: len(usable)], vectors[len(usable) :]
    u = np.clip(np.asarray([scores[c] for c in usable], dtype=np.float64), 0.0, None) + 1e-12
    tiebreak = np.asarray([rng.random() for _ in usable]) * 1e-9
    # Distance to the nearest represented image; 1.0 (orthogonal) when nothing is represented yet.
    nearest = (1.0 - anchor @ cand.T).min(0) if len(anchor) else np.ones(len(usable))
    nearest = np.clip(nearest, 0.0, None)
    picked: list[int] = []
    for _ in range(min(k, len(usable))):
        gain = u * nearest + tiebreak
        gain[picked] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        nearest = np.minimum(nearest, np.clip(1.0 - cand @ cand[best], 0.0, None))
    return [usable[i] for i in picked] + rest[: k - len(picked)]
