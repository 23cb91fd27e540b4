"""MONAI Label infer tasks: ``nuclei`` (every nucleus of a tile or region) and ``nuclick`` (clicked ones)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from appcore.errors import bad_request, too_large
from pathology.annotations import monai_annotation
from pathology.nuclick import clicked_nuclei, parse_clicks
from pathology.postprocess import instance_polygons, polygon_area
from pathology.predict import instances, predict_maps
from pathology.spec import NUCLEUS, NucleiSpec
from pathology.weights import load_network, serving_device
from pathology.wsi import RegionSource, SlideSource, TiledResult, check_region, open_source, run_tiled

logger = logging.getLogger(__name__)

# Nuclick reads this much around each click: more than the largest nucleus at 40x.
CLICK_WINDOW = 96


def _int(request: dict[str, Any], key: str, default: int, minimum: int) -> int:
    raw = request.get(key, default)
    if isinstance(raw, list | tuple):
        raw = raw[0] if raw else default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise bad_request(f"'{key}' must be an integer, got {raw!r}") from None
    if value < minimum:
        raise bad_request(f"'{key}' must be at least {minimum}, got {value}")
    return value


def write_instance_png(mask: np.ndarray) -> str:
    """A 16-bit PNG of an instance mask in a temporary file (the server deletes it after sending)."""
    if mask.max() > np.iinfo(np.uint16).max:
        raise bad_request(f"{int(mask.max())} nuclei do not fit a 16-bit mask; request a smaller region")
    fd, path = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    Image.fromarray(mask.astype(np.uint16)).save(path)
    return path


def write_annotation_json(result: dict[str, Any]) -> str:
    """This server's infer JSON (polygons in ``annotation``) in a temporary file, as a slide's label."""
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f)
    return path


# The largest region answered as an instance mask (int32 while it is built): 256 MB.
MAX_MASK_PIXELS = 8192 * 8192


class NucleiInfer(InferTask):
    """Nuclei instance segmentation, or (``nuclick=True``) the nuclei under the request's clicks.

    ``POST /infer/<name>`` answers a 16-bit instance mask of the tile (or of ``location``/``size``,
    at most ``MAX_MASK_PIXELS``) with ``output=image`` and the polygons in its JSON; a batch infer
    over a slide stores its polygons instead. The app's ``/infer/wsi_v2`` uses :meth:`annotate` for
    the polygons of a slide region.

    Args:
        spec: the network and post-processing settings.
        paths: candidate weight files, oldest first; the last one that exists is served.
        name: the model's name.
        nuclick: answer only clicked nuclei.
        tile: default core size of tiled inference (a request's ``tile_size`` wins).
        margin: context read around each tile, wider than a nucleus.
    """

    def __init__(
        self,
        spec: NucleiSpec,
        paths: list[str],
        *,
        name: str,
        nuclick: bool = False,
        tile: int = 1024,
        margin: int = 64,
    ) -> None:
        description = (
            "Interactive nuclei: the nucleus under each foreground click; background clicks cut away"
            if nuclick
            else "Nuclei instance segmentation on H and E tiles and slides (UNet foreground + distance map, watershed)"
        )
        super().__init__(
            type=InferType.ANNOTATION if nuclick else InferType.SEGMENTATION,
            labels=NUCLEUS.name,
            dimension=2,
            description=description,
        )
        self.spec, self.name, self.nuclick = spec, name, nuclick
        self._paths = [Path(p) for p in paths]
        self._tile, self._margin = tile, margin
        self._lock = threading.Lock()
        self._loaded: tuple[Path, float, torch.nn.Module] | None = None

    # -- weights ---------------------------------------------------------------------------------
    def get_path(self, validate: bool = True) -> str | None:
        existing = [p for p in self._paths if p.exists()]
        return str(existing[-1]) if existing else None

    def network(self) -> torch.nn.Module | None:
        """The served network, reloaded when a training run has published new weights."""
        path = self.get_path()
        if path is None:
            return None
        mtime = os.path.getmtime(path)
        with self._lock:
            if self._loaded is None or self._loaded[0] != Path(path) or self._loaded[1] != mtime:
                self._loaded = (Path(path), mtime, load_network(self.spec, path, serving_device()))
                logger.info("%s: loaded %s", self.name, path)
            return self._loaded[2]

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["labels"] = {NUCLEUS.name: NUCLEUS.id}
        info["pathology"] = True
        info["nuclick"] = self.nuclick
        info["trained"] = self.get_path() is not None
        info["colors"] = {NUCLEUS.name: NUCLEUS.hex_color}
        return info

    # -- inference -------------------------------------------------------------------------------
    def _segment(self, network: torch.nn.Module | None) -> Callable[[np.ndarray], np.ndarray]:
        def segment(rgb: np.ndarray) -> np.ndarray:
            if network is None:
                return np.zeros(rgb.shape[:2], dtype=np.int32)
            return instances(self.spec, predict_maps(network, self.spec, rgb))

        return segment

    def _clicked(self, source: RegionSource, region: tuple[int, int, int, int], request: dict[str, Any]) -> TiledResult:
        fg = parse_clicks(request.get("foreground"), "foreground")
        bg = parse_clicks(request.get("background"), "background")
        x0, y0, w, h = region
        inside = [(x, y) for x, y in fg if x0 <= x < x0 + w and y0 <= y < y0 + h]
        if not inside:
            raise bad_request(
                f"'{self.name}' needs at least one foreground click [x, y] inside the region {list(region)}; "
                f"got foreground {fg}"
            )
        mask = np.zeros((h, w), dtype=np.int32)
        network = self.network()
        polygons: list = []
        for cx, cy in inside if network is not None else []:
            if mask[cy - y0, cx - x0]:
                continue
            wx, wy = max(cx - CLICK_WINDOW, x0), max(cy - CLICK_WINDOW, y0)
            ww, wh = min(cx + CLICK_WINDOW, x0 + w) - wx, min(cy + CLICK_WINDOW, y0 + h) - wy
            rgb = source.read(wx, wy, ww, wh)
            maps = predict_maps(network, self.spec, rgb)
            local = clicked_nuclei(
                instances(self.spec, maps),
                maps.foreground,
                [(cx - wx, cy - wy)],
                [(bx - wx, by - wy) for bx, by in bg],
            )
            view = mask[wy - y0 : wy - y0 + wh, wx - x0 : wx - x0 + ww]
            new = (local > 0) & (view == 0)
            if not new.any():
                continue
            view[new] = int(mask.max()) + 1
            for poly in instance_polygons(new.astype(np.int32)).values():
                polygons.append([[px + wx, py + wy] for px, py in poly])
        return TiledResult(polygons, mask, len(inside))

    def annotate(
        self, source: RegionSource, region: tuple[int, int, int, int], request: dict[str, Any], *, with_mask: bool
    ) -> TiledResult:
        """Nuclei of ``region`` (polygons in image coordinates; the region's mask if ``with_mask``)."""
        if _int(request, "level", 0, 0) != 0:
            raise bad_request("Only level 0 (full resolution) is served; send level 0 and level-0 coordinates")
        if self.nuclick:
            return self._clicked(source, region, request)
        tile = _int(request, "tile_size", self._tile, 64)
        result = run_tiled(
            source, region, self._segment(self.network()), tile=tile, margin=self._margin, with_mask=with_mask
        )
        # QuPath sends min_poly_area (pixels); the mask keeps every nucleus, the polygons honour it.
        min_area = _int(request, "min_poly_area", 0, 0)
        if min_area:
            result.polygons = [p for p in result.polygons if polygon_area(p) >= min_area]
        return result

    def result_json(self, result: TiledResult, region: tuple[int, int, int, int], seconds: float) -> dict[str, Any]:
        trained = self.get_path() is not None
        out: dict[str, Any] = {
            "annotation": monai_annotation(result.polygons, NUCLEUS.name, NUCLEUS.color),
            "count": len(result.polygons),
            "location": list(region[:2]),
            "size": list(region[2:]),
            "tiles": result.tiles,
            "model_trained": trained,
            "latencies": {"total": round(seconds, 3), "pre": 0.0, "infer": round(seconds, 3), "post": 0.0},
        }
        if not trained:
            out["message"] = f"Model '{self.name}' has no trained weights yet: save labels and POST /train/nuclei"
        return out

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        start = time.perf_counter()
        source = open_source(request["image"])
        # A slide's stored label is polygons (the datastore keeps no slide masks): batch infer, which
        # saves what this returns, gets them instead of a mask of the whole slide.
        polygons_only = isinstance(source, SlideSource) and bool(request.get("save_label"))
        try:
            region = check_region(request.get("location"), request.get("size"), source.dimensions)
            if not polygons_only and region[2] * region[3] > MAX_MASK_PIXELS:
                raise too_large(
                    f"A mask of {region[2]} x {region[3]} pixels is over the {MAX_MASK_PIXELS} answered as an "
                    "image; send a smaller location/size, or POST /infer/wsi/<model> for the polygons"
                )
            result = self.annotate(source, region, request, with_mask=not polygons_only)
        finally:
            close = getattr(source, "close", None)
            if close:
                close()
        result_json = self.result_json(result, region, time.perf_counter() - start)
        if polygons_only:  # the polygons go to the file; the task's result (logged in full) says how many
            return write_annotation_json(result_json), {k: v for k, v in result_json.items() if k != "annotation"}
        mask = result.mask if result.mask is not None else np.zeros(region[:1:-1], dtype=np.int32)
        return write_instance_png(mask), result_json
