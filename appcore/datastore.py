"""A local folder datastore that checks ids, images and labels before anything is written."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextvars import ContextVar
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from appcore import seam
from appcore.archive import dataset_members, zip_chunks
from appcore.errors import RequestError, conflict, not_found, unprocessable
from appcore.files import copy_replacing, remove_stale_staged, staged_beside, staging_owner
from appcore.history import LabelHistory, Origin, proposal_of
from appcore.identity import User, user
from appcore.validation import (
    Geometry,
    check_image_id,
    check_label_geometry,
    check_upload_size,
    check_volume,
    label_values,
    load_nifti,
    validate_label_volume,
)

logger = logging.getLogger(__name__)

# Given a save request's parameters, the label values that request may contain.
AllowedValues = Callable[[dict[str, Any]], Collection[int]]
# Refuses (4xx) an uploaded image by its header (named by the second argument) before its voxels are read.
ImageCheck = Callable[[nib.Nifti1Image, str], None]


# How the label being saved in this context came to be, and the version it restores (``LabelHistory``).
_ORIGIN: ContextVar[tuple[Origin, int | None]] = ContextVar("label_origin", default=(Origin.save, None))


@contextlib.contextmanager
def saving_as(origin: Origin, restored_from: int | None = None) -> Iterator[None]:
    """Label saves within this block are recorded in the history as ``origin`` (restoring ``restored_from``)."""
    token = _ORIGIN.set((origin, restored_from))
    try:
        yield
    finally:
        _ORIGIN.reset(token)


# Info fields the datastore keeps itself: when the file was stored, its file name, the version of the
# file it last saw (``CheckedLocalDatastore.FILE_VERSION``) and (in answers only) its path on the server.
SERVER_INFO_FIELDS = ("ts", "name", "file_version", "path")
# A stored label's author: the request's user (``appcore.identity``, the token's with authentication
# on), written by the server at every store whatever a save's parameters say. MONAI Label's info
# update (PUT /datastore/label/info) sets it to its own caller, the token's user too.
AUTHOR_FIELD = "user"


def check_save_params(params: object, what: str) -> dict[str, Any]:
    """The parameters of a label save or an image upload, checked before anything is written.

    A 422 for a field the server keeps (``SERVER_INFO_FIELDS``: it would be stored and answered as
    the file's, a ``path`` included, which ``PUT .../info`` refuses to change) and for a ``model``
    that is not a model's name (a list or an object was a 500)."""
    params = dict(params or {})
    kept = sorted(k for k in SERVER_INFO_FIELDS if k in params)
    if kept:
        raise unprocessable(
            f"{what}: parameter(s) {', '.join(kept)} are set by the server when the file is stored; leave them out"
        )
    model = params.get("model")
    if model is not None and not isinstance(model, str):
        raise unprocessable(f'{what}: parameter "model" must be a model\'s name (a string), got {type(model).__name__}')
    proposal_of(params)  # 422 for a malformed "proposal"
    return params


def _client_fields(info: dict[str, Any], current: dict[str, Any], what: str) -> dict[str, Any]:
    """``info`` without the server's fields, which a client may send back unchanged (as it read them)
    but not change: a 422 names any it tried to change, and nothing is updated."""
    changed = sorted(k for k in SERVER_INFO_FIELDS if k in info and info[k] != current.get(k))
    if changed:
        raise unprocessable(
            f"{what}: info field(s) {', '.join(changed)} are set by the server when the file is stored and "
            "cannot be changed; send them as read or leave them out"
        )
    fields = {k: v for k, v in info.items() if k not in SERVER_INFO_FIELDS}
    return check_save_params(fields, what)


class CheckedLocalDatastore(LocalDatastore):
    """``LocalDatastore`` whose writes are validated and atomic.

    A label is refused (422) unless it is a readable NIfTI with the image's exact voxel grid and only
    allowed class values; the label is then stored as uint8 NIfTI with the image's header, replacing
    the previous one in one rename, so a refused or interrupted save leaves the earlier label intact.

    Args:
        datastore_path: the studies folder.
        allowed_values: gives the class values a label may contain for a save request.
        max_upload_mb: largest accepted image or label file.
        on_image_replaced: called with the id after an upload replaced an image's file, or after the
            file was found changed on disk (written over in the studies folder, while the server ran
            or before it started: ``FILE_VERSION``), so that what
            was computed from the old file, an uncertainty score, can be dropped).
        image_check: refuses an uploaded image by its header, before any voxel is decoded (a
            radiology app: when no served model can segment it); by default ``check_volume``.
        history: where every stored label is kept as a version and removals as tombstones
            (``appcore.history``); None keeps no history.
        **kwargs: passed to ``LocalDatastore``.
    """

    # Upload names an image must end with (its content is then checked as a 3D NIfTI volume); a
    # subclass storing other kinds of image sets None and checks them itself.
    image_suffixes: tuple[str, ...] | None = (".nii", ".nii.gz")

    def __init__(
        self,
        datastore_path: str,
        *,
        allowed_values: AllowedValues,
        max_upload_mb: int = 1024,
        on_image_replaced: Callable[[str], None] | None = None,
        image_check: ImageCheck = check_volume,
        history: LabelHistory | None = None,
        **kwargs: Any,
    ) -> None:
        self.history = history
        self._allowed_values = allowed_values
        self._image_check = image_check
        self._max_upload_mb = max_upload_mb
        self._on_image_replaced = on_image_replaced  # before the first reconcile, which may call it
        self._modified_timer: threading.Timer | None = None
        self._modified_lock = threading.Lock()
        # Held by whatever changes or replaces the records in this process: the watcher's reconcile and
        # re-read (another thread) compare or swap them whole, and a change made meanwhile was lost
        # (a label saved into a record the re-read had dropped) or reported twice (a removal).
        self._records_lock = threading.RLock()
        super().__init__(datastore_path, **kwargs)
        handler = getattr(self, "_handler", None)  # the folder watcher, with auto_reload
        if handler is not None:
            handler.on_moved = self._on_moved_event  # a file renamed into place (rsync, editors, the records)

    # Attempts at reconciling after a change, and the pause between them: a request thread changing
    # the records while the watcher reads them ("dictionary changed size during iteration") passes.
    REFRESH_ATTEMPTS, REFRESH_PAUSE_S = 3, 0.2

    # Image info key: the version of the image file when this datastore last saw it (``_file_version``).
    FILE_VERSION = "file_version"
    # Seconds without a further modification of an image file before the folder is reconciled: a
    # copy of a large file sends a modification event per write.
    MODIFIED_QUIET_S = 1.0

    def _on_modify_event(self, event: Any) -> None:
        """MONAI Label heeds modifications of its own records only; an image file written over in
        the studies folder is reconciled too, once it has been quiet for ``MODIFIED_QUIET_S``, so
        that its change is noticed (``FILE_VERSION``)."""
        with self._records_lock:  # the records file changed: MONAI Label's re-reads it, replacing them
            super()._on_modify_event(event)
        path = str(getattr(event, "src_path", ""))
        folder = os.path.normpath(seam.local_index(self).image_path())  # MONAI Label's ends in "/."
        if getattr(event, "is_directory", False) or os.path.dirname(os.path.normpath(path)) != folder:
            return
        if not any(fnmatch.fnmatch(os.path.basename(path), pattern) for pattern in self._extensions):
            return  # the records file (each write of it), its lock, a partial copy: no image
        with self._modified_lock:
            if self._modified_timer is not None:
                self._modified_timer.cancel()
            timer = threading.Timer(self.MODIFIED_QUIET_S, self._refresh_retrying, (event, self.refresh))
            timer.daemon = True
            self._modified_timer = timer
            timer.start()

    def _on_moved_event(self, event: Any) -> None:
        """A file renamed into place: the records (``_update_datastore_file`` of another process) are
        read again as MONAI Label reads them after an in-place write; anything else is reconciled."""
        dest = str(getattr(event, "dest_path", "") or "")
        if dest and os.path.normpath(dest) == os.path.normpath(self._datastore_config_path):
            self._on_modify_event(SimpleNamespace(src_path=dest, is_directory=False, event_type="modified"))
        else:
            self._on_any_event(event)

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """MONAI Label's, but a records file that cannot be read at start (cut short by a process
        killed while MONAI Label wrote it in place) is set aside as ``<name>.damaged`` instead of
        stopping the server: the images and labels are found again in the folders, and the label
        history (``appcore.history``) still says who saved each version."""
        try:
            super()._init_from_datastore_file(throw_exception=throw_exception)
        except ValueError as e:
            path = Path(self._datastore_config_path)
            aside = path.with_name(path.name + ".damaged")
            with FileLock(self._lock_file):
                if path.exists():
                    os.replace(path, aside)
            logger.warning("Records %s cannot be read (%s); set aside as %s, rebuilt from the folders", path, e, aside)

    def _update_datastore_file(self, lock: bool = True) -> None:
        """The records written beside the file and renamed onto it: MONAI Label writes them in place,
        and a process killed meanwhile (``kill -9``) left a cut-off file that stopped the next start.
        (No ``_ignore_event_config``: a rename sends no modification event to skip.)"""

        def write() -> None:
            text = json.dumps(seam.local_index(self).model_dump(exclude={"base_path"}), indent=2, default=str)
            fd, staged = staged_beside(self._datastore_config_path)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(staged, self._datastore_config_path)
            except BaseException:
                Path(staged).unlink(missing_ok=True)
                raise
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _on_any_event(self, event: Any) -> None:
        """A change in the studies folder (the watchdog thread's callback): reconcile, retrying a few
        times, and never let an error end the thread, which would stop every later refresh (MONAI
        Label's raises, for example, when the labels folder is removed)."""
        self._refresh_retrying(event, lambda: super(CheckedLocalDatastore, self)._on_any_event(event))

    def _refresh_retrying(self, event: Any, refresh: Callable[[], None]) -> None:
        for attempt in range(1, self.REFRESH_ATTEMPTS + 1):
            try:
                refresh()
                return
            except Exception as e:
                if attempt == self.REFRESH_ATTEMPTS:
                    kind = type(e).__name__
                    logger.warning(
                        "Datastore refresh after %s failed (%s: %s); the next change retries", event, kind, e
                    )
                else:
                    time.sleep(self.REFRESH_PAUSE_S)

    @contextlib.contextmanager
    def _current_records(self) -> Iterator[None]:
        """Held while a request changes the records: no reconcile or re-read in this process
        meanwhile, and the records as another process (a training's, a batch infer's) last wrote them.
        Write with ``_update_datastore_file()``."""
        with self._records_lock:
            self._init_from_datastore_file()
            yield

    @contextlib.contextmanager
    def _changing_records(self) -> Iterator[None]:
        """``_current_records`` and MONAI Label's file lock too, for a change that writes files beside
        the records. Write with ``_update_datastore_file(lock=False)``."""
        with self._current_records(), FileLock(self._lock_file):
            yield

    def _reconcile_datastore(self) -> None:
        with self._records_lock:
            before = set(seam.local_index(self).objects)
            super()._reconcile_datastore()
            self._report_replaced(sorted(before - set(seam.local_index(self).objects)))  # files removed from the folder
            self._notice_changed_images()

    def _report_replaced(self, image_ids: list[str]) -> None:
        if self._on_image_replaced is not None:
            for image_id in image_ids:
                self._on_image_replaced(image_id)

    def _file_version(self, image_id: str, ext: str) -> str | None:
        """The file's size and, for a gzip file, its trailer (the CRC-32 and length of the content,
        so a copy or ``touch`` that keeps the content is no change); its mtime otherwise."""
        path = Path(seam.local_index(self).image_path()) / self._filename(image_id, ext)
        try:
            st = path.stat()
            if ext.endswith(".gz") and st.st_size >= 18:  # a gzip header and trailer at least
                with path.open("rb") as f:
                    f.seek(-8, os.SEEK_END)
                    return f"{st.st_size}:crc{f.read(8).hex()}"
            return f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return None

    def _notice_changed_images(self) -> list[str]:
        """Record each image file's version; an image whose file changed since it was recorded (a
        copy written over it in the studies folder) is reported to ``on_image_replaced`` like an
        upload that replaces it. Returns the changed ids."""
        changed, recorded = [], False
        for image_id, obj in list(seam.local_index(self).objects.items()):
            version = self._file_version(image_id, obj.image.ext)
            seen = obj.image.info.get(self.FILE_VERSION)
            if version is None or version == seen:
                continue
            obj.image.info[self.FILE_VERSION] = version
            recorded = True
            if seen is not None:
                changed.append(image_id)
        if recorded:
            self._update_datastore_file()
        for image_id in changed:
            logger.debug("Image %s changed on disk since it was last seen", image_id)
        self._report_replaced(changed)
        return changed

    def label_tags(self) -> set[str]:
        """The tags labels are stored under, and MONAI Label's two, which a new tag must not look like."""
        tags = {"final", "original"}
        for obj in list(seam.local_index(self).objects.values()):
            tags.update(obj.labels)
        return tags

    def _existing(self, image_id: str) -> Any:
        """The image's record; 400 for a path, 404 for an unknown id (a subclass may return None for
        an image it knows but has not stored yet)."""
        check_image_id(image_id)
        obj = seam.local_index(self).objects.get(image_id)
        if not obj:
            raise not_found(f"Image {image_id!r} is not in the datastore; GET /datastore/?output=all lists the ids")
        return obj

    def _existing_label(self, label_id: str, label_tag: str) -> Any:
        self._existing(label_id)  # 400 or 404 for the image; a known one not stored yet has no label either
        check_image_id(label_tag, "Label tag")
        label = seam.local_index(self).label(label_id, label_tag)
        if not label:
            raise not_found(f"Image {label_id!r} has no {label_tag!r} label")
        return label

    def get_image_uri(self, image_id: str) -> str:
        self._existing(image_id)
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """As MONAI Label's (``""`` for an image without that label), but a path for an id or tag is a 400."""
        check_image_id(label_id)
        check_image_id(label_tag, "Label tag")
        return super().get_label_uri(label_id, label_tag)

    # MONAI Label's local datastore answers these for unknown ids with an empty result or a 500.
    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's, with ``path`` the file's name in the studies folder, not the server's path."""
        self._existing(image_id)
        return self._answered_info(image_id, super().get_image_info(image_id))

    def _answered_info(self, image_id: str, info: dict[str, Any]) -> dict[str, Any]:
        obj = seam.local_index(self).objects.get(image_id)
        if "path" in info and obj is not None:
            info = {**info, "path": self._filename(image_id, obj.image.ext)}
        return info

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        if self._existing(image_id) is None:
            raise conflict(f"Image {image_id!r} has not been opened on this server yet; its info can be set after that")
        with self._current_records():
            current = self._answered_info(image_id, LocalDatastore.get_image_info(self, image_id))
            super().update_image_info(image_id, _client_fields(info, current, f"Image {image_id!r}"))

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        self._existing_label(label_id, label_tag)
        return dict(super().get_label_info(label_id, label_tag))  # a copy: MONAI Label's is the stored dict

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        label = self._existing_label(label_id, label_tag)
        what = f"The {label_tag!r} label of {label_id!r}"
        fields = _client_fields(info, label.info, what)
        model = fields.get("model")
        if model and model != label.info.get("model"):
            # Naming the model decides which training uses the label: checked as a save naming it is.
            allowed = self._allowed_values({"model": model})  # 404 for an unknown model
            foreign = sorted(label_values(self.get_label_uri(label_id, label_tag)) - set(allowed))
            if foreign:
                raise unprocessable(
                    f"{what} holds values {foreign}, which are not among model {model!r}'s label values "
                    f'{sorted(allowed)}: save a corrected label with {{"model": "{model}"}} instead'
                )
        with self._current_records():
            super().update_label_info(label_id, label_tag, fields)

    def remove_image(self, image_id: str) -> None:
        obj = self._existing(image_id)
        tombstone = None
        if self.history is not None:  # first: the file, its info and its labels' versions are kept
            labels = {tag: self._keep_current_label(image_id, tag) for tag in list(obj.labels)}
            info = {k: v for k, v in obj.image.info.items() if k not in SERVER_INFO_FIELDS}
            path = LocalDatastore.get_image_uri(self, image_id)
            tombstone = self.history.tombstone_image(image_id, path, info, labels)
        try:
            super().remove_image(image_id)
        except BaseException:
            if tombstone is not None:  # nothing was removed: nothing to restore
                self.history.drop_tombstone(tombstone["id"])  # type: ignore[union-attr]
            raise
        with self._current_records():
            if image_id in seam.local_index(self).objects:
                # With the folder watcher, MONAI Label leaves the record to the watcher's reconcile, which
                # an upload under the same id right after could beat: the new file would keep the old score.
                seam.local_index(self).objects.pop(image_id)
                self._update_datastore_file()
                self._report_replaced([image_id])

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._existing_label(label_id, label_tag)
        with self._tombstoned(label_id, label_tag):
            super().remove_label(label_id, label_tag)
            # MONAI Label leaves the record to its folder watcher, which watches only the tag folders
            # that existed at start-up: a label of a newer tag stayed listed after its file was gone.
            with self._changing_records():
                obj = seam.local_index(self).objects.get(label_id)
                if obj is not None and obj.labels.pop(label_tag, None) is not None:
                    self._update_datastore_file(lock=False)

    # -- history (``appcore.history``) ---------------------------------------------------------------
    def _record_version(self, image_id: str, tag: str, path: str | Path, info: dict[str, Any]) -> None:
        """Keep the label file just stored at ``path`` as a version, as the request's user."""
        if self.history is None:
            return
        origin, restored_from = _ORIGIN.get()
        try:
            again = origin is Origin.pacs  # a SEG read back that this server stored is no new version
            self.history.record(
                image_id, tag, path, info=info, origin=origin, restored_from=restored_from, unless_same=again
            )
        except Exception:  # the label is stored; the next start takes it in as "found"
            logger.exception("Label %s/%s was saved but could not be kept as a version", tag, image_id)

    def _keep_current_label(self, image_id: str, tag: str) -> int | None:
        """The version number of the label file stored now, recording it first if its content is not
        the last version's (saved before history was kept, or by a process killed before it recorded)."""
        if self.history is None:
            return None
        obj = seam.local_index(self).objects.get(image_id)
        label = obj.labels.get(tag) if obj is not None else None
        path = Path(seam.local_index(self).label_path(tag)) / self._filename(image_id, label.ext) if label else None
        if path is None or not path.is_file():
            latest = self.history.latest(image_id, tag)
            return latest["version"] if latest else None
        versions = self.history.versions(image_id, tag)
        info = dict(label.info)
        who = User(str(info.get(AUTHOR_FIELD) or "unknown"))
        origin = Origin.found if versions else Origin.migrated
        # A migrated label's time is its save's; a found one's is now (its file's time is not known).
        ts = info.get("ts") if not versions and isinstance(info.get("ts"), int | float) else None
        return self.history.record(image_id, tag, path, info=info, origin=origin, who=who, ts=ts, unless_same=True)[
            "version"
        ]

    def sweep_staged(self) -> int:
        """Remove what saves and uploads of a process killed mid-write (``kill -9``) left staged in the
        studies folder, its label folders and the label history (``appcore.files.remove_stale_staged``)."""
        images = Path(seam.local_index(self).image_path())
        removed = remove_stale_staged(images) + remove_stale_staged(images / "labels", recursive=True)
        if self.history is not None:
            removed += remove_stale_staged(self.history.root, recursive=True)
        return len(removed)

    def take_in_labels(self) -> int:
        """Record every stored label whose file is not its last version (at start: labels saved before
        history was kept, listed in MONAI Label's ``datastore.json``, or by a process killed between
        storing and recording). Returns how many versions were added."""
        if self.history is None:
            return 0
        added = 0
        with self._records_lock:
            for image_id, obj in list(seam.local_index(self).objects.items()):
                for tag in list(obj.labels):
                    before = self.history.latest(image_id, tag)
                    try:
                        after = self._keep_current_label(image_id, tag)
                    except OSError as e:  # one unreadable file must not stop the server's start
                        logger.warning("Label %s/%s not taken into the history: %s", tag, image_id, e)
                        continue
                    added += after is not None and (before is None or before["version"] != after)
        if added:
            logger.info("Label history: %d stored labels taken in as versions", added)
        return added

    @contextlib.contextmanager
    def _tombstoned(self, image_id: str, tag: str) -> Iterator[None]:
        """Around a label's removal: its stored file kept as a version first, a tombstone after."""
        version = self._keep_current_label(image_id, tag)
        yield
        if self.history is not None:
            self.history.tombstone_label(image_id, tag, version)

    def restore_label(self, image_id: str, tag: str, version: int) -> dict[str, Any]:
        """Save version ``version`` of the label again (checked as any save; a new version, origin
        ``restore``), closing a tombstone of that label; returns the new version's record."""
        history = self._history()
        self._existing(image_id)
        record = history.version(image_id, tag, version)
        path = history.file(image_id, tag, version)
        with saving_as(Origin.restore, version):
            self.restore_label_file(image_id, str(path), tag, record["info"])
        open_ones = [t["id"] for t in history.tombstones(image_id) if t["kind"] == "label" and t["tag"] == tag]
        history.mark_restored(open_ones)
        return history.latest(image_id, tag) or record

    def restore_label_file(self, image_id: str, path: str, tag: str, info: dict[str, Any]) -> None:
        """Store a kept version's file as the label (a subclass whose stored form is not an upload's overrides)."""
        self.save_label(image_id, path, tag, info)

    def restore_removed(self, image_id: str, tag: str | None = None) -> dict[str, Any]:
        """Undo the last removal of ``image_id``'s ``tag`` label, or of the image (with its labels)
        when ``tag`` is None; 404 when there is none, 409 when the image exists again."""
        history = self._history()
        check_image_id(image_id)
        if tag is not None:
            check_image_id(tag, "Label tag")
            tombstone, _ = history.open_tombstone(image_id, tag)
            if tombstone["version"] is None:
                raise not_found(f"The removed {tag!r} label of {image_id!r} left no version to restore")
            return {"image": image_id, "tag": tag, "restored": self.restore_label(image_id, tag, tombstone["version"])}
        tombstone, kept = history.open_tombstone(image_id, None)
        if image_id in seam.local_index(self).objects:
            raise conflict(
                f"Image {image_id!r} exists again (uploaded after its removal); remove it first or restore under it "
                "only its labels (POST /datastore/label/restore)"
            )
        if kept is None or not kept.is_file():
            raise not_found(f"The kept file of removed image {image_id!r} is missing")
        with saving_as(Origin.restore):
            self.add_image(image_id, str(kept), dict(tombstone["info"].get("info") or {}))
        labels = {}
        for label_tag, version in (tombstone["info"].get("labels") or {}).items():
            if version is not None:
                labels[label_tag] = self.restore_label(image_id, label_tag, int(version))["version"]
        history.mark_restored([tombstone["id"]])
        return {"image": image_id, "labels": labels}

    def _history(self) -> LabelHistory:
        if self.history is None:
            raise not_found("This datastore keeps no label history")
        return self.history

    def dataset_archive(self, limit_cases: int | None = None) -> Iterator[bytes]:
        """The labelled images and their ``final`` labels as a ZIP archive, produced chunk by chunk as
        it is read (``appcore.archive``), in MONAI Label's layout: ``image/``, ``label/`` and
        ``metadata.json``. The first ``limit_cases`` cases when that is fewer than all; 404 at once
        when nothing is labelled, 422 for a negative limit."""
        if limit_cases is not None and limit_cases < 0:
            raise unprocessable(f"limit_cases must be 0 (all cases) or more, got {limit_cases}")
        if not self.get_labeled_images():
            raise not_found("No image has a 'final' label yet, so there is no dataset to download")

        def members() -> Iterator[list[tuple[str, Path]]]:
            datalist = self.datalist()
            if limit_cases and limit_cases < len(datalist):
                datalist = datalist[:limit_cases]
            return dataset_members(datalist)

        def metadata() -> dict[str, bytes]:
            return {"metadata.json": seam.local_index(self).model_dump_json(exclude={"base_path"}).encode()}

        return zip_chunks(members, metadata)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """``dataset_archive`` written to a temporary file, which the caller deletes."""
        chunks = self.dataset_archive(limit_cases)
        fd, path = tempfile.mkstemp(prefix="dataset-", suffix=".zip")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
        return path

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        self._existing(image_id)
        check_image_id(label_tag, "Label tag", existing=self.label_tags())
        label_info = check_save_params(label_info, "Save label")
        check_upload_size(label_filename, self._max_upload_mb, "label")
        image = nib.load(super().get_image_uri(image_id))
        # An image in the studies folder was never checked as an upload is: a label on a grid no
        # served model could segment would only be decoded (its size) and skipped by every training.
        self._image_check(image, f"image {image_id!r}")
        image_geometry = Geometry.of(image)
        # Judged by its header against the image's grid before any voxel is decoded.
        label = load_nifti(
            label_filename, "label", self._max_upload_mb, check=lambda lb: check_label_geometry(lb, image_geometry)
        )
        allowed = self._allowed_values(label_info or {})
        data = validate_label_volume(label, image_geometry, allowed)

        # Store with the image's own header so the label lies exactly on the image grid.
        header = image.header.copy()
        header.set_data_dtype("uint8")
        out = nib.Nifti1Image(data, image_geometry.affine, header)
        out.header.set_slope_inter(1, 0)

        label_dir = Path(seam.local_index(self).label_path(label_tag))
        label_dir.mkdir(parents=True, exist_ok=True)
        name = self._filename(image_id, ".nii.gz")
        with tempfile.TemporaryDirectory(dir=label_dir, prefix=f".incoming{staging_owner()}") as staging:
            staged = Path(staging) / name
            nib.save(out, staged)
            with self._changing_records():
                # The records as they are now: a re-read (another process wrote them) while the label
                # was checked replaced the one looked up above, and a save there would be lost.
                obj = self._present(image_id)
                os.replace(staged, label_dir / name)
                info = dict(label_info or {})
                info["ts"] = int(time.time())
                info["name"] = name
                info[AUTHOR_FIELD] = user().name
                obj.labels[label_tag] = DataModel(info=info, ext=".nii.gz")
                self._update_datastore_file(lock=False)
                self._record_version(image_id, label_tag, label_dir / name, info)
        values = np.flatnonzero(np.bincount(data.ravel(), minlength=1)).tolist()  # uint8: counted, not sorted
        logger.info("Saved label %s/%s (%s values %s)", label_tag, name, data.shape, values)
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_image_id(image_id, existing=list(seam.local_index(self).objects))
        image_info = check_save_params(image_info, "Image upload")
        check_upload_size(image_filename, self._max_upload_mb, "image")
        if self.image_suffixes is not None:
            if not str(image_filename).lower().endswith(self.image_suffixes):
                raise RequestError(
                    415,
                    f"Images are stored as NIfTI ({' or '.join(self.image_suffixes)}); the uploaded file's name "
                    f"ends in {''.join(Path(image_filename).suffixes) or 'no extension'!r}",
                )
            load_nifti(image_filename, "image", self._max_upload_mb, check=lambda img: self._image_check(img, "image"))
        new_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or new_id
        check_image_id(image_id, existing=list(seam.local_index(self).objects))
        name = self._filename(image_id, ext)
        dest = Path(seam.local_index(self).image_path()) / name
        # The labels as they are when the file is replaced: a save just before must not be dropped.
        with self._changing_records():
            existing = seam.local_index(self).objects.get(image_id)
            labels = dict(existing.labels) if existing is not None else {}
            current = LocalDatastore.get_image_uri(self, image_id) if labels else ""
            # a new file under a labelled id must keep the labels on it
            if current and Path(current).exists() and not self._same_grid(current, image_filename):
                raise conflict(
                    f"Image {image_id!r} has labels ({', '.join(sorted(labels))}) on its current grid and the "
                    f"uploaded file's grid differs; delete it first (DELETE /datastore/image?id={image_id}) "
                    "or upload it under a new id"
                )
            copy_replacing(image_filename, dest)
            if existing is not None and existing.image.ext != ext:  # the same image in another format
                (Path(seam.local_index(self).image_path()) / self._filename(image_id, existing.image.ext)).unlink(
                    missing_ok=True
                )
            info = dict(image_info or {})
            info["ts"] = int(time.time())
            info["name"] = name
            info[self.FILE_VERSION] = self._file_version(image_id, ext)  # this upload is no change on disk
            seam.local_index(self).objects[image_id] = ImageLabelModel(
                image=DataModel(info=info, ext=ext), labels=labels
            )
            self._update_datastore_file(lock=False)
        if existing is not None and self._on_image_replaced is not None:
            self._on_image_replaced(image_id)
        return image_id

    def _present(self, image_id: str) -> Any:
        """The image's record, under ``_changing_records``: 409 if the image was removed meanwhile
        (its record, or already its file), since a label saved now would outlive it."""
        obj = seam.local_index(self).objects.get(image_id)
        if (
            obj is None
            or not (Path(seam.local_index(self).image_path()) / self._filename(image_id, obj.image.ext)).exists()
        ):
            raise conflict(f"Image {image_id!r} was removed while its label was being saved")
        return obj

    def _same_grid(self, current: str | Path, upload: str | Path) -> bool:
        """Whether labels on the image at ``current`` lie on the file ``upload`` as well, to the
        tolerance a saved label is checked with; False where this store cannot tell."""
        if not all(str(p).endswith((".nii", ".nii.gz")) for p in (current, upload)):
            return False
        old, new = (Geometry.of(nib.load(str(p))) for p in (current, upload))
        return old.differs_from(new) is None
