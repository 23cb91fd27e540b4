"""The OHIF labeling panel's routes (``/labeling/...``): next case, the model's proposal, save, status.

The panel (``viewers_config/ohif/extension/labeling.js``) runs in OHIF 3.13's segmentation mode. A
label travels between it and the server as per-slice frames named by SOP Instance UID (the
viewer's labelmap images each reference one source image), so neither side needs the other's voxel
order or orientation: a frame is ``rows x columns`` uint8, row-major, as the DICOM pixel data.

- ``POST /labeling/next?strategy=S&client_id=C``: the strategy's pick, reserved for ``C`` as
  ``/activelearning`` reserves it, with its study, model and labels; the proposal starts computing
  at once, so it is often ready when the viewer has loaded the study. It also names the case the
  strategy would hand the same client next (``ahead``, reserved for no one) and computes that
  case's proposal once this one's is done (``--conf proposals_ahead``), so the next is ready too.
- ``GET /labeling/proposal?image=UID``: the series' ``final`` label where it has one, else the served
  model's prediction, as frames; ``base`` says what the PACS held as the label then.
- ``PUT /labeling/label?image=UID``: the viewer's labelmap, stored as the ``final`` label (a SEG in
  the PACS, named, coloured and coded from the model's labels) unless someone saved the series since
  ``base`` (409, nothing stored). Answers the progress (labelled / total).
- ``GET /labeling/status``: progress, strategies, each model's served version, running training and
  its last run (validation Dice, published or not).
- ``POST /labeling/clicks?image=UID``: the panel's clicks (each on an image of the series, by SOP
  Instance UID, row and column) run through ``<model>_interactive``; answers its label as frames.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydantic import BaseModel, Field, StrictInt
from pydicom.dataset import Dataset

from appcore import seam
from appcore.dicom import stow
from appcore.dicom.proposals import ProposalCache
from appcore.dicom.seg import seg_to_label
from appcore.dicom.timing import Stopwatch
from appcore.errors import RequestError, conflict, not_found, unprocessable
from appcore.history import PROPOSAL_KEY, SERVED, not_served, proposal_of

logger = logging.getLogger(__name__)

BACKGROUND = "background"
"""The clicks' name for the background, as MONAI Label's DeepEdit contract names it."""

# Proposals held (the cases handed out and the ones computed ahead), by (series, model, served
# version); the oldest are dropped.
_KEEP_PROPOSALS = 16
# Clients whose next case is remembered (to compute its proposal again after new weights).
_KEEP_AHEAD = 256


class LabelFrames(BaseModel):
    """A labelmap as the panel sends it: one ``rows x columns`` uint8 frame per source instance."""

    model: str = Field(description="the model whose labels the segments are")
    instances: list[str] = Field(description="SOP Instance UIDs, one per frame, in the order of the frames")
    rows: int = Field(gt=0, le=4096)
    columns: int = Field(gt=0, le=4096)
    segments: dict[str, str] = Field(description="segment index (the voxel value) -> segment name")
    base: str = Field(description="the label the case had when handed out: the proposal's 'base'")
    data: str = Field(description="base64 of the zlib-compressed frames")
    client_id: str = ""
    proposal: dict[str, Any] | None = Field(
        None,
        description="the model's proposal the label was corrected from: its 'model' and 'version' (the proposal "
        "answer's), kept with the label's version (appcore.history); left out when the case opened on a saved label",
    )


def encode_frames(volume: np.ndarray) -> str:
    """``volume`` (``[column, row, slice]``, the server's label order) as base64 of zlib-compressed
    uint8 frames ``[slice][row][column]``."""
    frames = np.ascontiguousarray(volume.astype(np.uint8).transpose(2, 1, 0))
    return base64.b64encode(zlib.compress(frames.tobytes(), 1)).decode("ascii")


def decode_frames(payload: LabelFrames, sop_instance_uids: Sequence[str], shape: tuple[int, int, int]) -> np.ndarray:
    """The panel's frames as a ``[column, row, slice]`` volume in the series' slice order.

    Raises:
        RequestError: 422 when the frames are not the series' instances and grid, or not readable.
    """
    columns, rows, slices = shape
    if (payload.rows, payload.columns) != (rows, columns):
        raise unprocessable(
            f"The label's frames are {payload.rows} x {payload.columns} (rows x columns) and the series' images "
            f"{rows} x {columns}: the labelmap was made on another series; open the case again"
        )
    unknown = sorted(set(payload.instances) - set(sop_instance_uids))
    missing = len(set(sop_instance_uids) - set(payload.instances))
    if unknown or missing or len(payload.instances) != len(sop_instance_uids):
        raise unprocessable(
            f"The label must have one frame per image of the series ({slices}); it has {len(payload.instances)}, "
            f"{len(unknown)} of another series (such as {unknown[:1]}) and {missing} of the series' images missing"
        )
    expected = slices * rows * columns
    try:
        packed = base64.b64decode(payload.data, validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, expected + 1)  # never more than the grid holds, whatever is sent
    except (ValueError, zlib.error) as e:
        raise unprocessable(f"The label's data is not base64 of zlib-compressed bytes: {e}") from None
    if len(raw) != expected or not inflater.eof:
        raise unprocessable(
            f"The label's data holds {len(raw)}{'+' if not inflater.eof else ''} bytes once decompressed; "
            f"{slices} frames of {rows} x {columns} are {expected}"
        )
    frames = np.frombuffer(raw, dtype=np.uint8).reshape(slices, rows, columns)
    order = {uid: i for i, uid in enumerate(payload.instances)}
    ordered = frames[[order[uid] for uid in sop_instance_uids]]
    return ordered.transpose(2, 1, 0)


def segment_values(segments: dict[str, str], labels: Any, model: str) -> np.ndarray:
    """A lookup table from the viewer's segment index to the model's label id, matched by name
    (ignoring case). A segment of another name is a 422 that lists the model's label names."""
    by_name = {label.name.lower(): label.id for label in labels}
    lut = np.zeros(256, dtype=np.uint8)
    for index, name in segments.items():
        if not index.isdigit() or not 0 < int(index) < 256:
            raise unprocessable(f"Segment index {index!r} is not a labelmap value (1 to 255)")
        label_id = by_name.get(name.strip().lower())
        if label_id is None:
            raise unprocessable(
                f"Segment {name!r} is none of {model!r}'s labels {[label.name for label in labels]}: rename it to "
                "one of them or delete it, then save again"
            )
        lut[int(index)] = label_id
    return lut


class Click(BaseModel):
    """One click of the panel: a pixel of one of the series' images, for a label or for the background."""

    label: str = Field(description="the label clicked for (a label name of the model), or 'background'")
    instance: str = Field(description="SOP Instance UID of the image clicked on")
    row: StrictInt = Field(description="the pixel's row in that image (0 at the top)")
    column: StrictInt = Field(description="the pixel's column in that image (0 at the left)")


class ClickSession(BaseModel):
    """Every click of the panel's session so far (the DeepEdit contract sends them all each time)."""

    model: str = Field(description="the case's model; its interactive model answers")
    clicks: list[Click]
    client_id: str = ""


def click_voxels(
    clicks: Sequence[Click], sop_instance_uids: Sequence[str], shape: tuple[int, int, int], names: Sequence[str]
) -> dict[str, list[list[int]]]:
    """The panel's clicks as the DeepEdit contract's clicks: ``[column, row, slice]`` voxel indices of the
    series' volume (the server's label order, slices as ``sop_instance_uids``), keyed by label name or
    ``background``; a label without clicks gets an empty list.

    Raises:
        RequestError: 422 for a click for another name, on an image that is not one of the series', or
            off the image's rows and columns; the message says which click and what is valid.
    """
    columns, rows, _ = shape
    slice_of = {uid: k for k, uid in enumerate(sop_instance_uids)}
    valid = [*names, BACKGROUND]
    by_name = {name.lower(): name for name in valid}  # as a save matches segment names: ignoring case
    voxels: dict[str, list[list[int]]] = {name: [] for name in valid}
    for n, click in enumerate(clicks, start=1):
        where = f"Click {n} ({click.label!r} on image {click.instance}, row {click.row}, column {click.column})"
        name = by_name.get(click.label.strip().lower())
        if name is None:
            raise unprocessable(f"{where} is for no label of the model: click for one of {valid}")
        k = slice_of.get(click.instance)
        if k is None:
            raise unprocessable(
                f"{where} is on an image that is not one of the case's series ({len(sop_instance_uids)} images): "
                "click on the case's series, or open the case again"
            )
        if not (0 <= click.row < rows and 0 <= click.column < columns):
            raise unprocessable(
                f"{where} is outside the image, whose rows run from 0 to {rows - 1} and columns from 0 to "
                f"{columns - 1}: click on the image"
            )
        voxels[name].append([click.column, click.row, k])
    return voxels


class Labeling:
    """The panel's server side, over the running radiology app and its DICOMweb datastore."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="proposal")
        # One proposal ahead at a time, each after the case handed out has its own: on a busy CPU
        # the case the annotator is waiting for comes first.
        self._ahead_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proposal-ahead")
        self._proposals = ProposalCache(self._executor, keep=_KEEP_PROPOSALS)
        self._ahead: dict[str, str] = {}  # client_id -> the case its strategy would hand it next
        self._lock = threading.Lock()
        self._saved_since_training: dict[str, int] = {}

    # -- the app -----------------------------------------------------------------------------------
    @staticmethod
    def app() -> Any:
        from monailabel.interfaces.utils.app import app_instance

        return app_instance()

    def store(self) -> Any:
        from appcore.dicom.datastore import DicomWebDatastore

        store = self.app().datastore()
        if not isinstance(store, DicomWebDatastore):
            raise conflict(
                "The OHIF labeling panel works on a PACS: start the server with --studies http://.../dicom-web "
                "(make serve does)"
            )
        return store

    def model_for(self, image_id: str) -> tuple[str, Any, dict[str, str]]:
        info = self.store().series_info(image_id)
        model, labels = self.app().dicom_labels({}, info["Modality"])
        return model, labels, info

    def progress(self) -> dict[str, int]:
        store = self.store()
        labeled = len(store.get_labeled_images())
        return {"labeled": labeled, "total": labeled + len(store.get_unlabeled_images())}

    # -- next case ---------------------------------------------------------------------------------
    def next_case(self, strategy: str, client_id: str) -> dict[str, Any]:
        if not client_id.strip():
            raise unprocessable("client_id is empty: the panel sends the annotator's name, which reserves the case")
        watch = Stopwatch(f"Next case ({strategy}) for {client_id}")
        request = {"strategy": strategy, "client_id": client_id, "k": 1}
        with watch.stage("hand-out"):
            result = self.app().next_sample(request) or {}
        image = result.get("id")
        if not image:
            raise not_found(
                f"No case left for {client_id!r} with strategy {strategy!r}: every series is labelled, reserved by "
                "another annotator or cannot be loaded"
            )
        with watch.stage("series info"):
            model, labels, info = self.model_for(image)
        with watch.stage("proposal started"):
            current, _ = self._proposal_future(image, model, "hand-out")  # computed while the viewer loads
        ahead = None
        if getattr(self.app().settings, "proposals_ahead", True):
            with watch.stage("next case announced"):
                ahead = self._announce_next(request, image)
        if ahead:
            self._compute_ahead(ahead, after=current)
        with watch.stage("progress"):
            progress = self.progress()
        return {
            "image": image,
            "study": info["StudyInstanceUID"],
            "model": model,
            "labels": _labels_json(labels),
            "progress": progress,
            "ahead": ahead,
            "timings": watch.done(),
        }

    def _announce_next(self, request: dict[str, Any], image: str) -> str | None:
        """The case the strategy would hand this client next (``RankedStrategy.peek``), or None (a
        strategy that cannot say, nothing left); remembered for the client."""
        strategy = seam.strategies(self.app()).get(request["strategy"])
        peek = getattr(strategy, "peek", None)
        if peek is None:
            return None
        try:
            ahead = peek(request, self.store(), exclude={image})
        except Exception:  # a guess only: the hand-out itself succeeded
            logger.exception("The next case after %s could not be guessed", image)
            return None
        with self._lock:
            self._ahead.pop(request["client_id"], None)
            if ahead:
                self._ahead[request["client_id"]] = ahead
                while len(self._ahead) > _KEEP_AHEAD:
                    self._ahead.pop(next(iter(self._ahead)))
        return ahead

    def _compute_ahead(self, image: str, after: Future[dict[str, Any]] | None = None) -> None:
        """Start ``image``'s proposal (for the served version) once ``after`` is done, in the background."""

        def run() -> None:
            if after is not None:
                with contextlib.suppress(Exception):  # that case's own request reports its failure
                    after.result()
            try:
                model, _, _ = self.model_for(image)
                self._proposal_future(image, model, "ahead")[0].result()
            except Exception as e:  # the case's own request computes it again and reports why
                logger.warning("Proposal of series %s not computed ahead: %s", image, e)

        self._ahead_executor.submit(run)

    # -- proposal ----------------------------------------------------------------------------------
    def _served_version(self, model: str) -> int:
        return int(self.app().version_store(model).served_version() or 0)

    def _proposal_future(self, image: str, model: str, why: str) -> tuple[Future[dict[str, Any]], bool]:
        """The served version's proposal of ``image``: the one computed or being computed, else started
        now (``why``: by whom, answered as ``computed_by``); and whether it was started before."""
        version = self._served_version(model)
        return self._proposals.start((image, model, version), lambda: self._predict(image, model, version, why))

    def _predict(self, image: str, model: str, version: int, why: str) -> dict[str, Any]:
        started = time.perf_counter()
        with not_served():  # noted when a client is given it (``proposal``), which may be never
            result = self.app().infer({"model": model, "image": image})
        path = result.get("file") or result.get("label")
        try:
            volume = np.asarray(nib.load(path).dataobj, dtype=np.uint8)
        finally:
            if path:
                Path(path).unlink(missing_ok=True)
        seconds = round(time.perf_counter() - started, 3)
        logger.info("Proposal of series %s (%s v%d, %s) computed in %.2f s", image, model, version, why, seconds)
        return {"volume": volume, "version": version, "computed_by": why, "infer_s": seconds}

    def proposal(self, image: str) -> dict[str, Any]:
        watch = Stopwatch(f"Proposal of series {image}")
        store = self.store()
        with watch.stage("series info"):
            model, labels, info = self.model_for(image)
        with watch.stage("label in the PACS"):
            base = store.final_state(image)
        with watch.stage("series headers"):
            headers = store.source_headers(image)
        computed_by = None
        if base:
            with watch.stage("saved label read"):
                volume = np.asarray(nib.load(store.get_label_uri(image, "final")).dataobj, dtype=np.uint8)
            source, version = "final", None
        else:
            with watch.stage("model's proposal (waited)"):
                predicted = self._predicted(image, model)
            volume, source, version = predicted["volume"], "model", predicted["version"]
            computed_by = predicted["computed_by"]
            SERVED.note(image, model, version)
        columns, rows, slices = volume.shape
        with watch.stage("frames encoded"):
            data = encode_frames(volume)
        return {
            "image": image,
            "study": info["StudyInstanceUID"],
            "model": model,
            "labels": _labels_json(labels),
            "source": source,
            "version": version,
            "computed_by": computed_by,
            "base": base,
            "instances": [str(h.SOPInstanceUID) for h in headers],
            "rows": rows,
            "columns": columns,
            "data": data,
            "timings": watch.done(),
        }

    def _predicted(self, image: str, model: str) -> dict[str, Any]:
        """The served version's proposal, waited for; computed again when new weights (or the cache's
        bound) dropped the one being waited for."""
        for _ in range(3):
            future, _ = self._proposal_future(image, model, "request")
            try:
                return future.result()
            except CancelledError:
                continue
        return self._predict(image, model, self._served_version(model), "request")

    # -- save ----------------------------------------------------------------------------------------
    def save(self, image: str, payload: LabelFrames) -> dict[str, Any]:
        watch = Stopwatch(f"Save of series {image} from OHIF by {payload.client_id or 'anonymous'}")
        proposal_of({PROPOSAL_KEY: payload.proposal})  # 422 for a malformed one, before anything is decoded
        store = self.store()
        with watch.stage("series info"):
            model, labels, _ = self.model_for(image)
        if payload.model != model:
            raise unprocessable(f"Series {image} is labelled with {model!r}'s labels, not {payload.model!r}")
        with watch.stage("series headers"):
            uri = store.get_image_uri(image)
            grid = nib.load(uri)
            sops = [str(h.SOPInstanceUID) for h in store.source_headers(image)]
        with watch.stage("frames decoded"):
            frames = decode_frames(payload, sops, tuple(int(n) for n in grid.shape[:3]))
            lut = segment_values(payload.segments, labels, model)
            painted = {int(v) for v in np.flatnonzero(np.bincount(frames.ravel(), minlength=256))} - {0}
            unnamed = sorted(v for v in painted if not lut[v])
            if unnamed:
                raise unprocessable(
                    f"Labelmap values {unnamed} belong to no segment the label names ({payload.segments})"
                )
            volume = lut[frames]
        info = {"model": model, "client_id": payload.client_id or "anonymous", "saved_from": "ohif"}
        if payload.proposal is not None:
            info[PROPOSAL_KEY] = payload.proposal
        return self.store_final(image, volume, grid.affine, info, payload.base, watch)

    def store_final(
        self,
        image: str,
        volume: np.ndarray,
        affine: np.ndarray,
        info: dict[str, Any],
        base: str | None,
        watch: Stopwatch | None = None,
    ) -> dict[str, Any]:
        """Store ``volume`` (class ids, ``[column, row, slice]`` on the series' grid) as the series'
        ``final`` label: a SEG in the PACS written by the server, the datastore's label, a new version
        in the label history (``info`` recorded with it: ``model``, ``client_id``, ``saved_from``).

        Every save from the viewer comes here: the panel's (``save``) and OHIF's own export
        (``save_seg``). ``base``: the series' label when the case was handed out; someone's save
        since is a 409 and nothing is stored. ``None``: the last save wins (the history keeps the
        version it replaces). Answers the progress, whether a training started and the stages'
        seconds (``watch``'s, or a new watch's).
        """
        watch = watch or Stopwatch(f"Save of series {image} ({info.get('saved_from')}) by {info.get('client_id')}")
        store = self.store()
        with tempfile.TemporaryDirectory() as tmp:
            with watch.stage("label written"):
                path = Path(tmp) / "label.nii.gz"
                nib.save(nib.Nifti1Image(volume, affine), path)
            with watch.stage("checked, SEG built and stored, label kept"):
                if base is None:
                    store.save_label(image, str(path), "final", info)
                else:
                    store.save_final_if_unchanged(image, str(path), info, base, timings=watch)
        started = self._train_if_due(str(info["model"]))
        client = str(info.get("client_id"))
        with self._lock:
            ahead = self._ahead.get(client)
        if ahead:  # its proposal again if new weights were published since the hand-out (else a hit)
            self._compute_ahead(ahead)
        with watch.stage("answer (label in the PACS, progress)"):
            base, progress = store.final_state(image), self.progress()
        return {
            "image": image,
            "base": base,
            "progress": progress,
            "training_started": started,
            "timings": watch.done(),
        }

    def save_seg(self, seg: Dataset, study: str | None, client_id: str) -> dict[str, Any]:
        """A DICOM SEG that OHIF's own export stored (STOW-RS, ``appcore.dicom.stow``), saved as the
        ``final`` label of the series it segments, as the panel's save stores one (``store_final``;
        the last save wins). Answers ``store_final``'s answer with the SEG series the server wrote.

        Raises:
            RequestError: 422 for a SEG of a series the PACS does not hold (or none of the served
                models segments), whose frames do not fit the series' grid, or whose segments are not
                the model's labels; nothing is stored then.
        """
        series = stow.referenced_series(seg, study)
        try:
            model, labels, info = self.model_for(series)
        except RequestError as e:
            raise unprocessable(f"The SEG segments series {series}, which is not labelled here: {e.detail}") from None
        if info["StudyInstanceUID"] != str(seg.get("StudyInstanceUID", "")):
            raise unprocessable(
                f"The SEG is of study {seg.get('StudyInstanceUID')}, and the series it segments ({series}) of study "
                f"{info['StudyInstanceUID']}: a SEG belongs to its series' study"
            )
        store = self.store()
        grid = nib.load(store.get_image_uri(series))
        headers = store.source_headers(series)
        stow.check_seg_frames(seg, headers, series, len(list(labels)))
        sops = [str(h.SOPInstanceUID) for h in headers]
        positions = [[float(v) for v in h.ImagePositionPatient] for h in headers]
        try:
            volume = seg_to_label(seg, sops, labels, positions)
        except Exception as e:  # highdicom and pydicom raise many kinds on a SEG they cannot read
            logger.info("SEG %s for series %s refused: %r", seg.get("SOPInstanceUID"), series, e)
            raise unprocessable(f"The SEG cannot be read as a label of series {series}: {e}") from None
        received = {"SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID)}
        saved = {"model": model, "client_id": client_id, "saved_from": "ohif-export", "received_seg": received}
        answer = self.store_final(series, volume, grid.affine, saved, None)
        stored = store.get_label_info(series, "final").get("SegSeriesInstanceUID")
        return {**answer, "study": info["StudyInstanceUID"], "seg_series": stored}

    def _train_if_due(self, model: str) -> bool:
        """Start a training of ``model`` once ``--conf train_after_labels`` labels were saved from the
        viewer since the last one this counter started (0: never)."""
        every = int(getattr(self.app().settings, "train_after_labels", 0))
        with self._lock:
            self._saved_since_training[model] = self._saved_since_training.get(model, 0) + 1
            if not every or self._saved_since_training[model] < every or self.app().training_running(model):
                return False
            self._saved_since_training[model] = 0
        from monailabel.endpoints.train import run_model

        run_model(model, {})
        logger.info("%d labels saved from the viewer: training %s started", every, model)
        return True

    # -- clicks -------------------------------------------------------------------------------------
    def clicks(self, image: str, payload: ClickSession) -> dict[str, Any]:
        """The case's interactive model on every click of the panel's session, its answer as frames.

        Raises:
            RequestError: 422 for clicks of another model, or clicks ``click_voxels`` (the frames) or
                the interactive model (how many) refuses; nothing is stored either way.
        """
        store = self.store()
        model, labels, _ = self.model_for(image)
        if payload.model != model:
            raise unprocessable(f"Series {image} is labelled with {model!r}'s labels, not {payload.model!r}")
        app = self.app()
        interactive = interactive_model(app, model)
        shape = tuple(int(n) for n in nib.load(store.get_image_uri(image)).shape[:3])
        sops = [str(h.SOPInstanceUID) for h in store.source_headers(image)]
        voxels = click_voxels(payload.clicks, sops, shape, [label.name for label in labels])  # type: ignore[arg-type]
        result = app.infer({**voxels, "model": interactive, "image": image})
        volume = _answered_label(result)
        columns, rows, _ = volume.shape
        logger.info("%d clicks on series %s by %s", len(payload.clicks), image, payload.client_id or "anonymous")
        return {
            "image": image,
            "model": model,
            "interactive_model": interactive,
            "labels": _labels_json(labels),
            "clicks": [
                {**click.model_dump(), "voxel": voxel}
                for click, voxel in zip(payload.clicks, _in_click_order(payload.clicks, voxels), strict=True)
            ],
            "engine": (result.get("params") or {}).get("engine"),
            "instances": sops,
            "rows": rows,
            "columns": columns,
            "data": encode_frames(volume),
        }

    # -- status --------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        app = self.app()
        models = {}
        for name in seam.infers(app):
            if not app.has_weights(name):  # an interactive or scribbles model: its automatic model's weights
                continue
            trainer = seam.trainers(app).get(name)
            stats = trainer.stats() if trainer is not None else {}
            models[name] = {
                "served_version": self._served_version(name),
                "training": app.training_running(name),
                "last_run": stats.get("last_run"),
                # the best epoch's Dice as MONAI Label reports it: on the validation labels, or on the
                # training labels themselves when there are fewer than 5 (nothing held out)
                "best_metric": stats.get("best_metric"),
            }
        return {
            "progress": self.progress(),
            "strategies": sorted(seam.strategies(app)),
            "models": models,
            "train_after_labels": int(getattr(app.settings, "train_after_labels", 0)),
        }


def interactive_model(app: Any, model: str) -> str:
    """The name of ``model``'s interactive (DeepEdit-type) model among the app's infers.

    Raises:
        RequestError: 404 when the app serves none for ``model``.
    """
    from monailabel.interfaces.tasks.infer_v2 import InferType

    for name, task in seam.infers(app).items():
        if getattr(task, "type", None) == InferType.DEEPEDIT and task.info().get("automatic_model") == model:
            return str(name)
    raise not_found(f"Model {model!r} has no interactive (deepedit) model on this server: clicks cannot be answered")


def _answered_label(result: dict[str, Any]) -> np.ndarray:
    """The label file of an infer's result, read and removed."""
    path = result.get("file") or result.get("label")
    try:
        return np.asarray(nib.load(path).dataobj, dtype=np.uint8)
    finally:
        if path:
            Path(path).unlink(missing_ok=True)


def _in_click_order(clicks: Sequence[Click], voxels: dict[str, list[list[int]]]) -> list[list[int]]:
    """Each click's voxel, in the order of the clicks (``voxels`` holds them by label, in that order)."""
    taken = {name.lower(): iter(points) for name, points in voxels.items()}
    return [next(taken[click.label.strip().lower()]) for click in clicks]


def _labels_json(labels: Any) -> list[dict[str, Any]]:
    return [{"id": label.id, "name": label.name, "color": list(label.color)} for label in labels]


LABELING = Labeling()


# -- the routes (FastAPI runs these plain functions in worker threads) -----------------------------------
def next_case(strategy: str, client_id: str) -> dict[str, Any]:
    return LABELING.next_case(strategy, client_id)


def proposal(image: str) -> dict[str, Any]:
    return LABELING.proposal(image)


def save_label(image: str, payload: LabelFrames) -> dict[str, Any]:
    return LABELING.save(image, payload)


def status() -> dict[str, Any]:
    return LABELING.status()


def clicks(image: str, payload: ClickSession) -> dict[str, Any]:
    return LABELING.clicks(image, payload)


async def store_seg(request: Any, op: str, study: str | None) -> Any:
    """``POST /proxy/dicom/[wado/|stow/]studies[/{study}]`` (OHIF's Export > DICOM SEG > Save): the one
    SEG of the STOW-RS body saved as its series' ``final`` label (``Labeling.save_seg``), answered
    with the PS3.18 store response. The body is read up to ``--conf max_upload_mb`` (a 413 past it);
    the checks and the save run in a worker thread. The client's name is the ``client_id`` query
    parameter, else ``ohif``; the author is the request's user."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from appcore.errors import too_large

    limit_mb = int(LABELING.app().settings.max_upload_mb)
    query = dict(request.query_params)
    unknown = sorted(set(query) - {"client_id"})
    if unknown:
        raise unprocessable(f"Query parameter(s) {unknown} are not taken by a store; only client_id (your name)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_mb * 2**20:
            raise too_large(f"The STOW-RS body passed {limit_mb} MB, the limit for uploads (--conf max_upload_mb)")
        chunks.append(chunk)
    content_type = request.headers.get("content-type", "")

    def save() -> dict[str, Any]:
        content = stow.stow_part(content_type, b"".join(chunks))
        seg = stow.read_seg(content)
        saved = LABELING.save_seg(seg, study, query.get("client_id") or "ohif")
        stow.RECEIVED.remember(seg, content)  # OHIF reads it back (stow.ReceivedSegs says why)
        return {"seg": seg, **saved}

    saved = await run_in_threadpool(save)
    root = f"{str(request.base_url).rstrip('/')}/proxy/dicom/{op + '/' if op else ''}studies/{saved['study']}"
    answer = stow.store_answer(saved["seg"], root, f"{root}/series/{saved['seg_series']}")
    return JSONResponse(answer, media_type=stow.ANSWER_MEDIA_TYPE)
