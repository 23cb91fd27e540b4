"""A MONAI Label scoring method that refreshes stale uncertainty scores of unlabelled images."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from appcore.errors import root_cause
from strategies.scores import NotForThisModel, Score, ScoreStore

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    """Computes the uncertainty of one image under the currently served model."""

    def version(self) -> str: ...

    def score(self, image_path: str) -> dict[str, Any]: ...


class UncertaintyScoring(ScoringMethod):
    """Scores every unlabelled image whose score is missing or older than the served weights.

    Args:
        description: shown in ``/info``.
        scorer: makes the scorer (lazily: loading weights is an explicit step, not construction).
        store: where scores live.
        key: which of the scorer's measures is the stored ranking value (``"entropy"``); the other
            measures (``bald``, ``tta``, ``embedding``) are stored beside it for other strategies.
        flush_every: scores written to the store at once; a stopped run keeps what it flushed.
    """

    def __init__(
        self, description: str, *, scorer: Callable[[], Scorer], store: ScoreStore, key: str, flush_every: int = 10
    ) -> None:
        super().__init__(description)
        self._make_scorer = scorer
        self.store = store
        self.key = key
        self.flush_every = flush_every

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.perf_counter()
        scorer = self._make_scorer()
        version = scorer.version()
        existing = self.store.load()
        images = sorted(datastore.get_unlabeled_images("final"))
        # an image another model is for stays so until its file changes (``ScoreStore.forget``)
        unlabelled = set(images)
        known_out = {k: v for k, v in self.store.out_of_scope().items() if k in unlabelled}
        stale = [
            i for i in images if i not in known_out and (i not in existing or existing[i].model_version != version)
        ]
        logger.info("Scoring %d of %d unlabelled images with model version %s", len(stale), len(images), version)
        pending: dict[str, Score] = {}
        skipped: dict[str, str] = {}
        out_of_scope: dict[str, str] = {}
        for image in stale:
            begun = time.time()  # before the file is read: a change after it makes this score stale
            try:
                measures = scorer.score(datastore.get_image_uri(image))
            except HTTPException as e:
                if e.status_code >= 500:  # the datastore is unreachable (a PACS gone): every image would fail
                    raise
                skipped[image] = str(e.detail)
            except NotForThisModel as e:
                out_of_scope[image] = str(e)
                logger.info("Scoring leaves %s to another model: %s", image, e)
                continue
            except Exception as e:  # one unreadable or unusual image must not leave the others unscored
                cause = root_cause(e)
                skipped[image] = f"{type(cause).__name__}: {cause}"
            if image in skipped:
                logger.warning("Scoring skips %s: %s", image, skipped[image])
                continue
            value = measures[self.key]
            extra = {k: v for k, v in measures.items() if k != self.key}
            pending[image] = Score(value=value, model_version=version, ts=begun, extra=extra)
            if len(pending) >= self.flush_every:
                self.store.update(pending)
                pending = {}
        if pending:
            self.store.update(pending)
        # Every image that cannot be scored is stale in every run, so this run has seen them all.
        self.store.set_unusable(skipped)
        self.store.set_out_of_scope({**known_out, **out_of_scope})
        seconds = time.perf_counter() - start
        scored = len(stale) - len(skipped)
        return {
            "scored": scored,
            "unchanged": len(images) - len(stale),
            "skipped": skipped,
            "out_of_scope": out_of_scope,
            "model_version": version,
            "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / scored, 3) if scored else None,
        }
