"""Post-processing, polygons, tiling with centroid ownership, and nuclick, on synthetic nuclei."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from appcore.errors import RequestError
from pathology.data import normalised_distance
from pathology.nuclick import clicked_nuclei
from pathology.postprocess import instance_polygons, instances_from_maps, polygon_area, rasterize
from pathology.wsi import ArraySource, check_region, run_tiled, tile_boxes
from research.pathology.metrics import aji


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """Instance mask of discs at ``(x, y)`` centres, ids in order."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, dtype=np.int32)
    for i, (x, y) in enumerate(centres, start=1):
        mask[((xx - x) ** 2 + (yy - y) ** 2 <= radius**2) & (mask == 0)] = i
    return mask


def test_polygons_round_trip_through_rasterize() -> None:
    mask = discs((80, 90), [(20, 20), (60, 30), (40, 60)], 9)
    polys = instance_polygons(mask)
    assert sorted(polys) == [1, 2, 3]
    back = rasterize([polys[i] for i in sorted(polys)], mask.shape)
    assert aji(back, mask) > 0.9


@pytest.mark.parametrize(
    ("poly", "area"),
    [([[0, 0], [4, 0], [4, 3], [0, 3]], 12.0), ([[0, 0], [4, 0], [0, 4]], 8.0), ([[0, 0], [1, 1], [2, 2]], 0.0)],
)
def test_polygon_area(poly: list, area: float) -> None:
    assert polygon_area(poly) == pytest.approx(area)


def test_watershed_splits_touching_nuclei() -> None:
    mask = discs((60, 80), [(25, 30), (42, 30)], 10)  # overlapping discs: two nuclei that touch
    fg, dist = (mask > 0).astype(np.float32), normalised_distance(mask)
    found = instances_from_maps(fg, dist, fg_threshold=0.5, seed_threshold=0.5, min_area=5)
    assert found.max() == 2
    assert aji(found, mask) > 0.9


def test_small_objects_are_dropped() -> None:
    mask = discs((40, 40), [(10, 10), (30, 30)], 1)
    fg, dist = (mask > 0).astype(np.float32), normalised_distance(mask)
    assert instances_from_maps(fg, dist, fg_threshold=0.5, seed_threshold=0.5, min_area=12).max() == 0


@pytest.mark.parametrize(("w", "h", "tile", "margin"), [(100, 70, 32, 8), (64, 64, 64, 16), (10, 300, 7, 0)])
def test_tile_cores_partition_the_region(w: int, h: int, tile: int, margin: int) -> None:
    cover = np.zeros((h, w), dtype=np.int32)
    for box in tile_boxes((5, 3, w, h), tile, margin):
        cx, cy, cw, ch = box.core
        rx, ry, rw, rh = box.read
        assert rx <= cx and ry <= cy and rx + rw >= cx + cw and ry + rh >= cy + ch
        assert rx >= 5 and ry >= 3 and rx + rw <= 5 + w and ry + rh <= 3 + h
        cover[cy - 3 : cy - 3 + ch, cx - 5 : cx - 5 + cw] += 1
    assert (cover == 1).all()


def _threshold_segmenter(rgb: np.ndarray) -> np.ndarray:
    labels, _ = ndimage.label(rgb[..., 0] < 128)
    return labels.astype(np.int32)


def test_nuclei_on_seams_are_neither_duplicated_nor_cut() -> None:
    # Nuclei centred on the seams of 64-pixel tiles, on corners and inside tiles.
    centres = [(64, 30), (30, 64), (64, 64), (128, 100), (100, 128), (20, 20), (150, 40), (128, 128)]
    truth = discs((180, 170), centres, 7)
    rgb = np.where(truth[..., None] > 0, 40, 230).astype(np.uint8).repeat(3, axis=2)
    result = run_tiled(ArraySource(rgb), (0, 0, 170, 180), _threshold_segmenter, tile=64, margin=16, with_mask=True)
    assert result.tiles == 9
    assert len(result.polygons) == len(centres), "a seam nucleus was duplicated or cut in two"
    assert aji(result.mask, truth) > 0.99
    back = rasterize(result.polygons, truth.shape)
    assert aji(back, truth) > 0.9


def test_without_margin_seam_nuclei_are_cut() -> None:
    """The control: with no context the same seam nuclei are found as pieces, so the test above can fail."""
    truth = discs((128, 128), [(64, 64)], 7)
    rgb = np.where(truth[..., None] > 0, 40, 230).astype(np.uint8).repeat(3, axis=2)
    result = run_tiled(ArraySource(rgb), (0, 0, 128, 128), _threshold_segmenter, tile=64, margin=0, with_mask=True)
    assert len(result.polygons) == 4


@pytest.mark.parametrize(
    ("location", "size", "expected"),
    [
        ((0, 0), (0, 0), (0, 0, 200, 100)),
        ((10, 20), (30, 40), (10, 20, 30, 40)),
        ([0, 0], [200, 100], (0, 0, 200, 100)),
    ],
)
def test_check_region(location: tuple, size: tuple, expected: tuple) -> None:
    assert check_region(location, size, (200, 100)) == expected


@pytest.mark.parametrize(
    ("location", "size", "status", "match"),
    [
        ((190, 0), (20, 20), 422, "outside the image"),
        ((0, 0), (201, 10), 422, "outside the image"),
        ((-1, 0), (10, 10), 422, "outside the image"),
        ((0, 0), (0, 10), 422, "outside the image"),
        (("a", 0), (10, 10), 400, "two integers"),
        ((5, 5), (0, 0), 400, "needs a size"),
    ],
)
def test_check_region_refuses(location: tuple, size: tuple, status: int, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        check_region(location, size, (200, 100))
    assert e.value.status_code == status


def test_nuclick_returns_the_clicked_nuclei_and_background_clicks_cut() -> None:
    labels = discs((60, 100), [(20, 30), (50, 30), (80, 30)], 8)
    fg = (labels > 0).astype(np.float32)
    out = clicked_nuclei(labels, fg, [(20, 30), (22, 31), (80, 30)], [])
    assert out.max() == 2  # two clicks on one nucleus give one
    assert ((out == 1) == (labels == 1)).all() and ((out == 2) == (labels == 3)).all()
    # a background click on the right edge of nucleus 1 keeps only the part nearer the foreground click
    cut = clicked_nuclei(labels, fg, [(16, 30)], [(26, 30)])
    assert 0 < (cut > 0).sum() < (labels == 1).sum()
    assert cut[30, 26] == 0 and cut[30, 14] == 1
    # a click on glass answers nothing
    assert clicked_nuclei(labels, fg, [(2, 2)], []).max() == 0


def test_nuclick_uses_weak_foreground_where_no_instance_was_found() -> None:
    blob = discs((40, 40), [(20, 20)], 6) > 0
    fg = np.where(blob, 0.4, 0.0).astype(np.float32)  # below the instance threshold, above the weak one
    out = clicked_nuclei(np.zeros((40, 40), np.int32), fg, [(20, 20)], [])
    assert (out > 0).sum() == blob.sum()
