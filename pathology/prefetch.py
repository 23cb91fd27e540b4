"""Measuring the patches of every slide in the background, so that a next-patch request only ranks.

The radiology app scores images in a separate process after each training run; patch measures live
in the strategies' memory, so here one thread of the server process does the same: at start-up, for
each image added since, and for every image again once new weights are served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch
from monailabel.interfaces.datastore import Datastore

from pathology.activelearning import WSIUncertain, file_version
from pathology.wsi import SlideSource, open_source

logger = logging.getLogger(__name__)


class PatchPrefetcher:
    """Keeps the measures of the patches of every image current under the served weights.

    Each round takes the images (unlabelled ones first) whose file has not been measured under the
    network served now, and has every strategy measure its candidate patches of the ``patch`` grid
    (QuPath's default patch size). A request arriving meanwhile on the slide being measured waits for
    that slide, then ranks its measures.

    Args:
        strategies: the app's measuring strategies.
        datastore: returns the app's datastore.
        network: returns the served network (``None`` while untrained); a new object means new weights.
        patch: patch size measured, ``(width, height)``.
        poll_s: seconds between two looks for new weights or new images.
    """

    def __init__(
        self,
        strategies: Sequence[WSIUncertain],
        datastore: Callable[[], Datastore],
        network: Callable[[], torch.nn.Module | None],
        *,
        patch: tuple[int, int] = (1024, 1024),
        poll_s: float = 10.0,
    ) -> None:
        self._strategies = list(strategies)
        self._datastore, self._network = datastore, network
        self._patch, self._poll_s = patch, poll_s
        self._done: set[str] = set()  # image file versions measured under _measured_with
        self._measured_with: torch.nn.Module | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pending(self) -> list[str]:
        """Images whose current file has not been measured under the served network, unlabelled first."""
        return [image for image, _ in self._pending()]

    def _pending(self) -> list[tuple[str, str]]:
        """``pending`` with each image's file version, looked up once per round."""
        network = self._network()
        if network is None:
            return []
        if network is not self._measured_with:
            if self._measured_with is not None:
                logger.info("Patch measures: new weights served, measuring every image again")
            self._measured_with, self._done = network, set()
        versions = ((image, self._version(image)) for image in self._images())
        return [(image, version) for image, version in versions if version not in self._done]

    def run_once(self) -> int:
        """Measures every pending image; the number of candidate patches, summed over strategies."""
        measured = 0
        for image, version in self._pending():
            if self._stop.is_set():
                break
            try:
                measured += self._measure(image, version)
            except Exception as e:  # noqa: BLE001 - an unreadable slide is left to requests to report
                logger.warning("Patch measures: skipping %s: %s", image, e)
            self._done.add(version)  # measured or not, not tried again until the file or weights change
        if measured:
            # A patch that strategies share (one PatchMeasures store) is counted once per strategy.
            logger.info(
                "Patch measures: %d patches measured in the background (counted once per strategy, %d strategies)",
                measured,
                len(self._strategies),
            )
        return measured

    def _measure(self, image: str, version: str) -> int:
        source = open_source(self._datastore().get_image_uri(image))
        try:
            return sum(strategy.prefetch(source, image, version, self._patch) for strategy in self._strategies)
        finally:
            if isinstance(source, SlideSource):
                source.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="patch-measures", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the thread outlives one failed round
                logger.exception("Patch measures: a round failed")
            if self._stop.wait(self._poll_s):
                return

    def _images(self) -> list[str]:
        store = self._datastore()
        unlabelled = set(store.get_unlabeled_images("final"))
        return sorted(store.list_images(), key=lambda i: (i not in unlabelled, i))

    def _version(self, image: str) -> str:
        try:
            return file_version(self._datastore().get_image_uri(image))
        except OSError:
            return f"{image}:gone"
