"""A MONAI Label datastore backed by a DICOMweb PACS: series in, DICOM SEG out, a local cache between."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appcore import seam
from appcore.datastore import AllowedValues, CheckedLocalDatastore, check_save_params, saving_as
from appcore.dicom.client import DicomWebClient, OrthancAdmin, PacsUnavailable
from appcore.dicom.seg import SEG_MANUFACTURER, label_to_seg, seg_to_label
from appcore.dicom.series import SeriesRefused, load_series, series_geometry
from appcore.dicom.timing import Stopwatch, stage
from appcore.errors import RequestError, bad_request, conflict, not_found, unprocessable
from appcore.history import Origin
from appcore.labels import LabelSet
from appcore.validation import (
    Geometry,
    check_image_id,
    check_label_geometry,
    check_upload_size,
    label_from_buffer,
    load_nifti,
    validate_label_volume,
)

logger = logging.getLogger(__name__)

# Series whose instance headers are held in memory (a CT's 300 headers are a few MB).
_KEEP_HEADERS = 16

# Given a save request's parameters and the series' modality: the model name and its labels.
LabelsFor = Callable[[dict[str, Any], str], tuple[str, LabelSet]]


class _TTL:
    """A value recomputed when older than ``ttl_s``; a failed refresh raises and keeps nothing stale.

    An unreachable PACS is remembered for ``ttl_s`` too: the requests that waited for the failed
    refresh, and those within ``ttl_s`` after it, get its 503 at once instead of each waiting for
    their own timeout in turn.
    """

    def __init__(self, ttl_s: float, compute: Callable[[], Any]) -> None:
        self._ttl_s, self._compute = ttl_s, compute
        self._value: Any = None
        self._at = -float("inf")
        self._failure: PacsUnavailable | None = None
        self._failed_at = -float("inf")
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if now - self._at > self._ttl_s:
                if self._failure is not None and now - self._failed_at <= self._ttl_s:
                    raise PacsUnavailable(self._failure.detail)  # a new one: threads raise it at once
                try:
                    self._value = self._compute()
                except PacsUnavailable as e:
                    self._failure, self._failed_at = e, time.monotonic()
                    raise
                self._failure = None
                self._at = time.monotonic()
            return self._value

    def invalidate(self) -> None:
        with self._lock:
            self._at = self._failed_at = -float("inf")


class DicomWebDatastore(CheckedLocalDatastore):
    """Images are the PACS's series of the served modalities; a ``final`` label is a DICOM SEG there.

    A series is fetched in the transfer syntax the PACS stored (no server-side transcoding needed),
    decoded locally and checked: a series that is not one regular grid (gantry tilt, uneven or
    missing slices, mixed orientation or size) is refused with a 422 naming it, never resampled
    silently. Fetched volumes and saved labels are cached as NIfTI in ``cache_path``.

    Saving a ``final`` label writes a binary SEG (highdicom) over the source instances, with one
    segment per label of the model (name, SNOMED CT code where known, colour), stores it with
    STOW-RS and then deletes the SEGs saved earlier for the series (Orthanc's REST API; on another
    PACS the earlier versions stay and the newest one is read). An unreachable PACS gives a 503 that
    names it; the next request tries again.

    Args:
        client: DICOMweb client of the PACS.
        cache_path: local folder for decoded volumes, source headers and label copies.
        modalities: modalities whose series are images (the served models' modalities).
        allowed_values: label values a save request may contain (see ``CheckedLocalDatastore``).
        labels_for: the model and labels that describe a save request's segments.
        orthanc: Orthanc REST access for deleting replaced SEGs, or ``None``.
        max_upload_mb: largest accepted label upload.
        list_ttl_s: how long a series listing is reused before the PACS is asked again.
    """

    def __init__(
        self,
        client: DicomWebClient,
        cache_path: str | Path,
        *,
        modalities: tuple[str, ...],
        allowed_values: AllowedValues,
        labels_for: LabelsFor,
        orthanc: OrthancAdmin | None = None,
        max_upload_mb: int = 1024,
        list_ttl_s: float = 5.0,
    ) -> None:
        Path(cache_path).mkdir(parents=True, exist_ok=True)
        super().__init__(str(cache_path), allowed_values=allowed_values, max_upload_mb=max_upload_mb, auto_reload=False)
        self._client = client
        self._modalities = modalities
        self._labels_for = labels_for
        self._orthanc = orthanc
        self._series = _TTL(list_ttl_s, self._search_series)
        self._segs = _TTL(list_ttl_s, self._search_segs)
        # SEG series uid -> (referenced series uid, model, whether this server wrote it)
        self._seg_refs: dict[str, tuple[str, str, bool]] = {}
        self._refusals: dict[str, str | None] = {}
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # Series uid -> its instances' headers as read from the cache folder (a save and a proposal
        # each read them; 300 files for a CT): the newest _KEEP_HEADERS series, dropped at a fetch.
        self._headers: OrderedDict[str, list[Dataset]] = OrderedDict()
        self._headers_lock = threading.Lock()

    # -- the PACS ----------------------------------------------------------------------------------
    def name(self) -> str:
        return self._client.url

    def description(self) -> str:
        return f"DICOMweb PACS at {self._client.url} ({', '.join(self._modalities)} series)"

    def _search_series(self) -> dict[str, Dataset]:
        found = {}
        for modality in self._modalities:
            for ds in self._client.search_series({"Modality": modality}):
                found[str(ds.SeriesInstanceUID)] = ds
        return found

    def _search_segs(self) -> dict[str, list[tuple[str, str]]]:
        """``{source series uid: [(SEG study uid, SEG series uid), ...]}`` for every SEG in the PACS."""
        by_source: dict[str, list[tuple[str, str]]] = {}
        for ds in self._client.search_series({"Modality": "SEG"}):
            study, seg_series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            if seg_series not in self._seg_refs:
                meta = self._client.series_metadata(study, seg_series)
                refs = meta[0].get("ReferencedSeriesSequence") if meta else None
                if not refs:
                    logger.warning("SEG series %s references no series; ignored", seg_series)
                    continue
                ours = str(meta[0].get("Manufacturer", "")) == SEG_MANUFACTURER
                # Another tool's ManufacturerModelName is its own name ("Slicer"), not a served model's.
                model = str(meta[0].get("ManufacturerModelName", "")) if ours else ""
                self._seg_refs[seg_series] = (str(refs[0].SeriesInstanceUID), model, ours)
            by_source.setdefault(self._seg_refs[seg_series][0], []).append((study, seg_series))
        return by_source

    def _ours(self, seg_series: str) -> bool:
        """Whether this server wrote the SEG (its Manufacturer): the only SEGs it replaces or deletes."""
        return self._seg_refs.get(seg_series, ("", "", False))[2]

    def _series_meta(self, image_id: str) -> Dataset:
        check_image_id(image_id)
        meta = self._series.get().get(image_id)
        if meta is None:
            self._series.invalidate()
            meta = self._series.get().get(image_id)
        if meta is None:
            raise not_found(
                f"Series {image_id!r} is not in the PACS at {self._client.url} as a "
                f"{'/'.join(self._modalities)} series; GET /datastore/?output=all lists the ids"
            )
        return meta

    def _existing(self, image_id: str) -> Any:
        """The local record of a series of the PACS (404 if the PACS has none), None until it is fetched."""
        self._series_meta(image_id)
        return seam.local_index(self).objects.get(image_id)

    def _existing_label(self, label_id: str, label_tag: str) -> Any:
        self.get_label_uri(label_id, label_tag)  # a SEG saved from elsewhere is read from the PACS first
        return super()._existing_label(label_id, label_tag)

    def series_of_modality(self, modality: str) -> list[str]:
        """The PACS's series of one modality: the images a model made for it can segment."""
        return sorted(uid for uid, ds in self._series.get().items() if str(ds.get("Modality", "")) == modality)

    def list_images(self) -> list[str]:
        return sorted(self._series.get())

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        if label_tag not in (None, DefaultLabelTag.FINAL, DefaultLabelTag.FINAL.value):
            return super().get_labeled_images(label_tag, labels)
        series = self._series.get()
        return sorted(uid for uid in self._segs.get() if uid in series)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Series without a SEG, minus those that cannot be loaded (never handed out as a next sample)."""
        labelled = set(self.get_labeled_images(label_tag, labels))
        return [uid for uid in self.list_images() if uid not in labelled and self.refusal(uid) is None]

    def refusal(self, image_id: str) -> str | None:
        """Why the series cannot be loaded, from its metadata alone (remembered), or ``None``."""
        if image_id not in self._refusals:
            study = str(self._series_meta(image_id).StudyInstanceUID)
            try:
                series_geometry(self._client.series_metadata(study, image_id), image_id)
                self._refusals[image_id] = None
            except SeriesRefused as e:
                self._refusals[image_id] = str(e)
                logger.warning("%s", e)
        return self._refusals[image_id]

    def status(self) -> dict[str, Any]:
        """Counts for ``/info``; while the PACS is unreachable, says so instead of failing ``/info``."""
        try:
            status = super().status()
        except PacsUnavailable as e:
            return {"total": 0, "completed": 0, "label_tags": {}, "error": e.detail}
        # ``final`` labels are the PACS's SEGs, fetched here or not (the local records know only fetched
        # ones, and may still hold one whose SEG was deleted in the PACS since)
        tags = {k: v for k, v in status["label_tags"].items() if k != DefaultLabelTag.FINAL.value}
        if status["completed"]:
            tags[DefaultLabelTag.FINAL.value] = status["completed"]
        status["label_tags"] = tags
        return status

    def json(self) -> dict[str, Any]:
        """The datastore as ``GET /datastore/?output=all`` lists it: every series of the served
        modalities in the PACS, fetched or not (the local records hold only those fetched so far),
        with its study, modality and description, and a ``final`` label where the PACS holds a SEG."""
        local = super().json()
        labelled = set(self.get_labeled_images())
        objects = {}
        for uid, ds in sorted(self._series.get().items()):
            record = local["objects"].get(uid, {})
            image = record.get("image") or {"ext": ".nii.gz", "info": {}}
            info = {
                "SeriesInstanceUID": uid,
                "StudyInstanceUID": str(ds.get("StudyInstanceUID", "")),
                "Modality": str(ds.get("Modality", "")),
                "SeriesDescription": str(ds.get("SeriesDescription", "")),
                **image.get("info", {}),
                "fetched": uid in local["objects"],
            }
            labels = {tag: v for tag, v in record.get("labels", {}).items() if tag != DefaultLabelTag.FINAL.value}
            if uid in labelled:
                stored = record.get("labels", {}).get(DefaultLabelTag.FINAL.value)
                labels[DefaultLabelTag.FINAL.value] = stored or {"ext": ".nii.gz", "info": {"source": "DICOM SEG"}}
            objects[uid] = {"image": {**image, "info": info}, "labels": labels}
        return {**local, "name": self.name(), "description": self.description(), "objects": objects}

    # -- images ------------------------------------------------------------------------------------
    def _lock_for(self, image_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._fetch_locks.setdefault(image_id, threading.Lock())

    def _headers_dir(self, image_id: str) -> Path:
        return Path(self._datastore_path) / "headers" / image_id

    def get_image_uri(self, image_id: str) -> str:
        check_image_id(image_id)
        with self._lock_for(image_id):
            obj = seam.local_index(self).objects.get(image_id)
            if obj and Path(CheckedLocalDatastore.get_image_uri(self, image_id)).exists():
                return CheckedLocalDatastore.get_image_uri(self, image_id)
            return self._fetch(image_id)

    def _fetch(self, image_id: str) -> str:
        meta = self._series_meta(image_id)
        study_uid = str(meta.StudyInstanceUID)
        started = time.perf_counter()
        datasets = self._client.retrieve_series(study_uid, image_id)
        try:
            volume = load_series(datasets, image_id)
        except SeriesRefused as e:
            self._refusals[image_id] = str(e)
            raise unprocessable(str(e)) from None
        with self._headers_lock:
            self._headers.pop(image_id, None)
        headers = self._headers_dir(image_id)
        headers.mkdir(parents=True, exist_ok=True)
        for index, uid in enumerate(volume.sop_instance_uids):
            ds = next(d for d in datasets if str(d.SOPInstanceUID) == uid)
            if "PixelData" in ds:
                del ds.PixelData
            ds.save_as(headers / f"{index:05d}.dcm", write_like_original=False)
        info = {
            "SeriesInstanceUID": image_id,
            "StudyInstanceUID": study_uid,
            "Modality": volume.modality,
            "PatientID": str(meta.get("PatientID", "")),
            "SeriesDescription": str(meta.get("SeriesDescription", "")),
            "slices": len(volume.sop_instance_uids),
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{image_id}.nii.gz"
            nib.save(volume.to_nifti(), path)
            CheckedLocalDatastore.add_image(self, image_id, str(path), info)
        logger.info("Fetched series %s (%d slices) in %.2f s", image_id, len(datasets), time.perf_counter() - started)
        return CheckedLocalDatastore.get_image_uri(self, image_id)

    def source_headers(self, image_id: str) -> list[Dataset]:
        """The series' instances without pixel data, in slice order (as fetched)."""
        self.get_image_uri(image_id)
        with self._headers_lock:
            cached = self._headers.get(image_id)
            if cached is not None:
                self._headers.move_to_end(image_id)
                return list(cached)
        headers = [pydicom.dcmread(p) for p in sorted(self._headers_dir(image_id).glob("*.dcm"))]
        with self._headers_lock:
            self._headers[image_id] = headers
            while len(self._headers) > _KEEP_HEADERS:
                self._headers.popitem(last=False)
        return list(headers)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise bad_request(f"Images come from the PACS at {self._client.url}; store the series there (STOW-RS)")

    def remove_image(self, image_id: str) -> None:
        raise bad_request(f"Images come from the PACS at {self._client.url}; remove the series there")

    # -- labels ------------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        image_uri = self.get_image_uri(image_id)
        check_image_id(label_tag, "Label tag", existing=self.label_tags())
        label_info = check_save_params(label_info, "Save label")
        if not str(label_filename).endswith(".bin"):
            return self._save_label(image_id, image_uri, label_filename, label_tag, label_info)
        # OHIF sends a raw label buffer on the image's grid
        check_upload_size(label_filename, self._max_upload_mb, "label")
        converted = label_from_buffer(image_uri, label_filename)
        try:
            return self._save_label(image_id, image_uri, converted, label_tag, label_info)
        finally:
            Path(converted).unlink(missing_ok=True)

    def save_final_if_unchanged(
        self,
        image_id: str,
        label_filename: str,
        label_info: dict[str, Any],
        expected_final: str,
        timings: Stopwatch | None = None,
    ) -> str:
        """Save a ``final`` label (a NIfTI file) unless the series' label in the PACS is no longer
        ``expected_final`` (``final_state`` when the case was handed out): a 409 then, nothing stored.
        ``timings`` records the seconds of each stage."""
        image_uri = self.get_image_uri(image_id)
        info = check_save_params(label_info, "Save label")
        return self._save_label(
            image_id, image_uri, label_filename, DefaultLabelTag.FINAL.value, info, expected_final, timings
        )

    def _save_label(
        self,
        image_id: str,
        image_uri: str,
        label_filename: str,
        label_tag: str,
        label_info: dict[str, Any],
        expected_final: str | None = None,
        timings: Stopwatch | None = None,
    ) -> str:
        if label_tag != DefaultLabelTag.FINAL.value:
            return super().save_label(image_id, label_filename, label_tag, label_info)

        info = dict(label_info or {})
        with stage(timings, "label checked"):
            modality = str(self.get_image_info(image_id).get("Modality", ""))
            model, labels = self._labels_for(info, modality)
            check_upload_size(label_filename, self._max_upload_mb, "label")
            geometry = Geometry.of(nib.load(image_uri))
            # Judged by its header against the series' grid before any voxel is decoded.
            label = load_nifti(
                label_filename, "label", self._max_upload_mb, check=lambda lb: check_label_geometry(lb, geometry)
            )
            data = validate_label_volume(label, geometry, labels.allowed_values)
        # One save or removal per series at a time: two clients saving at once would each delete
        # only the SEGs listed before both stored theirs, and leave two.
        with self._lock_for(f"labels of {image_id}"):
            if expected_final is not None:
                with stage(timings, "conflict check (PACS)"):
                    self._check_final_unchanged(image_id, expected_final)
            return self._replace_seg(image_id, label_filename, data, labels, model, info, timings)

    def final_state(self, image_id: str) -> str:
        """What the PACS holds as the series' ``final`` label now: its SEG series uids, sorted and
        comma-joined ("" for none). Compared at a save to tell whether someone saved in between."""
        self._series_meta(image_id)
        self._segs.invalidate()
        return ",".join(sorted(uid for _, uid in self._segs.get().get(image_id, [])))

    def _check_final_unchanged(self, image_id: str, expected: str) -> None:
        now = self.final_state(image_id)
        if now != expected:
            raise conflict(
                f"Series {image_id} was saved by someone else since it was handed to you (its label in the PACS is "
                f"now SEG {now or 'none (deleted)'}, it was {expected or 'none'}); nothing was stored. Open the case "
                "again to see that label, then correct and save it"
            )

    def series_info(self, image_id: str) -> dict[str, str]:
        """The study and modality of one of the PACS's series (404 if it has none such), without fetching it."""
        meta = self._series_meta(image_id)
        return {
            "StudyInstanceUID": str(meta.get("StudyInstanceUID", "")),
            "Modality": str(meta.get("Modality", "")),
            "SeriesDescription": str(meta.get("SeriesDescription", "")),
        }

    def _replace_seg(
        self,
        image_id: str,
        label_filename: str,
        data: np.ndarray,
        labels: LabelSet,
        model: str,
        info: dict[str, Any],
        timings: Stopwatch | None = None,
    ) -> str:
        with stage(timings, "earlier SEGs listed (PACS)"):
            self._segs.invalidate()  # SEGs this server stored a moment ago (another request) are replaced too
            # Only this server's own SEGs are replaced: one a clinician made in another tool stays.
            earlier = [(study, uid) for study, uid in self._segs.get().get(image_id, []) if self._ours(uid)]
        seg_uid = generate_uid()
        with stage(timings, "series headers read"):
            headers = self.source_headers(image_id)
        with stage(timings, "SEG built (highdicom)"):
            seg = label_to_seg(
                np.asarray(data), headers, labels, model=model, series_uid=seg_uid, sop_uid=generate_uid()
            )
        started = time.perf_counter()
        with stage(timings, "SEG stored (STOW-RS)"):
            self._client.store([seg])
        self._segs.invalidate()
        self._seg_refs[seg_uid] = (image_id, model, True)
        with stage(timings, "earlier SEG deleted (PACS)"):
            for _, old in earlier:
                if self._orthanc is not None and old != seg_uid:
                    self._orthanc.delete_series(old)
                    self._seg_refs.pop(old, None)
        logger.info(
            "Stored SEG %s for series %s (replaced %d) in %.2f s",
            seg_uid,
            image_id,
            len(earlier),
            time.perf_counter() - started,
        )
        info.update({"model": model, "SegSeriesInstanceUID": seg_uid})
        with stage(timings, "label kept (datastore, version history)"):
            return super().save_label(image_id, label_filename, DefaultLabelTag.FINAL.value, info)

    def _sync_final(self, image_id: str) -> None:
        """Make the cached ``final`` label of a series the one its SEG in the PACS holds (saved anywhere)."""
        segs = self._segs.get().get(image_id)
        if not segs:  # maybe saved elsewhere since the listing: ask the PACS again before answering "none"
            self._segs.invalidate()
            segs = self._segs.get().get(image_id)
        if image_id not in self._series.get():
            return
        if not segs:
            self._drop_cached_final(image_id)  # its SEG was deleted in the PACS (by an admin, another tool)
            return
        local = seam.local_index(self).objects.get(image_id)
        cached = local.labels.get(DefaultLabelTag.FINAL.value) if local else None
        if cached and cached.info.get("SegSeriesInstanceUID") in {s for _, s in segs}:
            return
        # This server's SEG where there is one, else one another tool stored.
        study, seg_series = sorted(segs, key=lambda s: self._ours(s[1]))[-1]
        try:
            self._cache_seg(image_id, study, seg_series)
        except (SeriesRefused, ValueError, RequestError) as e:  # a RequestError: no served model's labels
            why = e.detail if isinstance(e, RequestError) else e
            logger.warning("SEG %s of series %s cannot be read as a label: %s", seg_series, image_id, why)

    def _drop_cached_final(self, image_id: str) -> None:
        """Forget the cached ``final`` label of a series whose SEG is no longer in the PACS."""
        with self._changing_records():
            local = seam.local_index(self).objects.get(image_id)
            cached = local.labels.pop(DefaultLabelTag.FINAL.value, None) if local else None
            if cached is None:
                return
            (
                Path(seam.local_index(self).label_path(DefaultLabelTag.FINAL.value))
                / self._filename(image_id, cached.ext)
            ).unlink(missing_ok=True)
            self._update_datastore_file(lock=False)
        logger.info("The PACS no longer holds a SEG for series %s: its cached label is forgotten", image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag == DefaultLabelTag.FINAL.value:
            check_image_id(label_id)
            self._sync_final(label_id)
        else:  # saved by a batch infer, which runs in a process of its own: reread the record if it changed
            self._init_from_datastore_file()
        return super().get_label_uri(label_id, label_tag)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove a label; for ``final`` that deletes the series' SEGs in the PACS (Orthanc only)."""
        self._series_meta(label_id)  # 400 for a path, 404 for a series the PACS does not have
        check_image_id(label_tag, "Label tag")
        with self._lock_for(f"labels of {label_id}"):
            self._remove_label(label_id, label_tag)

    def _remove_label(self, label_id: str, label_tag: str) -> None:
        if label_tag == DefaultLabelTag.FINAL.value:
            self._segs.invalidate()  # a SEG saved elsewhere a moment ago is deleted too
            segs = self._segs.get().get(label_id, [])
            if not segs and not seam.local_index(self).label(label_id, label_tag):
                raise not_found(f"Series {label_id!r} has no 'final' label: the PACS holds no SEG for it")
            if self._orthanc is None:
                raise bad_request(
                    f"The PACS at {self._client.url} has no delete this server can use; delete the SEG there"
                )
            ours = [uid for _, uid in segs if self._ours(uid)]
            if segs and not ours:
                raise conflict(
                    f"Series {label_id!r} has only SEGs another tool stored in the PACS ({len(segs)}); "
                    "this server deletes only its own: delete those in the PACS or the tool that made them"
                )
            with self._tombstoned(label_id, label_tag):  # the cached label kept as a version first
                for seg_series in ours:
                    self._orthanc.delete_series(seg_series)
                    self._seg_refs.pop(seg_series, None)
                self._segs.invalidate()
                # Directly: the local removal would first sync with the PACS, which holds none of ours now.
                self._drop_cached_final(label_id)
        elif seam.local_index(self).label(label_id, label_tag):
            super().remove_label(label_id, label_tag)
        else:
            raise not_found(f"Series {label_id!r} has no {label_tag!r} label")

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Every series with a SEG in the PACS, as image and label NIfTI (SEGs made elsewhere included)."""
        for image_id in list(self._segs.get()):
            self._sync_final(image_id)
        # Labels cached locally whose SEG was deleted in the PACS are not training data any more.
        labelled = set(self.get_labeled_images())
        return [d for d in super().datalist(full_path) if Path(d["image"]).name.removesuffix(".nii.gz") in labelled]

    def _cache_seg(self, image_id: str, study: str, seg_series: str) -> None:
        image = nib.load(self.get_image_uri(image_id))
        headers = self.source_headers(image_id)
        sop_uids = [str(h.SOPInstanceUID) for h in headers]
        model = self._seg_refs.get(seg_series, ("", "", False))[1]
        info = {"model": model} if model else {}
        model, labels = self._labels_for(info, str(self.get_image_info(image_id).get("Modality", "")))
        segs = self._client.retrieve_series(study, seg_series)
        if not segs:
            return
        data = seg_to_label(segs[0], sop_uids, labels, [[float(v) for v in h.ImagePositionPatient] for h in headers])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "label.nii.gz"
            nib.save(nib.Nifti1Image(data, image.affine), path)
            with saving_as(Origin.pacs):  # kept as a version unless it is the one this server stored last
                super().save_label(
                    image_id,
                    str(path),
                    DefaultLabelTag.FINAL.value,
                    {"model": model, "SegSeriesInstanceUID": seg_series},
                )


__all__ = ["DicomWebDatastore", "LabelsFor", "PacsUnavailable"]


def open_dicomweb_datastore(
    url: str,
    *,
    modalities: tuple[str, ...],
    allowed_values: AllowedValues,
    labels_for: LabelsFor,
    max_upload_mb: int = 1024,
    cache_root: str | Path | None = None,
    connect_timeout: float = 3.0,
) -> DicomWebDatastore:
    """Connect to the PACS at ``url`` and fail fast, with a message that names it, if it does not answer.

    The cache lives in ``cache_root/<hash of url>`` (default: MONAI Label's DICOMweb cache setting,
    else ``~/.cache/monailabel/dicom``). Credentials come from MONAI Label's DICOMweb settings.
    """
    import hashlib

    import requests
    from monailabel.config import settings

    session = requests.Session()
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session.auth = (settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DicomWebClient(url, connect_timeout=connect_timeout, session=session)
    try:
        client.ping()
    except PacsUnavailable as e:
        raise RuntimeError(
            f"Cannot use the PACS given by --studies {url}: {e.detail}. Start it (make pacs) or fix the URL."
        ) from None
    root = Path(
        cache_root or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip() or Path.home() / ".cache/monailabel/dicom"
    )
    return DicomWebDatastore(
        client,
        root / hashlib.sha256(client.url.encode()).hexdigest()[:16],
        modalities=modalities,
        allowed_values=allowed_values,
        labels_for=labels_for,
        orthanc=OrthancAdmin.for_dicomweb(client.url),
        max_upload_mb=max_upload_mb,
    )
