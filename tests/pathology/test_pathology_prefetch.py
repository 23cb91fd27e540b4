"""Background patch measures: after a round, a next-patch request on any slide makes no network pass."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathology.activelearning import MAX_CANDIDATES, PatchMeasures, WSIDiverse, WSIUncertain, file_version
from pathology.datastore import PathologyDatastore
from pathology.prefetch import PatchPrefetcher
from pathology.spec import NUCLEI
from pathology.wsi import open_source
from strategies.patches import patch_grid
from strategies.reservations import ReservationBook
from tests.stand_ins import weights_version


@pytest.fixture
def store(tmp_path: Path) -> PathologyDatastore:
    studies = tmp_path / "studies"
    studies.mkdir()
    for name, colour in (("a", (120, 60, 150)), ("b", (150, 80, 160))):
        Image.fromarray(np.full((300, 200, 3), colour, np.uint8)).save(studies / f"{name}.png")
    return PathologyDatastore(str(studies))


def _app_parts(store: PathologyDatastore, served: list, patch: tuple[int, int] = (100, 150)):
    """The app's four measuring strategies (``PathologyApp.init_strategies``) and their prefetcher."""
    book = ReservationBook(600)
    network = lambda: served[0]  # noqa: E731 - as the app passes the infer's loader
    entropy = PatchMeasures(NUCLEI)
    strategies = [
        WSIUncertain(NUCLEI, network, random.Random(0), book, shared=entropy),
        WSIUncertain(NUCLEI, network, random.Random(0), book, measure="bald"),
        WSIUncertain(NUCLEI, network, random.Random(0), book, measure="tta"),
        WSIDiverse(NUCLEI, network, random.Random(0), book, shared=entropy),
    ]
    return strategies, PatchPrefetcher(strategies, lambda: store, network, patch=patch, poll_s=0.05)


@pytest.mark.parametrize(("shared", "passes"), [(True, 8), (False, 16)])
def test_strategies_sharing_the_entropy_measures_run_its_pass_once(
    store: PathologyDatastore, shared: bool, passes: int
) -> None:
    served = [weights_version()]
    network = lambda: served[0]  # noqa: E731
    entropy = PatchMeasures(NUCLEI) if shared else None
    both = [
        WSIUncertain(NUCLEI, network, random.Random(0), shared=entropy),
        WSIDiverse(NUCLEI, network, random.Random(0), shared=entropy),
    ]
    PatchPrefetcher(both, lambda: store, network, patch=(100, 150)).run_once()
    assert served[0].passes == passes, "2 images x 4 patches, one probe window each, per entropy store"
    for strategy in both:
        assert strategy({"image": "a", "patch_size": [100, 150]}, store) is not None
    assert served[0].passes == passes, "and both answer from the stored measures"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: WSIUncertain(NUCLEI, lambda: None, shared=PatchMeasures(NUCLEI), measure="bald"), "one or the other"),
        (lambda: WSIUncertain(NUCLEI, lambda: None, shared=PatchMeasures(NUCLEI), dropout=0.1), "one or the other"),
        (lambda: WSIDiverse(NUCLEI, lambda: None, shared=PatchMeasures(NUCLEI, measure="tta")), "ranks by the entropy"),
        (lambda: WSIDiverse(NUCLEI, lambda: None, measure="bald"), "ranks by the entropy pass"),
        (lambda: WSIUncertain(NUCLEI, lambda: None, measure="variance"), r"measure must be one of \['bald', 'entropy'"),
        (lambda: PatchMeasures(NUCLEI, measure="bald", dropout=1.0), r"dropout must be in \(0, 1\), got 1.0"),
    ],
)
def test_measure_settings_that_cannot_work_are_refused(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_after_a_round_every_strategy_answers_every_slide_without_a_network_pass(store: PathologyDatastore) -> None:
    served = [weights_version()]
    strategies, prefetcher = _app_parts(store, served)
    assert prefetcher.pending() == ["a", "b"]
    assert prefetcher.run_once() == 4 * 2 * 4, "4 strategies x 2 images x 4 patches of the 2 x 2 grid"
    assert prefetcher.pending() == []
    passes = served[0].passes
    for strategy in strategies:
        for image in ("a", "b"):
            answer = strategy({"image": image, "patch_size": [100, 150], "client_id": f"{image}{id(strategy)}"}, store)
            assert answer is not None and answer["bbox"][2:] == [100, 150]
    assert served[0].passes == passes, "the requests only ranked stored measures"
    assert prefetcher.run_once() == 0, "nothing new: nothing measured again"


def test_new_weights_or_a_replaced_file_are_measured_again(store: PathologyDatastore) -> None:
    served = [weights_version()]
    _, prefetcher = _app_parts(store, served)
    prefetcher.run_once()
    path = Path(store.get_image_uri("b"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert prefetcher.pending() == ["b"]
    prefetcher.run_once()
    served[0] = weights_version()  # a training run published new weights
    assert prefetcher.pending() == ["a", "b"]
    assert prefetcher.run_once() > 0 and served[0].passes > 0


def test_an_untrained_model_or_an_unreadable_image_is_no_failure(store: PathologyDatastore) -> None:
    served: list = [None]
    _, prefetcher = _app_parts(store, served)
    assert prefetcher.pending() == [] and prefetcher.run_once() == 0
    Path(store.get_image_uri("a")).write_bytes(b"not a PNG")
    served[0] = weights_version()
    assert prefetcher.run_once() == 4 * 4, "b measured, a skipped (its request will say why)"
    assert prefetcher.pending() == []


def test_a_large_slide_serves_measured_patches_first_and_fresh_ones_once_those_are_held(
    store: PathologyDatastore,
) -> None:
    served = [weights_version()]
    patch = (10, 10)  # 20 x 30 = 600 patches on a 200 x 300 image: more than MAX_CANDIDATES
    strategies, prefetcher = _app_parts(store, served, patch)
    uncertain = strategies[0]
    prefetcher.run_once()
    passes = served[0].passes
    ask = {"image": "a", "patch_size": list(patch), "k": MAX_CANDIDATES}
    first = uncertain({**ask, "client_id": "one"}, store)
    assert len(first["bboxes"]) == MAX_CANDIDATES and served[0].passes == passes, "all measured in the background"
    second = uncertain({**ask, "client_id": "two"}, store)
    assert len(second["bboxes"]) == MAX_CANDIDATES, "the measured patches are held: fresh ones are measured"
    assert not {tuple(b) for b in first["bboxes"]} & {tuple(b) for b in second["bboxes"]}
    assert served[0].passes > passes


def test_the_thread_measures_in_the_background_and_stops(store: PathologyDatastore) -> None:
    served = [weights_version()]
    _, prefetcher = _app_parts(store, served)
    prefetcher.start()
    try:
        deadline = time.monotonic() + 30
        while prefetcher.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefetcher.pending() == []
        served[0] = weights_version()
        while served[0].passes == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served[0].passes > 0, "new weights measured without being asked"
    finally:
        prefetcher.stop()


def test_on_a_large_slide_a_held_patch_outside_the_candidates_still_counts_as_covered(
    store: PathologyDatastore,
) -> None:
    # 600 patches: the left half alike and a little more uncertain, the right half unlike them.
    patch = (10, 10)
    grid = patch_grid((200, 300), patch)
    table = {
        b: {"entropy": 0.9 if b[0] < 100 else 0.5, "embedding": np.array([1.0, 0.0] if b[0] < 100 else [0.0, 1.0])}
        for b in grid
    }
    held = (0, 290, 10, 10)  # a left patch on the last row: never among the first measured candidates
    book = ReservationBook(600)
    book.pick([f"a@{','.join(map(str, held))}"], lambda free: free, "first annotator")
    network = torch.nn.Identity()
    diverse = WSIDiverse(NUCLEI, lambda: network, random.Random(0), book)
    diverse.store.measures = lambda source, box, net: table[box]
    version = file_version(store.get_image_uri("a"))
    diverse.scored(open_source(store.get_image_uri("a")), grid, version, network)  # all measured
    pick = diverse({"image": "a", "patch_size": list(patch), "client_id": "second"}, store)["bbox"]
    assert pick[0] >= 100, "the held left patch covers the left half: the unlike right half comes first"


def test_a_slide_failing_while_measured_is_skipped_once_and_the_others_are_measured(
    store: PathologyDatastore,
) -> None:
    served = [weights_version()]
    strategies, prefetcher = _app_parts(store, served)
    tried = []
    real = strategies[1].prefetch

    def failing(source, image, version, patch):  # noqa: ANN001, ANN202 - the signature of prefetch
        tried.append(image)
        if image == "a":
            raise RuntimeError("read error in a tile of the slide")
        return real(source, image, version, patch)

    strategies[1].prefetch = failing
    assert prefetcher.run_once() > 0 and tried == ["a", "b"]
    assert prefetcher.pending() == [] and prefetcher.run_once() == 0 and tried == ["a", "b"], "not retried each round"
