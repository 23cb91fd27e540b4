"""What the radiology and pathology apps check alike before any work starts."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

from appcore.errors import RequestError, bad_request, conflict, not_found, unprocessable
from appcore.routes import refuse_early
from appcore.validation import check_image_id, check_upload_size

logger = logging.getLogger(__name__)


def _running_app() -> MONAILabelApp:
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _unknown_scoring(params: dict[str, Any], body: bytes) -> RequestError | None:
    methods = sorted(_running_app()._scoring_methods)
    if params["method"] in methods:
        return None
    return not_found(f"Unknown scoring method {params['method']!r}; scoring methods: {methods}")


# Training parameters MONAI Label passes on unchecked, with their smallest value.
_TRAIN_COUNTS = {"max_epochs": 1, "train_batch_size": 1, "val_batch_size": 1}


def _bad_train_params(body: bytes) -> RequestError | None:
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError:
        return None  # FastAPI answers malformed JSON with its own 422
    if not isinstance(params, dict):
        return None  # likewise
    for key, least in _TRAIN_COUNTS.items():
        value = params.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return unprocessable(f"Training parameter {key!r} must be an integer of at least {least}, got {value!r}")
    split = params.get("val_split", 0.0)
    if isinstance(split, bool) or not isinstance(split, int | float) or not 0 <= split < 1:
        return unprocessable(f"Training parameter 'val_split' must be a number in [0, 1), got {split!r}")
    return None


def _cannot_train(params: dict[str, Any], body: bytes) -> RequestError | None:
    app = _running_app()
    model = params.get("model")
    if model is not None:  # POST /train/<model>; POST /train/ nests parameters per model
        if model not in app._trainers:
            return not_found(f"Unknown model {model!r}; trainable models: {sorted(app._trainers)}")
        error = _bad_train_params(body)
        if error is not None:
            return error
    if not app.datastore().get_labeled_images():
        return conflict("No image has a 'final' label yet; save at least one (PUT /datastore/label) before training")
    return None


def _unservable_infer(params: dict[str, Any], body: bytes) -> RequestError | None:
    if params.get("output") == "dicom_seg":
        # MONAI Label makes one only for its own DICOMweb datastore, and answers a 500 otherwise.
        return bad_request(
            "output=dicom_seg is not served: a label saved with PUT /datastore/label on a PACS is stored "
            "there as DICOM SEG; infer answers NIfTI (output=image), or NRRD with result_extension .nrrd"
        )
    return None


class _FormJson:
    """``json`` as MONAI Label's upload endpoints use it, to read the ``params``, ``info`` and ``wsi``
    form fields: a field that is not a JSON object is a 422 that says so, not the 500 of a
    ``JSONDecodeError`` (MONAI Label 0.8.5). ``dumps`` is the standard one."""

    dumps = staticmethod(json.dumps)

    @staticmethod
    def loads(text: str | bytes, **kwargs: Any) -> Any:
        try:
            value = json.loads(text, **kwargs)
        except ValueError as e:
            raise unprocessable(f"A form field (params, info or wsi) is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise unprocessable(f"A form field (params, info or wsi) must be a JSON object, got {type(value).__name__}")
        return value


# MONAI Label's endpoint modules whose only ``json.loads`` calls read request form fields.
FORM_JSON_MODULES = ("monailabel.endpoints.datastore", "monailabel.endpoints.infer", "monailabel.endpoints.wsi_infer")


def strict_form_json() -> list[str]:
    """Give the loaded ``FORM_JSON_MODULES`` the checking ``json``; returns the modules changed."""
    changed = []
    for name in FORM_JSON_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "json", None) in (json, _FormJson):
            module.json = _FormJson
            changed.append(name)
    return changed


class RequestChecks:
    """Mixin for a ``MONAILabelApp``: a request the app cannot serve gets a 4xx before anything starts.

    Put it before ``MONAILabelApp`` in the app's bases (``class App(RequestChecks, MONAILabelApp)``):
    ``monailabel start_server`` finds the app class by a direct base named ``MONAILabelApp``.

    MONAI Label (0.8.5) answers an unknown strategy or a form field that is not JSON with a 500, and
    starts a background training or scoring for an unknown name, for parameters of the wrong type
    or with no label to learn from, whose failure shows only later in the task's status. Here: 404
    for an unknown model, strategy or scoring method, 422 for such parameters and form fields, 409
    for a training before any ``final`` label, and a 400 for image paths outside the server's upload
    and session folders. Batch infer runs on the CPU where there is no CUDA device and skips an
    image it cannot segment instead of ending.
    """

    _infers: dict[str, Any]
    _trainers: dict[str, Any]
    _strategies: dict[str, Any]

    def on_init_complete(self) -> None:
        super().on_init_complete()
        strict_form_json()
        refuse_early("/scoring/{method}", ["POST"], _unknown_scoring, name="refuse_scoring")
        refuse_early("/train/{model}", ["POST"], _cannot_train, name="refuse_train_model")
        refuse_early("/train/", ["POST"], _cannot_train, name="refuse_train_all")
        refuse_early("/infer/{model}", ["POST"], _unservable_infer, name="refuse_infer", read_body=False)

    def is_server_upload(self, path: str) -> bool:
        """Whether ``path`` is a file the MONAI Label endpoints wrote: an upload or a session's image."""
        parent = Path(path).resolve().parent
        roots = [Path(tempfile.gettempdir()).resolve()]
        sessions = self.sessions()
        if sessions is not None:
            roots.append(Path(sessions.store_path).resolve())
        return any(parent == root or root in parent.parents for root in roots)

    def request_image(self, request: dict[str, Any], datastore: Datastore | None, max_upload_mb: int) -> str:
        """The file an infer request names: an uploaded or session file, else a datastore image (404 if unknown)."""
        model = request.get("model")
        if model not in self._infers:
            raise not_found(f"Unknown model {model!r}; served models: {sorted(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and os.path.isabs(image) and os.path.exists(image):
            if not self.is_server_upload(image):
                raise bad_request("Image must be a datastore id or an uploaded file, not a server path")
            check_upload_size(image, max_upload_mb, "image")
            return image
        check_image_id(image)
        return (datastore or self.datastore()).get_image_uri(image)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy")
        if strategy not in self._strategies:
            raise not_found(f"Unknown strategy {strategy!r}; strategies: {sorted(self._strategies)}")
        return super().next_sample(request)

    def batch_infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's batch infer, with an image that cannot be segmented skipped, not the batch ended.

        The result names each skipped image with the reason (``{"skipped": "..."}``).
        """
        if not torch.cuda.is_available():
            # MONAI Label spreads a batch over the CUDA devices by default and divides by their
            # count: without one, every batch infer failed with a ZeroDivisionError.
            request = {**request, "multi_gpu": False, "device": "cpu"}

        def infer_or_skip(req: dict[str, Any], store: Datastore) -> dict[str, Any]:
            try:
                return self.infer(req, store)
            except HTTPException as e:  # a refused series, a corrupt file, an unreachable PACS
                logger.warning("Batch infer skips %s: %s", req.get("image"), e.detail)
                return {"skipped": e.detail}

        return self._batch_infer(request, datastore or self.datastore(), infer_or_skip)

    def bundle_path(self, model: str | None) -> str | None:
        # MONAI Label asks this before it starts a training or batch infer process: the place to
        # refuse an unknown model with a 404 instead of a background task that fails later.
        known = set(self._trainers) | set(self._infers)
        if model is not None and model not in known:
            raise not_found(f"Unknown model {model!r}; models: {sorted(known)}")
        return None
