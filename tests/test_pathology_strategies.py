"""Slide patch strategies: a random patch always fits; the most uncertain patch wins, ties at random."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from appcore.errors import RequestError
from pathology.activelearning import WSIRandom, WSIUncertain, patch_uncertainty
from pathology.datastore import PathologyDatastore
from pathology.spec import NUCLEI
from strategies.patches import fit_patch, most_uncertain, patch_grid, random_patch


@pytest.mark.parametrize(
    ("image", "patch", "expected"),
    [((100, 80), (30, 20), (30, 20)), ((100, 80), (1024, 1024), (100, 80)), ((10, 500), (64, 64), (10, 64))],
)
def test_fit_patch(image: tuple[int, int], patch: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit_patch(image, patch) == expected


@pytest.mark.parametrize(("image", "patch"), [((100, 80), (30, 20)), ((50, 40), (1024, 1024)), ((1, 1), (2, 2))])
def test_random_patch_stays_inside(image: tuple[int, int], patch: tuple[int, int]) -> None:
    rng = random.Random(0)
    for _ in range(50):
        x, y, w, h = random_patch(image, patch, rng)
        assert x >= 0 and y >= 0 and x + w <= image[0] and y + h <= image[1] and w >= 1 and h >= 1


@pytest.mark.parametrize(("image", "patch"), [((0, 10), (5, 5)), ((10, 10), (0, 5))])
def test_random_patch_refuses_empty_sizes(image: tuple[int, int], patch: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        random_patch(image, patch, random.Random(0))


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


def test_most_uncertain_picks_the_top_and_breaks_ties_at_random() -> None:
    boxes = [(0, 0, 1, 1), (1, 0, 1, 1), (2, 0, 1, 1)]
    assert most_uncertain(boxes, {boxes[0]: 0.1, boxes[1]: 0.9, boxes[2]: 0.2}, random.Random(0)) == boxes[1]
    tied = {most_uncertain(boxes, {boxes[0]: 0.5, boxes[2]: 0.5}, random.Random(s)) for s in range(30)}
    assert tied == {boxes[0], boxes[2]}
    with pytest.raises(ValueError, match="no candidate"):
        most_uncertain([], {}, random.Random(0))


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


@pytest.mark.parametrize(
    ("request_", "status"),
    [({"image": "nope"}, 404), ({"image": "../x"}, 400), ({"image": "small", "patch_size": [0, 5]}, 400)],
)
def test_wsi_random_refuses_bad_requests(store: PathologyDatastore, request_: dict, status: int) -> None:
    with pytest.raises(RequestError) as e:
        WSIRandom(random.Random(0))(request_, store)
    assert e.value.status_code == status


class _TissueIsUncertain(torch.nn.Module):
    """A stand-in network: foreground probability 0.5 on dark pixels (tissue), 0 on glass."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # says which device the network is on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = (x.mean(dim=1, keepdim=True) < 0.5).float()
        return torch.cat([torch.where(dark > 0, 0.0, -20.0), torch.zeros_like(dark)], dim=1)


def test_wsi_uncertain_returns_the_most_uncertain_patch_as_a_bbox(store: PathologyDatastore) -> None:
    strategy = WSIUncertain(NUCLEI, lambda: _TissueIsUncertain(), random.Random(0))
    res = strategy({"image": "small", "patch_size": [100, 150]}, store)
    assert res["bbox"] == [100, 150, 100, 150]
