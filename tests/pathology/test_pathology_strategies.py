"""Slide patch strategies: a random patch always fits; the most uncertain patch wins, ties at random."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.layers import SkipConnection
from PIL import Image

from appcore.errors import RequestError
from pathology.activelearning import (
    WSIDiverse,
    WSIRandom,
    WSIUncertain,
    mutual_information,
    patch_uncertainty,
    tta_disagreement,
)
from pathology.datastore import PathologyDatastore
from pathology.spec import NUCLEI
from strategies.patches import fit_patch, patch_grid, ranked_patches
from strategies.reservations import ReservationBook
from tests.stand_ins import TissueIsUncertain, weights_version


@pytest.mark.parametrize(
    ("image", "patch", "expected"),
    [((100, 80), (30, 20), (30, 20)), ((100, 80), (1024, 1024), (100, 80)), ((10, 500), (64, 64), (10, 64))],
)
def test_fit_patch(image: tuple[int, int], patch: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit_patch(image, patch) == expected


@pytest.mark.parametrize(("image", "patch"), [((0, 10), (5, 5)), ((10, 10), (0, 5))])
def test_patch_grid_refuses_empty_sizes(image: tuple[int, int], patch: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        patch_grid(image, patch)


def test_patch_grid_covers_the_image_with_whole_patches() -> None:
    boxes = patch_grid((250, 100), (100, 60))
    assert boxes == [
        (0, 0, 100, 60),
        (100, 0, 100, 60),
        (150, 0, 100, 60),
        (0, 40, 100, 60),
        (100, 40, 100, 60),
        (150, 40, 100, 60),
    ]


def test_patches_are_ranked_most_uncertain_first_ties_at_random() -> None:
    boxes = [(0, 0, 1, 1), (1, 0, 1, 1), (2, 0, 1, 1), (3, 0, 1, 1)]
    scores = {boxes[0]: 0.1, boxes[1]: 0.9, boxes[2]: 0.2}
    assert ranked_patches(boxes, scores, random.Random(0)) == [boxes[1], boxes[2], boxes[0], boxes[3]]
    tied = {ranked_patches(boxes, {boxes[0]: 0.5, boxes[2]: 0.5}, random.Random(s))[0] for s in range(30)}
    assert tied == {boxes[0], boxes[2]}, "ties in random order, unscored patches after scored ones"
    assert ranked_patches([], {}, random.Random(0)) == []


def test_patch_uncertainty_is_highest_at_one_half() -> None:
    assert patch_uncertainty(np.full((4, 4), 0.5)) == pytest.approx(1.0)
    assert patch_uncertainty(np.zeros((4, 4))) < 1e-3


@pytest.fixture
def store(tmp_path: Path) -> PathologyDatastore:
    studies = tmp_path / "studies"
    studies.mkdir()
    rgb = np.full((300, 200, 3), 235, np.uint8)
    rgb[150:300, 100:200] = (120, 60, 150)  # tissue-coloured corner, glass elsewhere
    Image.fromarray(rgb).save(studies / "small.png")
    return PathologyDatastore(str(studies))


def test_wsi_random_on_an_image_smaller_than_the_patch(store: PathologyDatastore) -> None:
    res = WSIRandom(random.Random(0))({"image": "small", "patch_size": [1024, 1024]}, store)
    assert res["id"] == "small" and res["bbox"] == [0, 0, 200, 300]
    res = WSIRandom(random.Random(0))({"patch_size": [100, 100]}, store)  # no image: picks one
    assert res["id"] == "small" and res["bbox"][2:] == [100, 100]


def test_wsi_random_hands_out_k_grid_patches_never_twice_within_the_window(store: PathologyDatastore) -> None:
    strategy = WSIRandom(random.Random(0), ReservationBook(600))
    grid = {tuple(b) for b in patch_grid((200, 300), (100, 100))}  # 2 x 3
    first = strategy({"image": "small", "patch_size": [100, 100], "k": 4, "client_id": "a"}, store)
    assert len(first["bboxes"]) == 4 and first["bbox"] == first["bboxes"][0]
    second = strategy({"image": "small", "patch_size": [100, 100], "k": 4, "client_id": "b"}, store)
    assert len(second["bboxes"]) == 2, "only the two patches nobody holds"
    assert {tuple(b) for b in first["bboxes"] + second["bboxes"]} == grid
    assert strategy({"image": "small", "patch_size": [100, 100], "client_id": "c"}, store) is None


def test_more_patches_than_max_k_is_a_400(store: PathologyDatastore) -> None:
    strategy = WSIRandom(random.Random(0), ReservationBook(600, max_pick=2))
    with pytest.raises(RequestError, match="one request is handed at most 2") as e:
        strategy({"image": "small", "patch_size": [100, 100], "k": 3}, store)
    assert e.value.status_code == 400
    assert len(strategy({"image": "small", "patch_size": [100, 100], "k": 2}, store)["bboxes"]) == 2


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        ({"image": "nope"}, 404),
        ({"image": "../x"}, 400),
        ({"image": "small", "patch_size": [0, 5]}, 400),
        ({"image": "small", "k": 0}, 400),
        ({"image": "small", "k": 1.5}, 400),
    ],
)
def test_wsi_random_refuses_bad_requests(store: PathologyDatastore, request_: dict, status: int) -> None:
    with pytest.raises(RequestError) as e:
        WSIRandom(random.Random(0))(request_, store)
    assert e.value.status_code == status


def test_wsi_uncertain_returns_the_most_uncertain_patch_as_a_bbox(store: PathologyDatastore) -> None:
    strategy = WSIUncertain(NUCLEI, lambda: TissueIsUncertain(), random.Random(0))
    res = strategy({"image": "small", "patch_size": [100, 150]}, store)
    assert res["bbox"] == [100, 150, 100, 150]


def test_wsi_uncertain_hands_out_the_most_uncertain_patches_to_concurrent_annotators(store: PathologyDatastore) -> None:
    strategy = WSIUncertain(NUCLEI, lambda: TissueIsUncertain(), random.Random(0), ReservationBook(600))
    request_ = {"image": "small", "patch_size": [100, 150]}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda c: strategy({**request_, "client_id": c}, store), ["a", "b", "c", "d"]))
    boxes = [tuple(a["bbox"]) for a in answers if a]
    assert len(boxes) == 4 and len(set(boxes)) == 4, "four patches of the 2 x 2 grid, none twice"
    assert (100, 150, 100, 150) in boxes, "the tissue patch is among them"
    assert strategy({**request_, "client_id": "e"}, store) is None


def test_wsi_uncertain_scores_a_patch_once_per_weights_and_image_file(store: PathologyDatastore) -> None:
    served = [weights_version()]
    strategy = WSIUncertain(NUCLEI, lambda: served[0], random.Random(0), ReservationBook(600))
    request_ = {"image": "small", "patch_size": [100, 150]}
    first = strategy({**request_, "client_id": "a"}, store)
    calls = served[0].passes
    assert calls > 0
    second = strategy({**request_, "client_id": "b"}, store)
    assert served[0].passes == calls, "the next annotator's request reuses the scores"
    assert first["bbox"] == [100, 150, 100, 150] and second["bbox"] != first["bbox"]

    served[0] = weights_version()  # new weights published
    strategy({**request_, "client_id": "c"}, store)
    assert served[0].passes == calls, "rescored under the new weights"
    path = Path(store.get_image_uri("small"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the image replaced
    strategy({**request_, "client_id": "d"}, store)
    assert served[0].passes == 2 * calls, "rescored for the new file"


def test_tta_disagreement_is_the_spread_between_flips() -> None:
    assert tta_disagreement([np.full((4, 4), 0.3)] * 4) == 0.0
    assert tta_disagreement([np.zeros((4, 4)), np.ones((4, 4))]) == pytest.approx(0.5)


class _LeftHalfIsNucleus(torch.nn.Module):
    """A stand-in network that is sure, but whose answer flips with the image: nuclei on the left of dark windows."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = x.mean(dim=1, keepdim=True) < 0.5
        left = torch.zeros_like(dark)
        left[..., : x.shape[-1] // 2] = True
        fg = torch.where(dark & left, 20.0, -20.0)
        return torch.cat([fg, torch.zeros_like(fg)], dim=1)


def test_wsi_tta_ranks_the_patch_whose_prediction_changes_under_flips_first(store: PathologyDatastore) -> None:
    request_ = {"image": "small", "patch_size": [100, 150], "k": 4}
    tta = WSIUncertain(NUCLEI, lambda: _LeftHalfIsNucleus(), random.Random(0), measure="tta")
    assert tta(request_, store)["bboxes"][0] == [100, 150, 100, 150]
    entropy = WSIUncertain(NUCLEI, lambda: _LeftHalfIsNucleus(), random.Random(0))
    measured = entropy.scored(*_source_and_grid(store), "v", entropy._network())
    assert max(m["entropy"] for m in measured.values()) < 1e-3, "sure everywhere: entropy cannot tell the patches apart"


def _source_and_grid(store: PathologyDatastore) -> tuple:
    from pathology.wsi import open_source

    return open_source(store.get_image_uri("small")), patch_grid((200, 300), (100, 150))


def test_wsi_diversity_skips_near_duplicates_of_patches_picked_or_held(store: PathologyDatastore) -> None:
    # Four patches: two most uncertain ones that look alike, a less uncertain one unlike them, a sure one.
    a, a2, b, c = (0, 0, 100, 150), (100, 0, 100, 150), (0, 150, 100, 150), (100, 150, 100, 150)
    table = {
        a: {"entropy": 0.9, "embedding": np.array([1.0, 0.0, 0.0])},
        a2: {"entropy": 0.89, "embedding": np.array([0.99, 0.05, 0.0])},
        b: {"entropy": 0.5, "embedding": np.array([0.0, 1.0, 0.0])},
        c: {"entropy": 0.1, "embedding": np.array([0.0, 0.0, 1.0])},
    }
    network = torch.nn.Identity()

    def strategy(cls: type, book: ReservationBook) -> WSIUncertain:
        s = cls(NUCLEI, lambda: network, random.Random(0), book)
        s.store.measures = lambda source, box, net: table[box]
        return s

    request_ = {"image": "small", "patch_size": [100, 150], "k": 2}
    assert strategy(WSIUncertain, ReservationBook(0))(request_, store)["bboxes"] == [list(a), list(a2)]
    assert strategy(WSIDiverse, ReservationBook(0))(request_, store)["bboxes"] == [list(a), list(b)]
    book = ReservationBook(600)
    book.pick(["small@0,0,100,150"], lambda free: free, "first annotator")  # holds patch a
    second = strategy(WSIDiverse, book)({**request_, "k": 1, "client_id": "second"}, store)
    assert second["bbox"] == list(b), "a2 is a near-duplicate of the held patch a"


def test_mutual_information_is_the_disagreement_between_passes_not_their_uncertainty() -> None:
    assert mutual_information(np.full((8, 4, 4), 0.5)) == pytest.approx(0.0, abs=1e-9), "unsure, but every pass agrees"
    assert mutual_information(np.stack([np.zeros((4, 4)), np.ones((4, 4))] * 4)) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 < mutual_information(np.stack([np.full((4, 4), 0.3), np.full((4, 4), 0.7)])) < 0.2


class _DropoutSwaysDarkTissue(torch.nn.Module):
    """A stand-in UNet with a bottleneck: foreground probability 0.5 on all tissue without dropout;
    dropout at the bottleneck moves the answer on dark tissue only (grey tissue stays 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.deep = SkipConnection(torch.nn.Identity())  # output: [input, bottleneck(input)]
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.passes = 0  # this instance's own; a copy counts its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        both = self.deep(x)
        moved = (both[:, 3:] - both[:, :3]).mean(1, keepdim=True)  # 0 unless dropout touched the bottleneck
        dark = x.mean(1, keepdim=True) < 0.0
        return torch.cat([torch.where(dark, 100.0 * moved, 0.0), torch.zeros_like(moved)], dim=1)


@pytest.fixture
def two_tissues(tmp_path: Path) -> PathologyDatastore:
    studies = tmp_path / "studies"
    studies.mkdir()
    rgb = np.full((300, 200, 3), 235, np.uint8)  # glass
    rgb[:150] = 200  # grey tissue across the top
    rgb[150:, 100:] = (120, 60, 150)  # dark tissue, bottom right
    Image.fromarray(rgb).save(studies / "two.png")
    return PathologyDatastore(str(studies))


def test_wsi_bald_ranks_the_patch_where_dropout_changes_the_answer_first(two_tissues: PathologyDatastore) -> None:
    served = _DropoutSwaysDarkTissue()
    request_ = {"image": "two", "patch_size": [100, 150], "k": 3}
    for seed in range(5):
        bald = WSIUncertain(NUCLEI, lambda: served, random.Random(seed), measure="bald")
        assert bald(request_, two_tissues)["bbox"] == [100, 150, 100, 150]
    firsts = {
        tuple(WSIUncertain(NUCLEI, lambda: served, random.Random(seed))(request_, two_tissues)["bbox"])
        for seed in range(20)
    }
    assert len(firsts) > 1, "entropy is 1 on every tissue patch: it cannot tell them apart"


@pytest.mark.parametrize("measure", ["entropy", "bald"])
def test_patch_measures_never_hook_the_served_network(two_tissues: PathologyDatastore, measure: str) -> None:
    served = _DropoutSwaysDarkTissue().eval()
    probe = torch.full((1, 3, 64, 64), -0.5)
    before = served(probe)
    served.train()  # whatever mode the infer left it in stays
    WSIUncertain(NUCLEI, lambda: served, random.Random(0), measure=measure)({"image": "two"}, two_tissues)
    assert served.passes == 1, "every measuring pass ran on a private copy, none on the network infers use"
    assert not served.deep.submodule._forward_pre_hooks and not served.deep.submodule._forward_hooks
    assert torch.equal(served(probe), before), "an infer on the served network is untouched by dropout"
    assert all(m.training for m in served.modules())
