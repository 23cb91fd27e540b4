"""What the radiology and pathology apps check alike before any work starts."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import torch
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

from appcore.dicom import proxy as dicom_proxy
from appcore.dicom.client import is_dicomweb_url
from appcore.errors import RequestError, bad_request, conflict, not_found, too_large, too_many, unprocessable
from appcore.files import staged_beside
from appcore.lifecycle import children_stop_with_server, die_with_server, is_task_process
from appcore.routes import limit_request_bodies, refuse_early, serve_in_threads
from appcore.sessions import CheckedSessions
from appcore.validation import check_device, check_image_id, check_upload_size
from appcore.versions import VersionStore, store_beside
from appcore.weights import checked_state_dict

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
    try:
        check_device(params.get("device"), "Training")
    except RequestError as e:
        return e
    split = params.get("val_split", 0.0)
    if isinstance(split, bool) or not isinstance(split, int | float) or not 0 <= split < 1:
        return unprocessable(f"Training parameter 'val_split' must be a number in [0, 1), got {split!r}")
    return None


# Held while a training requested with run_sync=true runs in the server's process (a background
# training runs in a process of its own, which MONAI Label tracks and refuses a second of).
_SYNC_TRAINING = threading.Lock()
_SYNC_TRAINING_RUNS = "A training requested with run_sync=true is running; a new one can start when it has ended"


def _cannot_train(params: dict[str, Any], body: bytes) -> RequestError | None:
    if _SYNC_TRAINING.locked():
        return too_many(_SYNC_TRAINING_RUNS)
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
    # Labels, but are any of them the model's? For POST /train/ (every model), refused only when no
    # model has any: MONAI Label then trains the models one after the other.
    checks = [getattr(t, "no_training_data", None) for n, t in app._trainers.items() if model in (None, n)]
    reasons = [why for check in checks if check is not None and (why := check(app.datastore())) is not None]
    if reasons and len(reasons) == len(checks):
        return conflict(" ".join(reasons))
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


def _no_gpu_info(params: dict[str, Any], body: bytes) -> RequestError | None:
    if shutil.which("nvidia-smi") is None:  # MONAI Label runs it regardless and answers a 500
        return not_found("No GPU information here: nvidia-smi is not installed on the server")
    return None


def _no_dicomweb(params: dict[str, Any], body: bytes) -> RequestError | None:
    if not is_dicomweb_url(_running_app().studies):
        return not_found("The studies are a local folder, not a DICOMweb server: there is nothing to proxy")
    return None


def _update_model(background_tasks: Any, model: str, file: Any) -> dict[str, Any]:
    """``monailabel.endpoints.model.update_model`` (``PUT /model/{model}``), checked; the route of
    ``appcore.model_routes`` answers first and passes the client's id too."""
    return _running_app().replace_weights(model, file.file)


def _delete_model(model: str) -> dict[str, Any]:
    """``monailabel.endpoints.model.delete_model`` (``DELETE /model/{model}``), checked."""
    return _running_app().remove_weights(model)


def _records_stops(stop: Any) -> Any:
    """``monailabel.endpoints.train.stop`` (``DELETE /train/``), also telling the app whose run it
    stopped: ``/info``'s ``train_stats`` would otherwise go on describing the run before."""

    def checked() -> Any:
        result = stop()
        if isinstance(result, dict) and result.get("status") == "STOPPED":
            try:  # MONAI Label's task start time, local time to the second
                started = datetime.strptime(str(result.get("start_ts")), "%Y-%m-%d %H:%M:%S").timestamp()
            except ValueError:
                started = None
            _running_app().on_training_stopped(dict(result.get("request") or {}).get("model"), started)
        return result

    checked.records_stops = True  # type: ignore[attr-defined]
    return checked


def _needs_input(run: Any) -> Any:
    """MONAI Label's ``run_inference`` or ``run_wsi_inference``, with a 4xx when there is nothing to segment."""
    signature = inspect.signature(run)

    def checked(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind(*args, **kwargs)
        given.apply_defaults()
        image, session_id, file = (given.arguments.get(k) for k in ("image", "session_id", "file"))
        file = file if hasattr(file, "file") else None  # an upload, not the signature's File(None) default
        if not file and not image and not session_id:
            raise unprocessable(
                "Name what to segment: ?image=<id> (GET /datastore/?output=all lists them), ?session_id=<id> "
                "(PUT /session/ makes one) or a file in the form field 'file'"
            )
        if session_id and not file and not image:
            sessions = _running_app().sessions()
            if sessions is None:
                raise not_found("Sessions are disabled on this server (MONAI_LABEL_SESSIONS=false)")
            if sessions.get_session(session_id) is None:
                raise not_found(
                    f"Session {session_id!r} not found: it expired or never existed; PUT /session/ makes one"
                )
        return run(*args, **kwargs)

    functools.update_wrapper(checked, run)  # run's signature, and the marks of other wrappers
    checked.checked = True  # type: ignore[attr-defined]
    return checked


# MONAI Label's infer functions, each called by its endpoints with ``image``, ``session_id`` and ``file``.
INFER_FUNCTIONS = (
    ("monailabel.endpoints.infer", "run_inference"),
    ("monailabel.endpoints.wsi_infer", "run_wsi_inference"),
)

# MONAI Label's routes whose work (a network, an upload's checks, a PACS round trip) would hold the
# server's event loop: each request runs in a worker thread instead (``appcore.routes.serve_in_threads``).
THREADED_ROUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/info/", ("GET",)),  # on a PACS, the datastore's counts query it
    ("/infer/{model}", ("POST",)),
    ("/infer/wsi/{model}", ("POST",)),
    ("/infer/wsi_v2/{model}", ("POST",)),
    ("/batch/infer/{model}", ("POST",)),  # run_sync=true runs the whole batch in the request
    ("/train/{model}", ("POST",)),  # the same for a training (run_sync=true)
    ("/train/", ("POST",)),
    ("/scoring/", ("POST",)),  # the same for scoring (run_sync=true)
    ("/scoring/{method}", ("POST",)),
    ("/activelearning/{strategy}", ("POST",)),
    ("/datastore/", ("GET", "PUT")),  # on a PACS, listing queries it
    ("/datastore/image", ("GET", "HEAD", "PUT", "DELETE")),  # on a PACS, a series is fetched and converted
    ("/datastore/image/info", ("GET", "PUT")),
    ("/datastore/label", ("GET", "HEAD", "PUT", "DELETE")),  # on a PACS, a label is stored (deleted) as a SEG
    ("/datastore/label/info", ("GET", "PUT")),
    ("/datastore/dataset", ("GET",)),
    ("/session/", ("PUT",)),
    ("/model/{model}", ("PUT",)),
)

# MONAI Label's functions that save an upload to a temporary file and queue its removal as a
# background task, which FastAPI runs only after a response that is not an error.
UPLOAD_FUNCTIONS = (
    ("monailabel.endpoints.datastore", "add_image"),
    ("monailabel.endpoints.datastore", "save_label"),
    *INFER_FUNCTIONS,
)


def _removes_uploads_on_error(function: Any) -> Any:
    """``function`` (an endpoint function taking ``background_tasks``), removing the uploads it saved
    when it raises: a refused upload was left in the temporary folder, one copy per refusal."""
    signature = inspect.signature(function)

    def checked(*args: Any, **kwargs: Any) -> Any:
        tasks = signature.bind_partial(*args, **kwargs).arguments.get("background_tasks")
        try:
            return function(*args, **kwargs)
        except BaseException:
            for task in list(getattr(tasks, "tasks", ())):
                if getattr(task.func, "__name__", "") == "remove_file":
                    task.func(*task.args, **task.kwargs)
            raise

    functools.update_wrapper(checked, function)  # its signature, and the marks of other wrappers
    checked.removes_uploads = True  # type: ignore[attr-defined]
    return checked


def _download_dataset(limit_cases: int | None = None) -> Any:
    """``monailabel.endpoints.datastore.download_dataset`` (``GET /datastore/dataset``), streamed:
    MONAI Label's wrote the archive to a temporary file it never deleted, inside the event loop."""
    from starlette.responses import StreamingResponse

    chunks = _running_app().datastore().dataset_archive(limit_cases)
    headers = {"Content-Disposition": 'attachment; filename="dataset.zip"'}
    return StreamingResponse(chunks, media_type="application/zip", headers=headers)  # iterated in the thread pool


def checked_endpoints() -> list[str]:
    """Put this module's checks into MONAI Label's endpoint functions that are loaded; returns those changed."""
    changed = []
    model = sys.modules.get("monailabel.endpoints.model")
    if model is not None and model.update_model is not _update_model:
        model.update_model, model.delete_model = _update_model, _delete_model
        changed.append("monailabel.endpoints.model")
    train = sys.modules.get("monailabel.endpoints.train")
    if train is not None and not getattr(train.stop, "records_stops", False):
        train.stop = _records_stops(train.stop)
        changed.append("monailabel.endpoints.train.stop")
    proxy = sys.modules.get("monailabel.endpoints.proxy")
    if proxy is not None and proxy.proxy_dicom is not dicom_proxy.proxy_dicom:
        proxy.proxy_dicom = dicom_proxy.proxy_dicom  # a thread and timeouts: a slow PACS no longer blocks the server
        changed.append("monailabel.endpoints.proxy")
    for name, function in INFER_FUNCTIONS:
        module = sys.modules.get(name)
        if module is not None and not getattr(getattr(module, function), "checked", False):
            setattr(module, function, _needs_input(getattr(module, function)))
            changed.append(name)
    for name, function in UPLOAD_FUNCTIONS:
        module = sys.modules.get(name)
        if module is not None and not getattr(getattr(module, function), "removes_uploads", False):
            setattr(module, function, _removes_uploads_on_error(getattr(module, function)))
            changed.append(f"{name}.{function}")
    datastore = sys.modules.get("monailabel.endpoints.datastore")
    if datastore is not None and datastore.download_dataset is not _download_dataset:
        datastore.download_dataset = _download_dataset
        changed.append("monailabel.endpoints.datastore.download_dataset")
    return changed


_SLOTS_LOCK = threading.Lock()


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

    MONAI Label also copies an uploaded model file (``PUT /model/{model}``) over the served one
    unchecked and in place, and its ``DELETE`` removes whatever file is served, shipped weights
    included: here uploads are checked and renamed into place and only published weights are
    withdrawn (the app says where with ``published_weights`` and ``new_network``). Sessions are
    ``appcore.sessions.CheckedSessions``. An infer with nothing to segment or an unknown session,
    GPU information without a GPU and the DICOMweb proxy without a PACS get a 4xx, not a 500.

    MONAI Label runs every endpoint on the server's one event loop; the routes of ``THREADED_ROUTES``
    run in worker threads here, with at most ``infer_concurrency`` infers at once. A refused upload
    is deleted (``UPLOAD_FUNCTIONS``) and the dataset download is streamed (``_download_dataset``).

    Trainings and scoring runs (child processes) end with the server (``appcore.lifecycle``).
    """

    _infers: dict[str, Any]
    _trainers: dict[str, Any]
    _strategies: dict[str, Any]
    settings: Any  # the app's settings (``appcore.settings.AppSettings``): ``max_upload_mb`` is read

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if is_task_process():
            die_with_server()
        super().__init__(*args, **kwargs)

    def on_init_complete(self) -> None:
        children_stop_with_server()  # first: before anything starts a task
        super().on_init_complete()
        strict_form_json()
        from appcore.model_routes import add_model_routes

        add_model_routes()  # before the threaded routes, which hand PUT /model/{model} on to it
        for path, methods in THREADED_ROUTES:  # first: the refusing routes below go in front of them
            serve_in_threads(path, methods, name=f"threaded {path}")
        refuse_early("/scoring/{method}", ["POST"], _unknown_scoring, name="refuse_scoring")
        refuse_early("/train/{model}", ["POST"], _cannot_train, name="refuse_train_model")
        refuse_early("/train/", ["POST"], _cannot_train, name="refuse_train_all")
        refuse_early("/infer/{model}", ["POST"], _unservable_infer, name="refuse_infer", read_body=False)
        refuse_early("/logs/gpu", ["GET"], _no_gpu_info, name="refuse_gpu_info")
        proxy = "/proxy/dicom/{path:path}"
        refuse_early(proxy, ["GET", "POST"], _no_dicomweb, name="refuse_dicom_proxy", read_body=False)
        checked_endpoints()
        mb = self.settings.max_upload_mb
        limit_request_bodies((mb + 1) * 2**20, limit_mb=mb)  # room for the form around a file

    # -- sessions --------------------------------------------------------------------------------
    def _load_sessions(self, load: bool = False) -> CheckedSessions | None:
        from monailabel.config import settings as ml_settings

        if not load:
            return None
        return CheckedSessions(
            ml_settings.MONAI_LABEL_SESSION_PATH,
            ml_settings.MONAI_LABEL_SESSION_EXPIRY,
            max_upload_mb=self.settings.max_upload_mb,
        )

    # -- weights (PUT and DELETE /model/{model}) -------------------------------------------------
    def published_weights(self, model: str) -> Path:
        """Where a training run or an upload publishes ``model``'s weights; never a shipped file."""
        raise NotImplementedError

    def new_network(self, model: str) -> torch.nn.Module:
        """An untrained instance of the network ``model`` serves, to check uploaded weights against."""
        raise NotImplementedError

    def shipped_weights(self, model: str) -> Path | None:
        """``model``'s shipped weights (its version 0), or ``None`` where it ships none."""
        return None

    def version_store(self, model: str) -> VersionStore:
        """The versions of ``model``'s weights (``appcore.versions``), kept beside its published file;
        models that share one published file share its versions."""
        return store_beside(
            self.published_weights(model), model, self.shipped_weights(model), keep=self.settings.keep_versions
        )

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``/info``, each model with its weight versions (the image lists left out:
        ``GET /model/<model>/versions`` has them) and the one served (``served_version``)."""
        info = super().info()  # type: ignore[misc]
        for name, entry in info.get("models", {}).items():
            store = self.version_store(name)
            entry["served_version"] = store.served_version()
            entry["versions"] = [
                {k: v for k, v in r.items() if k not in ("trained_images", "validated_images")}
                for r in store.versions()
            ]
        return info

    def training_running(self, model: str) -> str | None:
        """What training of ``model``'s weights (of any model sharing them, of every model) runs or
        waits to run now, for a refusal's message; ``None`` if none."""
        from monailabel.utils.async_tasks.utils import tasks

        if _SYNC_TRAINING.locked():
            return "a training requested with run_sync=true runs"
        folder = self.version_store(model).folder
        for task in tasks("train"):
            trained = dict(task.get("request") or {}).get("model")
            if task.get("status") not in ("SUBMITTED", "RUNNING"):
                continue
            if trained is None or trained not in self._infers or self.version_store(trained).folder == folder:
                what = trained or "every model"
                return f"a training of {what} (started {task.get('start_ts')}) is {task['status'].lower()}"
        return None

    def on_training_stopped(self, model: str | None, started: float | None) -> None:
        """``DELETE /train/`` stopped the run of ``model`` (of every trainer for ``None``) begun at
        ``started`` (seconds since the epoch, if known); by default nothing is recorded."""

    def on_weights_changed(self, model: str) -> None:
        """Called after an upload replaced or a delete removed ``model``'s published weights."""

    def _known_model(self, model: object) -> None:
        if model not in self._infers:
            raise not_found(f"Unknown model {model!r}; served models: {sorted(self._infers)}")

    def replace_weights(self, model: str, source: BinaryIO, client_id: str | None = None) -> dict[str, Any]:
        """Publish uploaded weights for ``model`` once they are known to fit its network.

        The upload is written beside the published file, checked (a PyTorch checkpoint read without
        running code, the network's tensor names and shapes, finite values: 422 otherwise; 413 over
        ``max_upload_mb``), kept as a new version (``started_by`` ``client_id``) and renamed over the
        published file, so infer and scoring see the old weights or the new ones, never a
        half-written or foreign file. The shipped weights are never written.
        """
        from monailabel.utils.others.generic import file_checksum

        self._known_model(model)
        target = self.published_weights(model)
        target.parent.mkdir(parents=True, exist_ok=True)
        limit = self.settings.max_upload_mb * 2**20
        fd, staged = staged_beside(target, "upload.")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise too_large(
                            f"The weights are over {self.settings.max_upload_mb} MB, the limit (--conf max_upload_mb)"
                        )
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size == 0:
                raise unprocessable("The uploaded weights are empty (0 bytes)")
            checked_state_dict(staged, self.new_network(model))
            record = {"source": "upload", "started_by": client_id}
            version = self.version_store(model).publish(lambda path: os.replace(staged, path), record)
        finally:
            Path(staged).unlink(missing_ok=True)
        logger.info("Weights of %s replaced by an upload (%d bytes): %s", model, size, target)
        self.on_weights_changed(model)
        checksum = file_checksum(str(target))
        return {"checksum": checksum, "modified_time": int(target.stat().st_mtime), "version": version["version"]}

    def remove_weights(self, model: str) -> dict[str, Any]:
        """Withdraw ``model``'s published weights (kept as ``<file>.<time>.deleted``); it then serves
        its shipped weights, or none. 404 when nothing is published: shipped weights are never removed."""
        self._known_model(model)
        withdrawn = self.version_store(model).withdraw()  # 404 when nothing is published
        logger.info("Published weights of %s withdrawn (version %s)", model, withdrawn)
        self.on_weights_changed(model)
        return {}

    def serve_version(self, model: str, version: int) -> dict[str, Any]:
        """Serve ``model``'s weights ``version`` again (0: the shipped ones); 404 for an unknown model or
        version. Refused (409, not queued) while a training runs: its publish would replace them."""
        self._known_model(model)
        running = self.training_running(model)
        if running:
            raise conflict(
                f"Not served: {running}, and its publish would replace the weights served; this request is "
                "refused, not queued: send it again once the training has ended (GET /train/ says when)"
            )
        record = self.version_store(model).serve(version)
        self.on_weights_changed(model)
        return record

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
        self._known_model(request.get("model"))
        check_device(request.get("device"), "Infer")
        image = request.get("image")
        if isinstance(image, str) and os.path.isabs(image) and os.path.exists(image):
            if not self.is_server_upload(image):
                raise bad_request("Image must be a datastore id or an uploaded file, not a server path")
            check_upload_size(image, max_upload_mb, "image")
            return image
        check_image_id(image)
        return (datastore or self.datastore()).get_image_uri(image)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer, at most ``infer_concurrency`` at once (requests run in worker threads
        now, ``THREADED_ROUTES``; before, the event loop ran one at a time)."""
        with self._infer_slot():
            return super().infer(request, datastore)  # type: ignore[misc]

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's train. In the server's process it runs only for ``run_sync=true``, in a worker
        thread (``THREADED_ROUTES``): one such training at a time, and no background one beside it."""
        if not _SYNC_TRAINING.acquire(blocking=False):
            raise too_many(_SYNC_TRAINING_RUNS)
        try:
            return super().train(request)  # type: ignore[misc]
        finally:
            _SYNC_TRAINING.release()

    @contextlib.contextmanager
    def _infer_slot(self) -> Iterator[None]:
        """One of ``infer_concurrency`` slots, for an infer or an app's own WSI infer; a thread that
        holds one already (an infer inside that WSI infer) goes on without taking a second, which
        could wait forever. (MONAI Label's own WSI infer takes none: its tiles are infers, each
        taking one, from a thread pool whose threads could not get a slot the request held.)"""
        with _SLOTS_LOCK:
            if getattr(self, "_infer_semaphore", None) is None:
                self._infer_semaphore = threading.BoundedSemaphore(self.settings.infer_concurrency)
                self._infer_holders = threading.local()
        if getattr(self._infer_holders, "held", False):
            yield
            return
        with self._infer_semaphore:
            self._infer_holders.held = True
            try:
                yield
            finally:
                self._infer_holders.held = False

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
