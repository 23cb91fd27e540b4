"""Slides and tiles as region sources, region checks, and tiled inference whose seams lose nothing.

A region is cut into *cores* that partition it; each core is read with a margin on every side, and
a nucleus found in that read is kept only if its centroid lies in the core. With a margin wider than
a nucleus, every nucleus is seen whole by the tile that owns its centroid and kept exactly once:
nuclei on seams are neither duplicated nor cut in two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from appcore.errors import bad_request, unprocessable
from pathology.data import rgb_of
from pathology.postprocess import Polygon, instance_polygons

logger = logging.getLogger(__name__)

# Pillow opens these whole; anything else is handed to OpenSlide.
TILE_EXTENSIONS = (".png", ".jpg", ".jpeg")
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # a tile bigger than this must come as a slide


class RegionSource(Protocol):
    """Anything that can hand out RGB regions at full resolution."""

    @property
    def dimensions(self) -> tuple[int, int]: ...  # (width, height)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray: ...  # (h, w, 3) uint8


@dataclass(frozen=True)
class ArraySource:
    """An in-memory RGB tile."""

    rgb: np.ndarray

    @property
    def dimensions(self) -> tuple[int, int]:
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.rgb[y : y + h, x : x + w]


class SlideSource:
    """Level 0 of a whole-slide image read with OpenSlide; transparent pixels become white."""

    def __init__(self, slide: object) -> None:
        self._slide = slide
        w, h = slide.dimensions  # type: ignore[attr-defined]
        self._dimensions = (int(w), int(h))

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dimensions

    @property
    def mpp(self) -> float | None:
        value = self._slide.properties.get("openslide.mpp-x")  # type: ignore[attr-defined]
        return float(value) if value else None

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region((x, y), 0, (w, h)))  # type: ignore[attr-defined]
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return rgb.round().astype(np.uint8)

    def close(self) -> None:
        self._slide.close()  # type: ignore[attr-defined]


def is_slide(path: str | Path) -> bool:
    """Whether OpenSlide recognises the file (a vendor format or a tiled TIFF), by content."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except Exception:  # detect_format raises on unreadable files rather than answering None
        return False


def read_tile(path: str | Path, what: str = "image") -> np.ndarray:
    """A PNG/JPEG tile as RGB uint8, fully decoded; a 422 if it is not an image Pillow can read."""
    try:
        with Image.open(path) as im:
            im.load()
            return rgb_of(im)  # 16-bit fluorescence stretched, not clipped at 255
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).replace(str(path), Path(path).name)  # the file's name, not the server's path
        raise unprocessable(
            f"The {what} is not a readable PNG/JPEG image or slide ({type(e).__name__}: {reason})"
        ) from None


def open_source(path: str | Path, what: str = "image") -> RegionSource:
    """A slide (OpenSlide) or a tile (Pillow); a 422 that says so when neither can read it."""
    if is_slide(path):
        import openslide

        try:
            return SlideSource(openslide.OpenSlide(str(path)))
        except openslide.OpenSlideError as e:
            reason = str(e).replace(str(path), Path(path).name)
            raise unprocessable(f"OpenSlide cannot read the {what} ({reason})") from None
    suffix = "".join(Path(path).suffixes).lower()
    if suffix.endswith((".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")):
        # A slide extension that OpenSlide does not recognise: say so rather than a Pillow error.
        try:
            return ArraySource(read_tile(path, what))
        except Exception:
            raise unprocessable(
                f"OpenSlide cannot read the {what} ({Path(path).name}): not a supported slide format or corrupt"
            ) from None
    return ArraySource(read_tile(path, what))


def check_region(location: object, size: object, dimensions: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of a requested region, the whole image when ``size`` is 0 x 0.

    Raises:
        RequestError: 400 for malformed values, 422 for a region reaching outside the image.
    """
    try:
        x, y = (int(v) for v in (location or (0, 0)))
        w, h = (int(v) for v in (size or (0, 0)))
    except (TypeError, ValueError):
        raise bad_request(f"location and size must be two integers each, got {location!r} and {size!r}") from None
    width, height = dimensions
    if w == 0 and h == 0:
        if x or y:
            raise bad_request(f"A region at {[x, y]} needs a size; size [0, 0] means the whole image")
        return 0, 0, width, height
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise unprocessable(
            f"Region at {[x, y]} of size {[w, h]} is outside the image, which is {width} x {height} pixels "
            "(location + size must stay inside it)"
        )
    return x, y, w, h


@dataclass(frozen=True)
class TileBox:
    """A core (owned area) and the larger box read around it, in image coordinates, ``(x, y, w, h)``."""

    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]


def tile_boxes(region: tuple[int, int, int, int], tile: int, margin: int) -> Iterator[TileBox]:
    """Cores of at most ``tile`` pixels partitioning ``region``, each read with ``margin`` around it."""
    if tile < 1 or margin < 0:
        raise bad_request(f"tile_size must be positive and the margin non-negative, got {tile} and {margin}")
    x0, y0, w, h = region
    for ty in range(y0, y0 + h, tile):
        for tx in range(x0, x0 + w, tile):
            cw, ch = min(tile, x0 + w - tx), min(tile, y0 + h - ty)
            rx, ry = max(tx - margin, x0), max(ty - margin, y0)
            rx2, ry2 = min(tx + cw + margin, x0 + w), min(ty + ch + margin, y0 + h)
            yield TileBox((tx, ty, cw, ch), (rx, ry, rx2 - rx, ry2 - ry))


@dataclass
class TiledResult:
    """Nuclei of a region: polygons in image coordinates and, if asked for, the region's instance mask."""

    polygons: list[Polygon]
    mask: np.ndarray | None
    tiles: int


def centroids(labels: np.ndarray) -> dict[int, tuple[float, float]]:
    """``{id: (x, y)}`` centroid of each instance, in the array's pixel-centre coordinates."""
    out = {}
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        rows, cols = np.nonzero(labels[sl] == i)
        out[i] = (float(cols.mean()) + sl[1].start, float(rows.mean()) + sl[0].start)
    return out


def run_tiled(
    source: RegionSource,
    region: tuple[int, int, int, int],
    segment: Callable[[np.ndarray], np.ndarray],
    *,
    tile: int,
    margin: int,
    with_mask: bool = False,
) -> TiledResult:
    """Segment ``region`` tile by tile; each nucleus is kept once, by the tile owning its centroid.

    Args:
        source: where pixels come from.
        region: ``(x, y, w, h)`` in image coordinates, already checked.
        segment: RGB array -> instance mask of the same size.
        tile: core size in pixels.
        margin: context read around each core; should exceed the largest nucleus diameter.
        with_mask: also return the region's instance mask (ids 1..N in the order found).
    """
    x0, y0, w, h = region
    mask = np.zeros((h, w), dtype=np.int32) if with_mask else None
    polygons: list[Polygon] = []
    n_tiles = 0
    for box in tile_boxes(region, tile, margin):
        n_tiles += 1
        rx, ry, rw, rh = box.read
        cx, cy, cw, ch = box.core
        labels = segment(source.read(rx, ry, rw, rh))
        if labels.shape != (rh, rw):
            raise RuntimeError(f"segment returned {labels.shape} for a {rh} x {rw} read")
        owned = [i for i, (px, py) in centroids(labels).items() if cx <= px + rx < cx + cw and cy <= py + ry < cy + ch]
        if not owned:
            continue
        keep = np.zeros(int(labels.max()) + 1, dtype=bool)
        keep[owned] = True
        labels = np.where(keep[labels], labels, 0)
        for _, poly in sorted(instance_polygons(labels).items()):
            polygons.append([[px + rx, py + ry] for px, py in poly])
        if mask is not None:
            view = mask[ry - y0 : ry - y0 + rh, rx - x0 : rx - x0 + rw]
            base = int(mask.max())
            lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
            lut[owned] = np.arange(base + 1, base + 1 + len(owned), dtype=np.int32)
            new = lut[labels]
            view[(new > 0) & (view == 0)] = new[(new > 0) & (view == 0)]
    return TiledResult(polygons, mask, n_tiles)
