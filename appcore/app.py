"""What the radiology and pathology apps check alike before any work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

from appcore.errors import RequestError, bad_request, conflict, not_found
from appcore.routes import refuse_early
from appcore.validation import check_image_id, check_upload_size


def _running_app() -> MONAILabelApp:
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _unknown_scoring(params: dict[str, Any]) -> RequestError | None:
    methods = sorted(_running_app()._scoring_methods)
    if params["method"] in methods:
        return None
    return not_found(f"Unknown scoring method {params['method']!r}; scoring methods: {methods}")


def _cannot_train(params: dict[str, Any]) -> RequestError | None:
    app = _running_app()
    model = params.get("model")
    if model is not None and model not in app._trainers:
        return not_found(f"Unknown model {model!r}; trainable models: {sorted(app._trainers)}")
    if not app.datastore().get_labeled_images():
        return conflict("No image has a 'final' label yet; save at least one (PUT /datastore/label) before training")
    return None


class RequestChecks:
    """Mixin for a ``MONAILabelApp``: a request the app cannot serve gets a 4xx before anything starts.

    Put it before ``MONAILabelApp`` in the app's bases (``class App(RequestChecks, MONAILabelApp)``):
    ``monailabel start_server`` finds the app class by a direct base named ``MONAILabelApp``.

    MONAI Label answers an unknown strategy with a 500, and starts a background training or scoring
    for an unknown name, or a training with no label to learn from, whose failure shows only later
    in the task's status. Here: 404 for an unknown model, strategy or scoring method, 409 for a
    training before any ``final`` label, and image paths outside the server's upload and session
    folders are refused.
    """

    _infers: dict[str, Any]
    _trainers: dict[str, Any]
    _strategies: dict[str, Any]

    def on_init_complete(self) -> None:
        super().on_init_complete()
        refuse_early("/scoring/{method}", ["POST"], _unknown_scoring, name="refuse_scoring")
        refuse_early("/train/{model}", ["POST"], _cannot_train, name="refuse_train_model")
        refuse_early("/train/", ["POST"], _cannot_train, name="refuse_train_all")

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

    def bundle_path(self, model: str | None) -> str | None:
        # MONAI Label asks this before it starts a training or batch infer process: the place to
        # refuse an unknown model with a 404 instead of a background task that fails later.
        known = set(self._trainers) | set(self._infers)
        if model is not None and model not in known:
            raise not_found(f"Unknown model {model!r}; models: {sorted(known)}")
        return None
