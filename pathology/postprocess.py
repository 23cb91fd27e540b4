"""From the network's two maps to nuclei: marker watershed, polygons, and polygons back to masks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon
from skimage.measure import find_contours
from skimage.segmentation import watershed

Polygon = list[list[float]]


def instances_from_maps(
    foreground: np.ndarray, distance: np.ndarray, *, fg_threshold: float, seed_threshold: float, min_area: int
) -> np.ndarray:
    """Instance labels (int32, 0 background, 1..N) from foreground probability and normalised distance.

    Seeds are the connected regions where the distance map is high; a watershed on the inverted
    distance, restricted to the foreground, grows each seed into one nucleus. Foreground blobs with
    no seed (small nuclei whose distance never rises) become nuclei of their own.
    """
    fg = foreground > fg_threshold
    seeds, n = ndimage.label(fg & (distance > seed_threshold))
    labels = watershed(-distance, seeds, mask=fg) if n else np.zeros(fg.shape, np.int32)
    orphans, m = ndimage.label(fg & (labels == 0))
    if m:
        labels = np.where(orphans > 0, orphans + n, labels)
    return relabel(remove_small(labels.astype(np.int32), min_area))


def remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    small = np.flatnonzero(areas < min_area)
    small = small[small > 0]
    if small.size:
        labels = np.where(np.isin(labels, small), 0, labels)
    return labels


def relabel(labels: np.ndarray) -> np.ndarray:
    """Ids made consecutive 1..N in order of first appearance (row-major), 0 kept."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]


def drop_collinear(ring: np.ndarray) -> np.ndarray:
    """The vertices of an open ring where its direction changes (straight runs become one edge).

    A vectorised stand-in for Douglas-Peucker at zero tolerance: ``skimage``'s ``approximate_polygon``
    costs about 7 ms per nucleus, which made polygons the slowest step of a 1024 x 1024 region.
    """
    if len(ring) < 4:
        return ring
    before = ring - np.roll(ring, 1, axis=0)
    after = np.roll(ring, -1, axis=0) - ring
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = np.abs(cross) > 1e-9
    return ring[keep] if keep.sum() >= 3 else ring


def instance_polygons(labels: np.ndarray) -> dict[int, Polygon]:
    """The outer contour of each instance as ``[[x, y], ...]`` (pixel-corner coordinates, not closed).

    Each nucleus is traced on its own bounding-box crop, so the cost grows with the nuclei's area,
    not with the tile's. Coordinates are ``x`` (column), ``y`` (row), the order slide viewers use.
    """
    out: dict[int, Polygon] = {}
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = np.pad(labels[sl] == i, 1).astype(np.float32)
        contours = find_contours(crop, 0.5)
        if not contours:
            continue
        contour = max(contours, key=len)
        # find_contours closes the ring by repeating the first point; clients expect it open.
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        contour = drop_collinear(contour)
        if len(contour) < 3:
            continue
        y0, x0 = sl[0].start - 1, sl[1].start - 1
        xy = np.round(contour[:, ::-1] + (x0 + 0.5, y0 + 0.5), 2)
        out[i] = xy.tolist()
    return out


def polygon_area(poly: Polygon) -> float:
    """Area enclosed by an open ring (shoelace formula), in square pixels."""
    pts = np.asarray(poly, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def rasterize(polygons: list[Polygon], shape: tuple[int, int], *, offset: tuple[float, float] = (0, 0)) -> np.ndarray:
    """An instance mask (int32) with polygon ``k`` filled as id ``k + 1``; later polygons win overlaps.

    ``offset`` (x, y) is subtracted from the points first (slide coordinates to region coordinates).
    """
    mask = np.zeros(shape, dtype=np.int32)
    ox, oy = offset
    for k, poly in enumerate(polygons, start=1):
        pts = np.asarray(poly, dtype=np.float64)
        # Pixel centres sit at +0.5: a contour traced around pixel (r, c) encloses exactly that pixel.
        rr, cc = fill_polygon(pts[:, 1] - oy - 0.5, pts[:, 0] - ox - 0.5, shape)
        mask[rr, cc] = k
    return mask
