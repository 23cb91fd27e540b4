"""Keeping image scores current in the background: the part of an app's next sample both apps share."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from appcore import seam
from strategies.scores import ScoreStore

logger = logging.getLogger(__name__)


class BackgroundScoring:
    """App mixin: a next-sample request of a strategy that ranks by score, finding unlabelled images
    without a score (``unscored_images``), starts one scoring run (``SCORING_METHOD``) in the
    background unless one or a training runs (``--conf score_new_images``); until then those images
    are ranked after the scored ones. The app gives ``score_store()`` and ``settings``.
    """

    SCORING_METHOD = "epistemic"
    # Least seconds between two scoring runs started for new images: one run is enough for a burst
    # of requests, and a run that fails (a PACS gone) is not restarted by every request.
    NEW_IMAGES_SCORING_INTERVAL_S = 30.0

    settings: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._new_images_lock = threading.Lock()
        self._new_images_scored_at = -float("inf")
        super().__init__(*args, **kwargs)

    def score_store(self) -> ScoreStore:
        raise NotImplementedError

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        answer = super().next_sample(request)  # type: ignore[misc]
        ranked = getattr(seam.strategies(self).get(request.get("strategy")), "ranks_by_score", False)
        if ranked and self.settings.score_new_images and seam.scoring_methods(self) and self.unscored_images():
            self._start_scoring_unless_busy()
        return answer

    def unscored_images(self) -> list[str]:
        """Unlabelled images with no stored score that the last scoring run did not find unusable or
        left to another model: the ones added since (ranked after every scored image until they are scored)."""
        store = self.score_store()
        known = set(store.load()) | set(store.unusable()) | set(store.out_of_scope())
        return [i for i in self.datastore().get_unlabeled_images("final") if i not in known]  # type: ignore[attr-defined]

    def _start_scoring_unless_busy(self) -> None:
        """A scoring run in the background, unless one or a training (which rescores at its end) runs."""
        from monailabel.utils.async_tasks.utils import processes

        with self._new_images_lock:
            now = time.monotonic()
            if (
                processes("scoring")
                or processes("train")
                or now < self._new_images_scored_at + self.NEW_IMAGES_SCORING_INTERVAL_S
            ):
                return
            self._new_images_scored_at = now
        logger.info("Unlabelled images without a score: starting a scoring run")
        threading.Thread(
            target=self.async_scoring,  # type: ignore[attr-defined]
            args=(self.SCORING_METHOD,),
            name="score-new-images",
            daemon=True,
        ).start()
