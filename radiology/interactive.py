"""The interactive (``deepedit``-type) model of every radiology model: clicks in, a label out.

``<model>_interactive`` takes MONAI Label's DeepEdit contract (``radiology.clicks``): clicks as voxel
indices of the image as sent, keyed by label name or ``background``, every click of the session in
each request. With no click it answers what the automatic model answers. With clicks, the model's
click engine (``ENGINES``, one line per model) segments each clicked label, refining the automatic
proposal where the model is trained.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from appcore.errors import unprocessable
from radiology.clicks import ClickEngine, Clicks
from radiology.graphcut import BACKGROUND, GeodesicGraphCut
from radiology.infer import SegmentationInfer, restore_nifti_header
from radiology.spec import ModelSpec

logger = logging.getLogger(__name__)

SUFFIX = "_interactive"
"""``<model>_interactive`` is the interactive model of ``<model>``."""


def graph_cut_engine(spec: ModelSpec, served: Sequence[Path] = ()) -> ClickEngine:
    """The generic engine: graph cut with a geodesic prior from the clicks (``radiology.graphcut``)."""
    return GeodesicGraphCut(spec.labels.name_to_id())


def hippocampus_engine(spec: ModelSpec, served: Sequence[Path] = ()) -> ClickEngine:
    """The click-conditioned hippocampus network (``radiology.clicknet``) on the served automatic weights."""
    from radiology.clicknet import hippocampus_clicks

    return hippocampus_clicks(automatic_weights=list(served) or [spec.shipped_weights_path])


# The click engine of each model, one line per model; a model not listed gets the generic engine.
# An engine factory takes the model and its served automatic weights (candidates, oldest first).
ENGINES: dict[str, Callable[[ModelSpec, Sequence[Path]], ClickEngine]] = {
    "hippocampus": hippocampus_engine,
    "organs_ct": graph_cut_engine,
}


def click_engine(spec: ModelSpec, served: Sequence[Path] = ()) -> ClickEngine:
    """The click engine registered for ``spec`` (the generic one if none is)."""
    return ENGINES.get(spec.name, graph_cut_engine)(spec, served)


def interactive_name(model: str) -> str:
    return f"{model}{SUFFIX}"


def base_model(name: str) -> str:
    """The automatic model an interactive or scribbles model's name refers to (``name`` itself otherwise)."""
    for suffix in (SUFFIX, "_scribbles"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _coordinate(value: Any) -> int | None:
    """A voxel index given as a JSON integer (or a float with no fraction, as some viewers send)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _looks_like_clicks(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, list | tuple) for p in value)


def parse_clicks(params: Mapping[str, Any], spec: ModelSpec, shape: tuple[int, ...], max_clicks: int) -> Clicks:
    """The clicks of an infer request's parameters, checked against the model and the image's grid.

    Clicks are the parameters named after the model's labels or ``background``: lists of ``[i, j, k]``
    voxel indices of the image as sent. Slicer sends every label name the server lists, an empty list
    for those without clicks: an empty list under any name is no click. ``foreground`` (DeepGrow's
    name) holds clicks of the label named by ``label`` (Slicer's current segment).

    Raises:
        RequestError: 422 for a click outside the image, a coordinate that is not an integer, a point
            that is not three coordinates, clicks under a name the model does not have, or more than
            ``max_clicks`` clicks in the request; the message says which and how to fix it.
    """
    names = list(spec.labels.name_to_id())
    valid = [*names, BACKGROUND]
    raw: dict[str, Any] = {}
    for key, value in params.items():
        if key in valid:
            raw[key] = value
        elif key == "foreground" and value:
            label = params.get("label_name", params.get("label"))
            if label not in names:
                raise unprocessable(
                    f"'foreground' clicks need 'label' naming one of the model's labels {names}, got {label!r}"
                )
            raw[label] = [*raw.get(label, []), *value] if isinstance(value, list) else value
        elif _looks_like_clicks(value):
            raise unprocessable(
                f"Clicks under {key!r}, which is no label of model {spec.name!r}: send clicks under one of {valid}"
            )
    clicks: Clicks = {}
    total = 0
    for name, points in raw.items():
        if not isinstance(points, list):
            raise unprocessable(
                f"Clicks under {name!r} must be a list of [i, j, k] voxel indices, got {type(points).__name__}"
            )
        checked = []
        for point in points:
            if not isinstance(point, list | tuple) or len(point) != 3:
                raise unprocessable(f"A click under {name!r} must be three voxel indices [i, j, k], got {point!r}")
            voxel = [_coordinate(c) for c in point]
            if any(c is None for c in voxel):
                raise unprocessable(
                    f"A click under {name!r} has a coordinate that is not an integer voxel index: {point!r}; "
                    "send the voxel's indices in the image as sent (IJK), rounded"
                )
            if any(not 0 <= c < n for c, n in zip(voxel, shape, strict=True)):  # type: ignore[operator]
                raise unprocessable(
                    f"The click {point!r} under {name!r} is outside the image, whose voxel indices run "
                    f"from [0, 0, 0] to {[n - 1 for n in shape]}"
                )
            checked.append(tuple(voxel))
        total += len(checked)
        if checked:
            clicks[name] = checked  # type: ignore[assignment]
    if total > max_clicks:
        raise unprocessable(
            f"{total} clicks in one request; at most {max_clicks} are taken (--conf max_clicks): "
            "start a new session, or save the label and correct it by painting"
        )
    return clicks


class _EngineTask(BasicInferTask):
    """What the interactive and scribbles tasks share: the automatic model's proposal (cached per image
    file and served weights, so that every click of a session does not run the network again), the
    image as finite floats, and the answer written on the image's grid. ``__call__`` is the whole
    task (the proposal, then the engine): no MONAI transforms.

    Args:
        spec: the automatic model.
        automatic: its infer task, whose answer is the proposal.
        cache_size: proposals kept.
        kwargs: ``BasicInferTask``'s (type, labels, description).
    """

    def __init__(self, spec: ModelSpec, automatic: SegmentationInfer, *, cache_size: int = 4, **kwargs: Any) -> None:
        super().__init__(path=None, network=None, dimension=3, **kwargs)
        self.spec, self.automatic = spec, automatic
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data: Any = None) -> list:
        return []

    def post_transforms(self, data: Any = None) -> list:
        return []

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["modality"] = self.spec.modality
        info["automatic_model"] = self.spec.name
        return info

    @staticmethod
    def _image(source: nib.Nifti1Image) -> np.ndarray:
        """The voxels as float32, non-finite ones set to the lowest finite value."""
        image = np.asarray(source.dataobj, dtype=np.float32)
        finite = np.isfinite(image)
        if not finite.all():
            image = np.where(finite, image, image[finite].min() if finite.any() else 0.0)
        return image

    @staticmethod
    def _write(label: np.ndarray, image_path: str) -> str:
        """``label`` as a NIfTI file with the image's header, in a new temporary file."""
        fd, out = tempfile.mkstemp(suffix=".nii.gz")
        os.close(fd)
        nib.save(restore_nifti_header(np.asarray(label, np.uint8), image_path), out)
        return out

    def _proposal(self, request: dict[str, Any], image_path: str) -> np.ndarray | None:
        """The automatic model's label on the image, or ``None`` while it is untrained."""
        weights = self.automatic.get_path()
        if weights is None:
            return None
        stat, wstat = os.stat(image_path), os.stat(weights)
        key = (image_path, stat.st_mtime_ns, stat.st_size, weights, wstat.st_mtime_ns, wstat.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        out, _ = self.automatic({**request, "model": self.spec.name})
        try:
            proposal = np.asarray(nib.load(out).dataobj, dtype=np.uint8)
        finally:
            Path(out).unlink(missing_ok=True)
        with self._lock:
            self._cache[key] = proposal
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return proposal


class InteractiveInfer(_EngineTask):
    """``<model>_interactive``: the model's click engine on the automatic model's proposal.

    Args:
        spec: the automatic model.
        automatic: its infer task, whose answer is the proposal (and the answer without clicks).
        engine: segments the image from the clicks.
        max_clicks: the most clicks one request may carry.
        cache_size: proposals kept, per image file and served weights, so that every click of a
            session does not run the network again.
    """

    def __init__(
        self,
        spec: ModelSpec,
        automatic: SegmentationInfer,
        engine: ClickEngine,
        *,
        max_clicks: int,
        cache_size: int = 4,
    ) -> None:
        super().__init__(
            spec,
            automatic,
            cache_size=cache_size,
            type=InferType.DEEPEDIT,
            labels={**spec.labels.name_to_id(), BACKGROUND: 0},
            description=f"{spec.description}, corrected by clicks (DeepEdit contract)",
        )
        self.engine = engine
        self.max_clicks = max_clicks

    def check_request(self, request: Mapping[str, Any], shape: tuple[int, ...]) -> None:
        """422 for bad clicks, before any work (``parse_clicks``)."""
        parse_clicks(request, self.spec, shape, self.max_clicks)

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["trained"] = self.automatic.get_path() is not None
        info["spacing"] = list(self.spec.spacing)
        info["colors"] = {label.name: label.hex_color for label in self.spec.labels}
        info["engine"] = type(self.engine).__name__
        info["max_clicks"] = self.max_clicks
        return info

    def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[str, dict[str, Any]]:
        image_path = str(request["image"])
        source = nib.load(image_path)
        clicks = parse_clicks(request, self.spec, tuple(source.shape[:3]), self.max_clicks)
        automatic = {**request, "model": self.spec.name}
        if not clicks:
            out, result = self.automatic(automatic)
            result.update({"clicks": 0, "label_names": self.labels})
            return out, result
        proposal = self._proposal(automatic, image_path)
        image = self._image(source)
        label = self.engine.segment(image, source.affine, clicks, proposal)
        if label.shape != image.shape:
            raise RuntimeError(f"Click engine answered shape {label.shape} for an image of shape {image.shape}")
        return self._write(label, image_path), {
            "model_trained": proposal is not None,
            "clicks": sum(len(v) for v in clicks.values()),
            "engine": type(self.engine).__name__,
            "label_names": self.labels,
        }


def automatic_proposal(spec: ModelSpec) -> Callable[[Path], np.ndarray] | None:
    """For benchmarks: the automatic model's label on an image file with its shipped weights
    (``None`` for a model that ships none)."""
    path = spec.shipped_weights_path
    if path is None:
        return None
    task = SegmentationInfer(spec, [str(path)], cpu_bf16=False)

    def propose(image: Path) -> np.ndarray:
        out, _ = task({"image": str(image), "device": "cpu"})
        try:
            return np.asarray(nib.load(out).dataobj, dtype=np.uint8)
        finally:
            Path(out).unlink(missing_ok=True)

    return propose


SCRIBBLES_SUFFIX = "_scribbles"
"""``<model>_scribbles`` refines one label of ``<model>`` from painted strokes."""

# MONAI Label's scribbles segments, by the names Slicer gives them in ``label_info``.
FOREGROUND_SCRIBBLES, BACKGROUND_SCRIBBLES = "foreground_scribbles", "background_scribbles"


def scribbles_name(model: str) -> str:
    return f"{model}{SCRIBBLES_SUFFIX}"


def scribble_values(params: Mapping[str, Any], spec: ModelSpec) -> tuple[int, int, dict[str, int]]:
    """The label values of the foreground and background strokes and of each segment in a scribbles
    volume: by ``label_info`` (``[{"name": ..., "id": ...}]``, as Slicer sends it), else MONAI
    Label's defaults (background ``len(labels) + 1``, foreground ``len(labels) + 2``)."""
    n = len(spec.labels.name_to_id())
    info = params.get("label_info") or []
    if not isinstance(info, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and _coordinate(e.get("id")) is not None for e in info
    ):
        raise unprocessable(
            'Infer parameter label_info must be a list of {"name": ..., "id": ...} (segment names and their '
            f"values in the scribbles volume), got {info!r}"
        )
    ids = {e["name"]: _coordinate(e["id"]) for e in info}
    return ids.get(FOREGROUND_SCRIBBLES, n + 2), ids.get(BACKGROUND_SCRIBBLES, n + 1), ids  # type: ignore[return-value]


class ScribblesInfer(_EngineTask):
    """``<model>_scribbles``: one label of the model refined from foreground and background strokes.

    MONAI Label's scribbles contract: the request's ``label`` file is a label volume on the image's
    grid holding the strokes (and, as Slicer sends it, every other segment too), ``label_info`` names
    its values, ``selected_label_name`` the label to refine (the model's only label by default). The
    label as it is now is that segment's voxels in the volume when it is there, else the automatic
    model's proposal. The answer is that label alone, 1 on the image's grid.

    Args:
        spec: the model.
        automatic: its infer task (the proposal where the volume does not hold the label).
        engine: refines the label (``GeodesicGraphCut.refine``).
    """

    def __init__(self, spec: ModelSpec, automatic: SegmentationInfer, engine: GeodesicGraphCut) -> None:
        super().__init__(
            spec,
            automatic,
            type=InferType.SCRIBBLES,
            labels=spec.labels.name_to_id(),
            description=f"{spec.description}: one label refined from foreground/background scribbles",
        )
        self.engine = engine

    def check_request(self, request: Mapping[str, Any], shape: tuple[int, ...]) -> None:
        """422 for a request the scribbles cannot refine, before any work."""
        self.selected(request)
        scribble_values(request, self.spec)
        load_scribbles(request.get("label"), shape)

    def selected(self, params: Mapping[str, Any]) -> str:
        names = list(self.spec.labels.name_to_id())
        name = params.get("selected_label_name", names[0] if len(names) == 1 else None)
        if name not in names:
            raise unprocessable(
                f"Name the label the scribbles refine in 'selected_label_name', one of {names}; got {name!r}"
            )
        return str(name)

    def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[str, dict[str, Any]]:
        image_path = str(request["image"])
        source = nib.load(image_path)
        name = self.selected(request)
        strokes = load_scribbles(request.get("label"), tuple(source.shape[:3]))
        fg_value, bg_value, ids = scribble_values(request, self.spec)
        label_id = self.spec.labels.name_to_id()[name]
        if name in ids:
            proposal: np.ndarray | None = strokes == ids[name]
        else:
            automatic = self._proposal(request, image_path)
            proposal = None if automatic is None else automatic == label_id
        image = self._image(source)
        mask = self.engine.refine(image, source.affine, strokes == fg_value, strokes == bg_value, proposal)
        return self._write(mask, image_path), {
            "selected_label_name": name,
            "label_names": {name: 1},
            "foreground_voxels": int((strokes == fg_value).sum()),
            "background_voxels": int((strokes == bg_value).sum()),
        }


def load_scribbles(path: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The scribbles volume of a request (its uploaded ``label`` file), checked against the image's grid.

    Raises:
        RequestError: 422 when there is none, it is no readable NIfTI, or its grid is not the image's.
    """
    if not isinstance(path, str) or not os.path.isfile(path):
        raise unprocessable("Send the scribbles as a label volume in the form field 'label' (NIfTI, the image's grid)")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for a file it cannot read
        raise unprocessable(f"The scribbles volume cannot be read as NIfTI: {type(e).__name__}: {e}") from None
    grid = tuple(int(n) for n in img.shape)
    if grid[:3] != tuple(shape) or any(n != 1 for n in grid[3:]):  # judged by the header, before any voxel
        raise unprocessable(f"The scribbles volume has shape {grid}; the image's is {tuple(shape)}")
    try:
        data = np.asarray(img.dataobj).reshape(shape)
    except Exception as e:
        raise unprocessable(f"The scribbles volume cannot be read as NIfTI: {type(e).__name__}: {e}") from None
    return np.rint(np.nan_to_num(data)).astype(np.int64)
