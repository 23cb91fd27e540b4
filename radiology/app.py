"""The radiology MONAI Label app: serving, fine-tuning and active learning for the registered models."""

from __future__ import annotations

import gzip
import logging
import os
import threading
import zlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import nibabel as nib
from monailabel.config import settings as ml_settings
from monailabel.interfaces.datastore import Datastore

from appcore import seam
from appcore.app import LabelingApp
from appcore.datastore import CheckedLocalDatastore
from appcore.dicom.client import is_dicomweb_url
from appcore.dicom.datastore import DicomWebDatastore, open_dicomweb_datastore
from appcore.dicom.ohif import as_requested_format, serve_ohif
from appcore.dicom.prepare import load_series_folder
from appcore.errors import RequestError, not_found, root_cause, unprocessable
from appcore.labels import LabelSet
from appcore.projectdb import project_db
from appcore.settings import RadiologySettings
from appcore.validation import check_segmentable, check_volume, header_only, load_nifti, nifti_header
from radiology.graphcut import GeodesicGraphCut
from radiology.infer import SegmentationInfer
from radiology.interactive import (
    InteractiveInfer,
    ScribblesInfer,
    base_model,
    click_engine,
    interactive_name,
    scribbles_name,
)
from radiology.registry import MODELS
from radiology.spec import ModelSpec
from radiology.train import SegmentationTrainer
from radiology.uncertainty import MCDropoutScorer
from strategies.background import BackgroundScoring
from strategies.ranked import ranked_strategies
from strategies.reservations import ReservationBook
from strategies.scores import ScoreStore
from strategies.scoring import UncertaintyScoring

logger = logging.getLogger(__name__)

# The image files a studies folder is searched for.
NIFTI_PATTERNS = ("*.nii.gz", "*.nii")

# Errors that mean an image file's content cannot be decoded, whatever wrapped them.
UNREADABLE = (EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError)


class RadiologyApp(BackgroundScoring, LabelingApp):
    """MONAI Label app serving the models of ``radiology.registry.MODELS`` chosen by ``--conf models``.

    Weights: a model serves ``<app_dir>/model/<name>.pt`` once a training run has published it, and
    its shipped weights (``radiology/weights``) before that.
    """

    registry = MODELS
    settings_class = RadiologySettings
    reservation_book = ReservationBook
    app_name = "Radiology (active learning)"
    app_description = "3D segmentation of CT and MR with active learning"

    settings: RadiologySettings
    models: dict[str, ModelSpec]

    def prepare(self) -> None:
        self.specs: dict[str, ModelSpec] = self.models
        # One store for the strategies, the scoring method and the new-image check, so that the
        # scores are parsed once per change and not on every next-sample request.
        self._score_store = ScoreStore(
            self.model_dir / f"scores_{self.settings.al_model}.json",
            db=project_db(self.model_dir, self.settings.database_url),
        )

    def export_bundle(self, model: str, version: int, out: Path) -> Path:
        """Version ``version`` of ``model`` as a MONAI Bundle in ``out`` (``radiology.export``)."""
        from radiology.export import export_bundle

        return export_bundle(self.specs[model], self.version_store(model), version, out)

    def has_weights(self, model: str) -> bool:
        return model in self.specs  # an interactive model serves its automatic model's proposal

    def on_training_stopped(self, model: str | None, started: float | None) -> None:
        for name, trainer in seam.trainers(self).items():
            if model in (None, name):
                trainer.record_stopped("stopped by DELETE /train/", unless_recorded_since=started)

    def on_weights_changed(self, model: str) -> None:
        if self.settings.score_after_train and model == self.settings.al_model and seam.scoring_methods(self):
            self.async_scoring("epistemic")  # the stored scores came from the weights served before

    # -- datastore -------------------------------------------------------------------------------
    def allowed_label_values(self, params: dict[str, Any]) -> Collection[int]:
        model = params.get("model")
        if model:
            if model not in self.specs:
                raise not_found(f"Unknown model {model!r} in label parameters; served models: {sorted(self.specs)}")
            return self.specs[model].labels.allowed_values
        return frozenset().union(*(s.labels.allowed_values for s in self.specs.values()))

    def dicom_labels(self, params: dict[str, Any], modality: str) -> tuple[str, LabelSet]:
        """The model whose labels describe a DICOM SEG: the one the request names, else the one of the modality."""
        model = params.get("model")
        if model:
            self.allowed_label_values(params)  # 404 for an unknown model
            if modality and self.specs[model].modality != modality:
                raise unprocessable(
                    f"Model {model!r} segments {self.specs[model].modality} and the series is {modality}: "
                    f"its SEG would replace this series' label with another anatomy's; name a {modality} model"
                )
            return model, self.specs[model].labels
        matching = [name for name, spec in self.specs.items() if spec.modality == modality]
        if len(matching) != 1:
            raise unprocessable(
                f"Cannot tell which model's labels a {modality or 'unknown'} series' label holds; "
                f'name it in the save parameters, one of {sorted(self.specs)}: {{"model": "..."}}'
            )
        return matching[0], self.specs[matching[0]].labels

    def init_datastore(self) -> Datastore:
        # OHIF 3.13 at /ohif/ on a studies folder too: its files load without a token (the role
        # table's public row), and its study list and panel say that they need a PACS; the wheel's
        # OHIF, which also needs one, is never served.
        serve_ohif()
        if is_dicomweb_url(self.studies):
            return open_dicomweb_datastore(
                self.studies,
                modalities=tuple(sorted({spec.modality for spec in self.specs.values()})),
                allowed_values=self.allowed_label_values,
                labels_for=self.dicom_labels,
                max_upload_mb=self.settings.max_upload_mb,
            )
        store = CheckedLocalDatastore(
            self.studies_folder(),
            allowed_values=self.allowed_label_values,
            max_upload_mb=self.settings.max_upload_mb,
            on_image_replaced=self._score_store.forget,  # its score was the old file's
            image_check=self.check_storable_image,
            extensions=list(NIFTI_PATTERNS),  # MONAI Label's default adds JPEG, PNG, TIFF and SVS files
            auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        if not store.list_images():
            others = [p.name for p in Path(self.studies).iterdir() if p.is_file() and not p.name.startswith(".")]
            logger.warning(
                "Studies folder %s holds no NIfTI image (.nii, .nii.gz)%s: nothing to label until one is added",
                self.studies,
                f" but {len(others)} other files (such as {others[0]}); DICOM series are served from a PACS "
                "(--studies http://.../dicom-web) or converted to NIfTI first"
                if others
                else "",
            )
        return store

    # -- tasks -----------------------------------------------------------------------------------
    def init_infers(self) -> dict[str, Any]:
        infers: dict[str, Any] = super().init_infers()
        for name, spec in self.specs.items():  # after the automatic ones: Slicer offers the first model
            infers[interactive_name(name)] = InteractiveInfer(
                spec, infers[name], click_engine(spec, self.weight_paths(name)), max_clicks=self.settings.max_clicks
            )
            infers[scribbles_name(name)] = ScribblesInfer(
                spec, infers[name], GeodesicGraphCut(spec.labels.name_to_id())
            )
        return infers

    def new_infer(self, model: str) -> SegmentationInfer:
        return SegmentationInfer(
            self.specs[model],
            self.weight_paths(model),
            sw_batch_size=self.settings.sw_batch_size,
            cpu_bf16=self.settings.cpu_bf16,
        )

    def new_trainer(self, model: str) -> SegmentationTrainer:
        spec = self.specs[model]
        return SegmentationTrainer(
            spec,
            str(self.model_dir / model),
            str(self.published_weights(model)),
            max_epochs=self.settings.max_epochs,
            train_batch_size=self.settings.train_batch_size,
            val_split=self.settings.val_split,
            cpu_bf16=self.settings.cpu_bf16,
            neighbours=[other for other in self.specs.values() if other is not spec],
            memory_budget_mb=self.settings.infer_memory_mb,
            versions=self.version_store(model),
            review_gate=self.review_gate,
        )

    def score_store(self) -> ScoreStore:
        return self._score_store

    def init_strategies(self) -> dict[str, Any]:
        return ranked_strategies(self.book, self.score_store(), items="images", under=f"'{self.settings.al_model}'")

    def init_scoring_methods(self) -> dict[str, Any]:
        name, s = self.settings.al_model, self.settings
        spec, paths = self.specs[name], self.weight_paths(name)
        return {
            "epistemic": UncertaintyScoring(
                f"Uncertainty under '{name}': MC dropout entropy and BALD ({s.mc_samples} passes), test-time "
                f"augmentation disagreement and feature embedding ({s.tta_samples} augmentations); "
                "rescores only stale images",
                scorer=lambda: MCDropoutScorer(
                    spec,
                    paths,
                    others=[other for other in self.specs.values() if other is not spec],
                    samples=s.mc_samples,
                    tta_samples=s.tta_samples,
                    cpu_bf16=s.cpu_bf16,
                    memory_budget_mb=s.infer_memory_mb,
                ),
                store=self.score_store(),
                key="entropy",
            )
        }

    # -- request checks --------------------------------------------------------------------------
    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        image = self.request_image(request, datastore, self.settings.max_upload_mb)
        model = str(request.get("model", ""))
        spec = self.specs.get(base_model(model))

        def segmentable(header: nib.Nifti1Image, what: str) -> None:
            if spec is None:  # an unknown model, which MONAI Label's infer answers with a 404
                check_volume(header, what)
            else:
                self.check_segmentable(header, spec, what)

        if image == request.get("image") and os.path.isdir(image):  # a session of several or unpacked files
            image = self._session_series(image, check=lambda h: segmentable(h, "session's series"))
            request = {**request, "image": image}
        if image == request.get("image") and not image.lower().endswith((".nii", ".nii.gz")):
            # The label is written on the image's NIfTI header, so nothing else can be answered.
            suffix = "".join(Path(image).suffixes[-2:]) or "no extension"
            raise RequestError(
                415,
                f"Infer reads NIfTI images (.nii, .nii.gz), or a session of one series' DICOM files; "
                f"the uploaded file has {suffix!r}",
            )
        if image.lower().endswith((".nii", ".nii.gz")):
            # Judged by the header (grid, affine, memory) before any voxel is decoded.
            if image == request.get("image"):  # an upload (or a session's file), not a stored image
                what = "uploaded image"
                load_nifti(image, what, self.settings.max_upload_mb, check=lambda h: segmentable(h, what))
            else:  # the header only: the voxels are read once, by the infer
                what = f"image {request.get('image')!r}"
                segmentable(nifti_header(image, what), what)
            task = seam.infers(self).get(model)
            if hasattr(task, "check_request"):  # clicks or scribbles: refused before any work
                task.check_request(request, tuple(nifti_header(image, "image").shape[:3]))
        try:
            result = super().infer(request, datastore)
        except Exception as e:
            cause = root_cause(e)
            if not isinstance(cause, UNREADABLE):
                raise
            # a stored file whose header reads but whose voxel data does not (a truncated download)
            raise unprocessable(
                f"The image {request.get('image')!r} cannot be read: {type(cause).__name__}: {cause}"
            ) from None
        return as_requested_format(result, request)  # NRRD for OHIF

    def check_segmentable(self, header: nib.Nifti1Image, spec: ModelSpec, what: str) -> None:
        """Refuse, from its header, an image ``spec`` cannot segment within ``infer_memory_mb``
        (``appcore.validation.check_segmentable``)."""
        check_segmentable(header, spec.spacing, what, classes=spec.num_classes, budget_mb=self.settings.infer_memory_mb)

    def check_storable_image(self, header: nib.Nifti1Image, what: str) -> None:
        """Refuse an upload (image or session) that no served model could segment, from its header:
        413 when a model refuses it for memory (it is too large), else 422, with every model's reason."""
        check_volume(header, what)
        refusals: dict[str, RequestError] = {}
        for name, spec in self.specs.items():
            try:
                self.check_segmentable(header, spec, what)
                return
            except RequestError as e:
                refusals[name] = e
        status = 413 if any(e.status_code == 413 for e in refusals.values()) else 422
        if len(refusals) == 1:
            raise RequestError(status, next(iter(refusals.values())).detail)
        reasons = " ".join(f"{name}: {e.detail}." for name, e in refusals.items())
        raise RequestError(status, f"No served model can segment the {what}. {reasons}")

    @staticmethod
    def _session_series(folder: str, check: Callable[[nib.Nifti1Image], None] | None = None) -> str:
        """The volume a session's folder holds: its one NIfTI file, else the series its DICOM files make,
        as NIfTI beside them (checked as a PACS series is, and by ``check`` from its grid before any
        pixel data is decoded)."""
        volume_path = Path(folder) / "series.nii.gz"
        if not volume_path.exists():
            niftis = [
                p
                for p in Path(folder).rglob("*")
                if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith(".")
            ]
            if len(niftis) == 1:  # an archive of one image, sent with uncompress=true
                return str(niftis[0])
            if niftis:
                raise unprocessable(
                    f"The session holds {len(niftis)} NIfTI files and a session is one image: send one NIfTI file, "
                    "or the DICOM files of one series"
                )
            try:
                volume = load_series_folder(
                    folder, check=None if check is None else lambda shape, affine: check(header_only(shape, affine))
                )
            except ValueError as e:
                raise unprocessable(f"The session's files cannot be segmented: {e}") from None
            staged = volume_path.with_name(f".{os.getpid()}.{threading.get_ident()}.nii.gz")
            nib.save(volume.to_nifti(), staged)
            os.replace(staged, volume_path)  # two infers on one session never read a half-written file
        return str(volume_path)

    def batch_infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        datastore = datastore or self.datastore()
        spec, images = self.specs.get(request.get("model", "")), request.get("images", "all")
        if isinstance(datastore, DicomWebDatastore) and spec is not None and isinstance(images, str):
            # A PACS holds every modality: "all", "labeled" or "unlabeled" means those of the model's.
            pool = {"labeled": datastore.get_labeled_images, "unlabeled": datastore.get_unlabeled_images}
            ids = pool.get(images, datastore.list_images)()
            of_modality = set(datastore.series_of_modality(spec.modality))
            request = {**request, "images": [i for i in ids if i in of_modality]}
        return super().batch_infer(request, datastore)

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        result = super().train(request)
        if self.settings.score_after_train and request.get("model") == self.settings.al_model:
            result = dict(result or {})
            result["scoring"] = self.scoring({"method": "epistemic"})
        return result

    def on_init_complete(self) -> None:
        super().on_init_complete()
        if self.settings.score_on_start and seam.scoring_methods(self):
            self.async_scoring("epistemic")
