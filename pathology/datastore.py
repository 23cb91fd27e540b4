"""A local datastore for tiles and slides whose labels are checked and stored in one form per image kind.

A label for a PNG/JPEG tile is stored as a 16-bit instance mask PNG of the tile's size (polygon
uploads are filled in); a label for a slide is stored as polygon JSON in level-0 pixel coordinates.
Either way the upload is checked first and written through a temporary file and a rename, so a
refused or interrupted save leaves the previous label as it was.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.datastore.local import DataModel, LocalDatastore
from PIL import Image

from appcore import seam
from appcore.datastore import AUTHOR_FIELD, CheckedLocalDatastore, check_save_params
from appcore.errors import unprocessable
from appcore.files import staged_beside
from appcore.identity import user
from appcore.validation import check_image_id, check_upload_size
from pathology.annotations import Polygon, Shape, parse_asap_xml, parse_json
from pathology.postprocess import rasterize
from pathology.spec import NUCLEUS
from pathology.wsi import SlideSource, open_source

logger = logging.getLogger(__name__)

EXTENSIONS = ["*.png", "*.jpg", "*.jpeg", "*.svs", "*.tif", "*.tiff", "*.ndpi", "*.mrxs", "*.scn", "*.bif"]
# Class names accepted for a nucleus outline (clients spell it in different ways; unclassified too).
NUCLEUS_NAMES = {"", NUCLEUS.name, "nuclei", "nucleus"}
POLYGON_FORMAT = "pathology-polygons/1"
# Outlines traced on pixel corners may reach this far past the image edge.
EDGE_TOLERANCE = 1.0


def _sniff(raw: bytes) -> str:
    if raw.startswith(b"\x89PNG"):
        return "png"
    head = raw.lstrip()[:1]
    if head == b"<":
        return "xml"
    if head in (b"{", b"["):
        return "json"
    return "unknown"


def check_shapes(shapes: list[Shape], dimensions: tuple[int, int]) -> list[Polygon]:
    """Polygons of nucleus outlines inside the image; a 422 for other classes, none, or points outside."""
    if not shapes:
        raise unprocessable("The label holds no nucleus outline; outline at least one nucleus")
    width, height = dimensions
    polygons = []
    for k, (name, poly) in enumerate(shapes):
        if name.strip().lower() not in NUCLEUS_NAMES:
            raise unprocessable(f"Outline {k} has class {name!r}; this app labels {NUCLEUS.name!r} (or unclassified)")
        pts = np.asarray(poly)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if (
            lo[0] < -EDGE_TOLERANCE
            or lo[1] < -EDGE_TOLERANCE
            or hi[0] > width + EDGE_TOLERANCE
            or hi[1] > height + EDGE_TOLERANCE
        ):
            raise unprocessable(
                f"Outline {k} spans x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f}, outside the image "
                f"({width} x {height}); coordinates are level-0 pixels of the image the label is saved for"
            )
        polygons.append(np.clip(pts, 0, [width, height]).tolist())
    return polygons


def read_label_mask(raw_path: str, dimensions: tuple[int, int]) -> np.ndarray:
    """An instance mask upload, checked: single channel, integer ids, the tile's size (from the PNG's
    header, before its pixels are decoded: a small PNG can declare a huge image of zeros)."""
    try:
        with Image.open(raw_path) as im:
            size = im.size
            if size == tuple(dimensions):
                im.load()
                arr = np.asarray(im)
    except Exception as e:  # Pillow raises several types for corrupt files
        raise unprocessable(f"The label is not a readable PNG ({type(e).__name__}: {e})") from None
    if size != tuple(dimensions):
        raise unprocessable(f"Mask is {size[0]} x {size[1]} pixels; the image is {dimensions[0]} x {dimensions[1]}")
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and np.array_equal(arr[..., 0], arr[..., 1]):
        arr = arr[..., 0]  # greyscale saved as RGB(A)
    if arr.ndim != 2:
        raise unprocessable(
            f"An instance mask has one channel (0 background, 1..N one id per nucleus), got {arr.shape}"
        )
    if (arr.shape[1], arr.shape[0]) != tuple(dimensions):
        raise unprocessable(
            f"Mask is {arr.shape[1]} x {arr.shape[0]} pixels; the image is {dimensions[0]} x {dimensions[1]}"
        )
    if arr.dtype.kind not in "iub":
        raise unprocessable(f"Mask values must be integer instance ids, got {arr.dtype}")
    return arr.astype(np.int64)


def _dimensions(path: str | Path) -> tuple[int, int]:
    source = open_source(path)
    try:
        return source.dimensions
    finally:
        if isinstance(source, SlideSource):
            source.close()


class PathologyDatastore(CheckedLocalDatastore):
    """``CheckedLocalDatastore`` for tiles (PNG/JPEG) and slides (OpenSlide), labelled with nuclei.

    Args:
        datastore_path: the studies folder.
        max_upload_mb: largest accepted image or label upload.
        **kwargs: passed to ``LocalDatastore``.
    """

    def __init__(self, datastore_path: str, *, max_upload_mb: int = 1024, **kwargs: Any) -> None:
        kwargs.setdefault("extensions", EXTENSIONS)
        super().__init__(
            datastore_path, allowed_values=lambda _: frozenset({0, 1}), max_upload_mb=max_upload_mb, **kwargs
        )

    image_suffixes = None  # tiles and slides: ``add_image`` opens the upload instead

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_image_id(image_id, existing=list(seam.local_index(self).objects))
        check_save_params(image_info, "Image upload")
        check_upload_size(image_filename, self._max_upload_mb, "image")
        source = open_source(image_filename, "uploaded image")  # 422 unless Pillow or OpenSlide reads it
        if isinstance(source, SlideSource):
            source.close()
        return super().add_image(image_id, image_filename, image_info)

    def _same_grid(self, current: str | Path, upload: str | Path) -> bool:
        return _dimensions(current) == _dimensions(upload)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        self._existing(image_id)
        check_image_id(label_tag, "Label tag", existing=self.label_tags())
        label_info = check_save_params(label_info, "Save label")
        check_upload_size(label_filename, self._max_upload_mb, "label")
        raw = Path(label_filename).read_bytes()
        kind = _sniff(raw)
        if kind == "unknown":
            raise unprocessable("A label must be an instance mask PNG, polygons as JSON (DSA, GeoJSON) or ASAP XML")
        source = open_source(LocalDatastore.get_image_uri(self, image_id))
        dims = source.dimensions
        is_slide = isinstance(source, SlideSource)
        if is_slide:
            source.close()

        if kind == "png":
            if is_slide:
                raise unprocessable("A slide's label must be polygons (ASAP XML or JSON); masks are for PNG/JPEG tiles")
            mask = read_label_mask(label_filename, dims)
            payload, ext, count = self._mask_png(mask), ".png", int(len(np.unique(mask)) - (mask.min() == 0))
        else:
            shapes = parse_asap_xml(raw) if kind == "xml" else parse_json(raw)
            polygons = check_shapes(shapes, dims)
            count = len(polygons)
            if is_slide:
                doc = {"format": POLYGON_FORMAT, "label": NUCLEUS.name, "size": list(dims), "polygons": polygons}
                payload, ext = json.dumps(doc).encode(), ".json"
            else:
                payload, ext = self._mask_png(rasterize(polygons, (dims[1], dims[0]))), ".png"
        self._write_label(image_id, label_tag, label_info, payload, ext)
        logger.info("Saved label %s/%s%s (%d nuclei)", label_tag, image_id, ext, count)
        return image_id

    def restore_label_file(self, image_id: str, path: str, tag: str, info: dict[str, Any]) -> None:
        """A kept slide label is this server's polygon document, which ``save_label`` does not take as an
        upload: it is stored as it was once it still fits the slide's size; a tile's PNG mask is saved again."""
        raw = Path(path).read_bytes()
        if not path.endswith(".json"):
            return self.save_label(image_id, path, tag, info)
        doc = json.loads(raw)
        source = open_source(LocalDatastore.get_image_uri(self, image_id))
        dims = source.dimensions
        if isinstance(source, SlideSource):
            source.close()
        if list(doc.get("size", [])) != list(dims):
            raise unprocessable(
                f"The kept label was drawn on a slide of size {doc.get('size')}; image {image_id!r} is {list(dims)} now"
            )
        self._write_label(image_id, tag, check_save_params(info, "Restore label"), raw, ".json")
        return None

    @staticmethod
    def _mask_png(mask: np.ndarray) -> bytes:
        if mask.max() > np.iinfo(np.uint16).max:
            raise unprocessable(f"{int(mask.max())} nuclei do not fit a 16-bit mask")
        if mask.min() < 0:
            raise unprocessable("Mask values must be non-negative instance ids")
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint16)).save(buf, format="PNG")
        return buf.getvalue()

    def _write_label(self, image_id: str, tag: str, info: dict[str, Any], payload: bytes, ext: str) -> None:
        label_dir = Path(seam.local_index(self).label_path(tag))
        label_dir.mkdir(parents=True, exist_ok=True)
        name = self._filename(image_id, ext)
        fd, tmp = staged_beside(label_dir / name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            with self._changing_records():
                obj = self._present(image_id)  # the record as it is now (``CheckedLocalDatastore.save_label``)
                previous = obj.labels.get(tag)
                os.replace(tmp, label_dir / name)
                if previous is not None and previous.ext != ext:
                    (label_dir / self._filename(image_id, previous.ext)).unlink(missing_ok=True)
                stored = dict(info or {})
                stored["ts"] = int(time.time())
                stored["name"] = name
                stored[AUTHOR_FIELD] = user().name
                obj.labels[tag] = DataModel(info=stored, ext=ext)
                self._update_datastore_file(lock=False)
                self._record_version(image_id, tag, label_dir / name, stored)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
