"""What the radiology and pathology apps check alike before any work starts."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence, Set
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import nibabel as nib
import torch
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

from appcore import identity, seam
from appcore.auth import check_open_door, listening_host
from appcore.datastore import CheckedLocalDatastore
from appcore.dicom.client import is_dicomweb_url
from appcore.errors import RequestError, bad_request, conflict, not_found, too_large, too_many, unprocessable
from appcore.files import staged_beside
from appcore.history import HISTORY_DIR, SERVED, LabelHistory
from appcore.lifecycle import children_stop_with_server, die_with_server, is_task_process
from appcore.projectdb import ProjectDB, project_db
from appcore.sessions import CheckedSessions
from appcore.settings import Settings
from appcore.validation import MAX_ID_BYTES, check_device, check_image_id, check_upload_size, check_volume
from appcore.versions import VersionStore, store_beside
from appcore.weights import checked_state_dict

logger = logging.getLogger(__name__)


def _running_app() -> MONAILabelApp:
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _unknown_scoring(params: dict[str, Any], body: bytes) -> RequestError | None:
    methods = sorted(seam.scoring_methods(_running_app()))
    if params["method"] in methods:
        return _bad_task_params(body, "Scoring", "method", params["method"])
    return not_found(f"Unknown scoring method {params['method']!r}; scoring methods: {methods}")


def _unknown_scoring_all(params: dict[str, Any], body: bytes) -> RequestError | None:
    return _bad_task_params(body, "Scoring", "method", None)


def _bad_batch_infer(params: dict[str, Any], body: bytes) -> RequestError | None:
    return _bad_task_params(body, "Batch infer", "model", params.get("model"))


def _bad_task_param(key: str, value: Any, what: str, name_key: str, name: str | None) -> RequestError | None:
    if key == "bundle_path":  # MONAI Label adds it to the task process's PYTHONPATH
        return unprocessable(f"{what} parameter 'bundle_path' is not accepted from requests: it names server code")
    if key == "started_by":  # the author of a batch infer's labels (``_signed_by_user``)
        return unprocessable(f"{what} parameter 'started_by' is set by the server to the request's user; leave it out")
    if key == name_key and value != name:
        return unprocessable(f"{what} parameter {key!r} ({value!r}) differs from the one in the path ({name!r})")
    if key == "gpus" and not (
        value in ("", "all") or (isinstance(value, str) and all(g.strip().isdigit() for g in value.split(",")))
    ):
        return unprocessable(f"{what} parameter 'gpus' must be 'all' or GPU numbers such as '0,1', got {value!r}")
    try:
        if key == "label_tag":
            check_image_id(value, f"{what} parameter 'label_tag'")
        if key == "images" and not isinstance(value, str):
            if not isinstance(value, list):
                return unprocessable(f"{what} parameter 'images' must be all, labeled, unlabeled or a list of ids")
            for image in value:
                check_image_id(image)
    except RequestError as e:
        return e
    return None


def _bad_task_params(body: bytes, what: str, name_key: str, name: str | None) -> RequestError | None:
    """Why the JSON ``body`` of a scoring or batch infer request is refused, or None: MONAI Label merges
    it into the task's request, top-level keys and (``POST /scoring/``) the ones nested per method."""
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError:
        return None  # FastAPI answers malformed JSON with its own 422
    if not isinstance(params, dict):
        return None
    nested = [(k, v) for inner in params.values() if isinstance(inner, dict) for k, v in inner.items()]
    for key, value in [*params.items(), *nested]:
        error = _bad_task_param(key, value, what, name_key, name)
        if error is not None:
            return error
    return None


# Training parameters MONAI Label passes on unchecked, with their smallest value.
_TRAIN_COUNTS = {"max_epochs": 1, "train_batch_size": 1, "val_batch_size": 1, "early_stop_patience": -1}
# Choices of MONAI Label's BasicTrainTask configuration that a client (3D Slicer) sends back as picked.
_TRAIN_CHOICES = {
    "dataset": ("SmartCacheDataset", "CacheDataset", "PersistentDataset", "Dataset"),
    "dataloader": ("ThreadDataLoader", "DataLoader"),
    "tracking": ("None", "none", ""),
}
# Parameters MONAI Label would turn into server paths or a child's environment: never from a client.
_TRAIN_REFUSED = {
    "bundle_path": "it would put a server folder on the training process's PYTHONPATH",
    "train_ds": "it names a server file read as the list of training images",
    "val_ds": "it names a server file read as the list of validation images",
    "tracking_uri": "it names where experiment tracking writes on the server",
    "distributed_url": "it names the rendezvous of a multi-GPU run",
    "distributed_backend": "the server picks it",
    "run_id": "the server sets it",
    "started_by": "the server sets it to the request's user (its token)",
}
_TRAIN_KEYS = (
    *_TRAIN_COUNTS,
    *_TRAIN_CHOICES,
    "model",
    "name",
    "device",
    "val_split",
    "pretrained",
    "multi_gpu",
    "gpus",
    "tracking_experiment_name",
    "tracking_run_name",
    "client_id",  # MONAI Label's client adds it to every request's parameters; training ignores it
)


def _bad_train_param(key: str, value: Any, model: str | None) -> RequestError | None:
    """Why one training parameter is refused, or None. ``model``: the model the parameters are for."""
    if key in _TRAIN_REFUSED and value not in ("", None):  # 3D Slicer sends every option, tracking_uri ""
        return unprocessable(f"Training parameter {key!r} is not accepted from requests: {_TRAIN_REFUSED[key]}")
    if key not in _TRAIN_KEYS and key not in _TRAIN_REFUSED:
        return unprocessable(f"Unknown training parameter {key!r}; accepted: {sorted(_TRAIN_KEYS)}")
    if key == "model" and value != model:
        where = f"model {model!r}'s" if model else "POST /train/'s top-level"
        return unprocessable(
            f"Training parameter 'model' ({value!r}) in {where} parameters would train another model; "
            "leave it out (POST /train/<model> names the model)"
        )
    if key in _TRAIN_COUNTS:
        least = _TRAIN_COUNTS[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return unprocessable(f"Training parameter {key!r} must be an integer of at least {least}, got {value!r}")
    if key in _TRAIN_CHOICES:
        choices = _TRAIN_CHOICES[key]
        picked = value[0] if isinstance(value, list) and value else value
        if value is not None and picked not in choices:
            return unprocessable(f"Training parameter {key!r} must be one of {list(choices)}, got {value!r}")
    if key == "client_id" and not isinstance(value, str | None):
        return unprocessable(f"Training parameter 'client_id' must be a string, got {value!r}")
    if key in ("pretrained", "multi_gpu") and not isinstance(value, bool):
        return unprocessable(f"Training parameter {key!r} must be true or false, got {value!r}")
    if key == "gpus" and not (
        value in ("", "all") or (isinstance(value, str) and all(g.strip().isdigit() for g in value.split(",")))
    ):
        return unprocessable(f"Training parameter 'gpus' must be 'all' or GPU numbers such as '0,1', got {value!r}")
    if key == "val_split" and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1):
        return unprocessable(f"Training parameter 'val_split' must be a number in [0, 1), got {value!r}")
    try:
        if key == "device":
            check_device(value, "Training")
        if key == "name":  # BasicTrainTask writes and deletes checkpoints in <model folder>/<name>
            check_image_id(value, "Training parameter 'name'")
        if key.startswith("tracking_") and value:
            check_image_id(value, f"Training parameter {key!r}")
    except RequestError as e:
        return e
    return None


def _bad_model_train_params(params: Any, model: str | None) -> RequestError | None:
    if not isinstance(params, dict):
        return unprocessable(f"Training parameters of model {model!r} must be a JSON object, got {params!r}")
    return next((e for k, v in params.items() if (e := _bad_train_param(k, v, model)) is not None), None)


def _bad_train_params(
    body: bytes, model: str | None = None, trainers: Collection[str] | None = None
) -> RequestError | None:
    """Why the JSON ``body`` of ``POST /train/<model>`` (``trainers`` None) or of ``POST /train/`` (every
    model in ``trainers``) is refused, or None.

    Every parameter is checked against the ones MONAI Label's training reads (``_TRAIN_KEYS``);
    unknown ones and those naming server paths (``_TRAIN_REFUSED``) are refused. ``POST /train/``
    takes each model's parameters nested under its name, and MONAI Label merges the top-level ones
    into every model's request (over the nested ones): both are checked.
    """
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError:
        return None  # FastAPI answers malformed JSON with its own 422
    if not isinstance(params, dict):
        return None  # likewise
    if trainers is None:
        return _bad_model_train_params(params, model)
    for key, value in params.items():
        error = _bad_model_train_params(value, key) if key in trainers else _bad_train_param(key, value, None)
        if error is not None:
            return error
    return None


def path_free_train_request(request: dict[str, Any]) -> None:
    """Refuse, inside a training task, a request whose ``name`` is no plain name or that carries a
    parameter naming server paths (``_TRAIN_REFUSED``): the endpoints refuse them first, this
    guards every other way a request reaches the task."""
    for key, why in _TRAIN_REFUSED.items():
        if request.get(key) not in ("", None) and key not in ("run_id", "started_by"):
            raise unprocessable(f"Training parameter {key!r} is not accepted from requests: {why}")
    check_image_id(request.get("name", "train_01"), "Training parameter 'name'")


# Held while a training requested with run_sync=true runs in the server's process (a background
# training runs in a process of its own, which MONAI Label tracks and refuses a second of).
_SYNC_TRAINING = threading.Lock()
_SYNC_TRAINING_RUNS = "A training requested with run_sync=true is running; a new one can start when it has ended"


def _cannot_train(params: dict[str, Any], body: bytes) -> RequestError | None:
    if _SYNC_TRAINING.locked():
        return too_many(_SYNC_TRAINING_RUNS)
    app = _running_app()
    model = params.get("model")
    if model is not None and model not in seam.trainers(app):  # POST /train/<model>; POST /train/ is every model
        return not_found(f"Unknown model {model!r}; trainable models: {sorted(seam.trainers(app))}")
    error = _bad_train_params(body, model, trainers=None if model is not None else list(seam.trainers(app)))
    if error is not None:
        return error
    if not app.datastore().get_labeled_images():
        return conflict("No image has a 'final' label yet; save at least one (PUT /datastore/label) before training")
    # Labels, but are any of them the model's? For POST /train/ (every model), refused only when no
    # model has any: MONAI Label then trains the models one after the other.
    checks = [getattr(t, "no_training_data", None) for n, t in seam.trainers(app).items() if model in (None, n)]
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


# MONAI Label's endpoint modules whose only ``json.loads`` calls read request form fields: their
# ``json`` is ``_FormJson`` (``appcore.seam.table``).
FORM_JSON_MODULES = ("monailabel.endpoints.datastore", "monailabel.endpoints.infer", "monailabel.endpoints.wsi_infer")


def _no_gpu_info(params: dict[str, Any], body: bytes) -> RequestError | None:
    if shutil.which("nvidia-smi") is None:  # MONAI Label runs it regardless and answers a 500
        return not_found("No GPU information here: nvidia-smi is not installed on the server")
    return None


def _hidden_logs(params: dict[str, Any], body: bytes) -> RequestError | None:
    if not _running_app().settings.expose_logs:
        return RequestError(
            403,
            "The server log is not served: it names images, clients and server folders and there is no "
            "authentication yet; start the server with --conf expose_logs true to serve it (read it on the server "
            "otherwise)",
        )
    return None


def own_log_path(app_dir: str | Path, port: int) -> Path:
    """This server's own log file: MONAI Label's ``logs/app.log`` is written by every server started on
    the same app folder."""
    return Path(app_dir) / "logs" / f"server-{port}.log"


_OWN_LOG: Path | None = None  # this server's own log, once ``serve_own_log`` made it


def _own_log_reader(shared: Any) -> Any:
    """``monailabel.endpoints.logs.get_logs``, reading this server's own log (``serve_own_log``)
    instead of the file MONAI Label names; ``shared`` is MONAI Label's function."""

    def get_logs(logger_file: str, *args: Any) -> Any:
        return shared(str(_OWN_LOG or logger_file), *args)

    return get_logs


def serve_own_log(app_dir: str | Path, port: int) -> Path:
    """Write this server's log to ``own_log_path`` (from now on, anew at each start); ``GET /logs/``
    answers it instead of the shared ``app.log`` (``_own_log_reader``, a row of ``appcore.seam.table``)."""
    path = own_log_path(app_dir, port)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        handler = logging.FileHandler(path, mode="w")
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)s] [%(levelname)s] (%(name)s) - %(message)s"))
        root.addHandler(handler)
    global _OWN_LOG
    _OWN_LOG = path
    logger.info("This server logs to %s from here on; GET /logs/ serves it (--conf expose_logs true)", path.name)
    return path


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


def _signed_by_user(run: Any) -> Any:
    """``monailabel.endpoints.train.run_model`` or ``run`` (``POST /train/...``), or
    ``monailabel.endpoints.batch_infer.run`` (``POST /batch/infer/...``), with the request's user
    (``appcore.identity``, set from its token) as the run's ``started_by``: the request is written
    for the task process here, at request time, as the process cannot see the token (a batch infer's
    labels are saved as that user). A client cannot send ``started_by`` itself (``_TRAIN_REFUSED``,
    ``_bad_task_param``)."""
    signature = inspect.signature(run)

    def signed(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        params = dict(bound.arguments.get("params") or {})
        params["started_by"] = identity.user().name
        bound.arguments["params"] = params
        return run(*bound.args, **bound.kwargs)

    return signed


# The files the running infer request's endpoint wrote itself (the upload it saved, the session's
# image), in the thread that serves the request: the only absolute paths ``request_image`` accepts.
_REQUEST_FILES = threading.local()

# Infer parameters (the ``params`` form field, merged into MONAI Label's request) that would name a
# server file or replace the input the request names.
_INFER_REFUSED = {
    "image": "name the image with ?image=<id>, a file upload or ?session_id=",
    "session": "name the session with ?session_id=",
    "label": "send a label as the form field 'label' (a segment name, letters, digits, '_', '-' or spaces, is taken)",
    "file": "send a file as the form field 'file'",
    "model_filename": "the server serves its own weights",
}
_EXTENSION = re.compile(r"(\.[A-Za-z0-9]{1,8}){1,2}")
# A segment's name (Slicer sends the current one as ``label`` with clicks): never a path.
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_\- ]{1,64}")


def server_files() -> frozenset[str]:
    """The files the infer request served in this thread has written (empty outside one)."""
    return frozenset(getattr(_REQUEST_FILES, "paths", ()))


@contextlib.contextmanager
def request_files(paths: set[str]) -> Iterator[None]:
    """Within this block, ``paths`` (a set the request's endpoint may still add to) are the files
    this thread's request wrote (``server_files``); none after it."""
    _REQUEST_FILES.paths = paths
    try:
        yield
    finally:
        _REQUEST_FILES.paths = set()


class _RecordingTasks:
    """FastAPI's ``BackgroundTasks`` of a request, noting each file the endpoint queues for removal:
    MONAI Label's infer endpoints queue the temporary file they saved an upload to just after writing
    it, before they call the app's infer."""

    def __init__(self, tasks: Any, paths: set[str]) -> None:
        self._tasks, self._paths = tasks, paths

    def add_task(self, func: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(func, "__name__", "") == "remove_file" and args and isinstance(args[0], str):
            self._paths.add(args[0])
        self._tasks.add_task(func, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tasks, name)


def _check_infer_params(params: object) -> object:
    """Refuse (422) infer parameters that name server files or replace the request's input; the
    parameters to pass on (a segment name in ``label``, as Slicer's click tools send it, moves to
    ``label_name``, so that ``label`` stays the uploaded label file)."""
    if not isinstance(params, str) or not params.strip():
        return params
    values = _FormJson.loads(params)
    if isinstance(values.get("label"), str) and _SEGMENT_NAME.fullmatch(values["label"]):
        values["label_name"] = values.pop("label")
        params = json.dumps(values)
    for key, why in _INFER_REFUSED.items():
        if key in values:
            raise unprocessable(f"Infer parameter {key!r} is not accepted in params: {why}")
    extension = values.get("result_extension")
    if extension is not None and not (isinstance(extension, str) and _EXTENSION.fullmatch(extension)):
        raise unprocessable(
            f"Infer parameter 'result_extension' must be a file extension such as .nrrd, got {extension!r}"
        )
    if values.get("label_tag") is not None:
        check_image_id(values["label_tag"], "Infer parameter 'label_tag'")
    return params


def _needs_input(run: Any) -> Any:
    """MONAI Label's ``run_inference`` or ``run_wsi_inference``, with a 4xx when there is nothing to
    segment, and with the files its endpoint writes for the request noted (``server_files``)."""
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
        if "params" in given.arguments:
            given.arguments["params"] = _check_infer_params(given.arguments["params"])
        paths: set[str] = set()
        if session_id:
            sessions = _running_app().sessions()
            if sessions is None:
                raise not_found("Sessions are disabled on this server (MONAI_LABEL_SESSIONS=false)")
            session = sessions.get_session(session_id)
            if session is None and not file and not image:
                raise not_found(
                    f"Session {session_id!r} not found: it expired or never existed; PUT /session/ makes one"
                )
            if session is not None:
                paths.add(session.image)
        if given.arguments.get("background_tasks") is not None:
            given.arguments["background_tasks"] = _RecordingTasks(given.arguments["background_tasks"], paths)
        with request_files(paths):
            return run(*given.args, **given.kwargs)

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


# MONAI Label's functions that name a temporary file or a session's file after an upload's file name.
NAMED_UPLOAD_FUNCTIONS = (*UPLOAD_FUNCTIONS, ("monailabel.endpoints.session", "create_session"))


def _short_upload_names(function: Any) -> Any:
    """``function`` (an endpoint function taking uploads), refusing (400) an upload whose file name
    could not name a file: MONAI Label answered a name over 255 bytes with a 500, and a session
    upload left an empty folder behind."""
    from starlette.datastructures import UploadFile

    signature = inspect.signature(function)

    def checked(*args: Any, **kwargs: Any) -> Any:
        for value in signature.bind_partial(*args, **kwargs).arguments.values():
            for upload in value if isinstance(value, list) else [value]:
                name = os.path.basename(upload.filename or "") if isinstance(upload, UploadFile) else ""
                if len(name.encode()) > MAX_ID_BYTES:
                    raise bad_request(
                        f"The uploaded file's name is {len(name.encode())} bytes long; at most {MAX_ID_BYTES} "
                        "make a file name on the server: rename the file"
                    )
        return function(*args, **kwargs)

    functools.update_wrapper(checked, function)  # its signature, and the marks of other wrappers
    checked.short_names = True  # type: ignore[attr-defined]
    return checked


def _session_answer(info: Any) -> Any:
    """A session's info as answered: the image's file name, not the session folder's server path."""
    if not isinstance(info, dict):
        return info
    answered = {k: v for k, v in info.items() if k != "path"}
    if isinstance(answered.get("image"), str):
        answered["image"] = os.path.basename(answered["image"])
    return answered


def _no_session_paths(function: Any) -> Any:
    """``monailabel.endpoints.session``'s ``create_session``, ``get_session`` or ``remove_session``,
    answering without the server's paths (MONAI Label's clients use the session id only)."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        answer = function(*args, **kwargs)
        if isinstance(answer, dict) and "session_info" in answer:
            return {**answer, "session_info": _session_answer(answer["session_info"])}
        return _session_answer(answer)

    functools.update_wrapper(checked, function)
    checked.no_paths = True  # type: ignore[attr-defined]
    return checked


def _datastore_listing(listing: Any) -> Any:
    """``monailabel.endpoints.datastore.datastore`` (``GET /datastore/``): ``output=train`` lists each
    labelled image and label by its path in the studies folder, not the server's absolute path."""

    def checked(output: Any = None) -> Any:
        answer = listing(output)
        if getattr(output, "value", output) != "train" or not isinstance(answer, list):
            return answer
        root = str(getattr(_running_app().datastore(), "_datastore_path", ""))

        def relative(value: Any) -> Any:
            if not isinstance(value, str) or not os.path.isabs(value):
                return value
            inside = root and os.path.realpath(value).startswith(os.path.realpath(root) + os.sep)
            return os.path.relpath(os.path.realpath(value), os.path.realpath(root)) if inside else Path(value).name

        return [{k: relative(v) for k, v in item.items()} if isinstance(item, dict) else item for item in answer]

    functools.update_wrapper(checked, listing)
    checked.relative = True  # type: ignore[attr-defined]
    return checked


def hide_server_paths(value: Any, folders: dict[str, str]) -> Any:
    """``value`` (an answer: text, lists, dicts) with each of ``folders``' paths (key) written as its
    name (value), longest first: ``/srv/apps/radiology/model/x`` becomes ``<app>/model/x``."""
    if isinstance(value, str):
        for folder in sorted(folders, key=len, reverse=True):
            value = value.replace(folder, folders[folder])
        return value
    if isinstance(value, Sequence | Set) and not isinstance(value, bytes):  # MONAI Label's details: a deque
        return [hide_server_paths(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: hide_server_paths(v, folders) for k, v in value.items()}
    return value


def _server_folders() -> dict[str, str]:
    """The server's folders a task's status may name (its log lines do), and how answers name them."""
    from monailabel.config import settings as ml_settings

    app = _running_app()
    named = {
        ml_settings.MONAI_LABEL_APP_DIR: "<app>",
        str(getattr(app, "studies", "")): "<studies>",
        tempfile.gettempdir(): "<tmp>",
        str(getattr(app.sessions(), "store_path", "") or ""): "<sessions>",
    }
    folders = {}
    for folder, name in named.items():
        if folder and not is_dicomweb_url(folder):
            folders[folder.rstrip(os.sep)] = name
            folders[os.path.realpath(folder)] = name
    return folders


def _no_task_paths(status: Any) -> Any:
    """``monailabel.endpoints.{train,scoring,batch_infer}.status`` (``GET /train/`` and the others),
    answering without the server's folders: a task's request and its last log lines name them."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        return hide_server_paths(status(*args, **kwargs), _server_folders())

    functools.update_wrapper(checked, status)
    checked.no_paths = True  # type: ignore[attr-defined]
    return checked


def _download_dataset(limit_cases: int | None = None) -> Any:
    """``monailabel.endpoints.datastore.download_dataset`` (``GET /datastore/dataset``), streamed:
    MONAI Label's wrote the archive to a temporary file it never deleted, inside the event loop."""
    from starlette.responses import StreamingResponse

    chunks = _running_app().datastore().dataset_archive(limit_cases)
    headers = {"Content-Disposition": 'attachment; filename="dataset.zip"'}
    return StreamingResponse(chunks, media_type="application/zip", headers=headers)  # iterated in the thread pool


_SLOTS_LOCK = threading.Lock()


class RequestChecks:
    """Mixin for a ``MONAILabelApp``: a request the app cannot serve gets a 4xx before anything starts.

    Put it before ``MONAILabelApp`` in the app's bases (``class App(RequestChecks, MONAILabelApp)``);
    ``LabelingApp`` does, and both apps extend it.

    MONAI Label (0.8.5) answers an unknown strategy or a form field that is not JSON with a 500, and
    starts a background training or scoring for an unknown name, for parameters of the wrong type
    or with no label to learn from, whose failure shows only later in the task's status. Here: 404
    for an unknown model, strategy or scoring method, 422 for such parameters and form fields, 409
    for a training before any ``final`` label, and a 400 for any image path but the upload or session
    image the request's own endpoint wrote (``server_files``). Batch infer runs on the CPU where
    there is no CUDA device and skips an image it cannot segment instead of ending.

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
    Every change this makes to MONAI Label is a row of ``appcore.seam.table``, applied and checked
    against the installed monailabel in ``on_init_complete`` (``appcore.seam.install``).
    """

    settings: Any  # the app's settings (``appcore.settings.Settings``): ``max_upload_mb`` is read

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if is_task_process():
            die_with_server()
        super().__init__(*args, **kwargs)
        store = self.datastore() if hasattr(self, "datastore") else None  # a test's stand-in app has none
        if isinstance(store, CheckedLocalDatastore) and store.history is None:
            store.history = self.label_history()  # saves in task processes (batch infer) are kept too

    # -- label history, reviews, audit (``appcore.history``) -------------------------------------
    def project_database(self) -> ProjectDB:
        """The project database: ``--conf database_url``, else ``project.db`` in this app's model folder."""
        model_dir = Path(getattr(self, "model_dir", None) or Path(self.app_dir) / "model")
        return project_db(model_dir, getattr(getattr(self, "settings", None), "database_url", ""))

    def label_history(self) -> LabelHistory:
        """The label versions, reviews and tombstones (their files in this app's model folder)."""
        model_dir = Path(getattr(self, "model_dir", None) or Path(self.app_dir) / "model")
        return LabelHistory(self.project_database(), model_dir / HISTORY_DIR)

    def review_gate(self, image_id: str) -> str | None:
        """Why ``image_id``'s ``final`` label is not training data by its review (``--conf train_on``), or None."""
        return self.label_history().not_for_training(image_id, self.settings.train_on)

    def on_init_complete(self) -> None:
        from monailabel.config import settings as ml_settings

        # First: a server that would listen on the network with no authentication does not start.
        check_open_door(
            listening_host(sys.argv),
            enabled=ml_settings.MONAI_LABEL_AUTH_ENABLE,
            allow_anonymous=self.settings.allow_anonymous,
        )
        children_stop_with_server()  # before anything starts a task
        store = self.datastore() if hasattr(self, "datastore") else None
        if isinstance(store, CheckedLocalDatastore):
            store.sweep_staged()  # what saves of a process killed mid-write (kill -9) left staged
            store.take_in_labels()  # labels saved before history was kept (datastore.json), or not recorded
        super().on_init_complete()
        if self.settings.expose_logs:
            serve_own_log(ml_settings.MONAI_LABEL_APP_DIR, ml_settings.MONAI_LABEL_SERVER_PORT)
        # Every route, rebinding and ASGI layer in front of MONAI Label, and the private members read,
        # checked against the installed monailabel: a SeamError here stops the server.
        seam.install(self)

    # -- sessions --------------------------------------------------------------------------------
    def _load_sessions(self, load: bool = False) -> CheckedSessions | None:
        from monailabel.config import settings as ml_settings

        if not load:
            return None
        return CheckedSessions(
            ml_settings.MONAI_LABEL_SESSION_PATH,
            ml_settings.MONAI_LABEL_SESSION_EXPIRY,
            max_upload_mb=self.settings.max_upload_mb,
            image_check=self.check_storable_image,
        )

    def check_storable_image(self, header: nib.Nifti1Image, what: str) -> None:
        """Refuse (4xx) an uploaded image or session image by its header; an app adds its models' limits."""
        check_volume(header, what)

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
        ``GET /model/<model>/versions`` has them) and the one served (``served_version``), and what
        ``appcore.seam`` changed in MONAI Label at start (``seam``: counts and the rows skipped)."""
        info = super().info()  # type: ignore[misc]
        report = seam.last_report()
        if report is not None:
            info["seam"] = report.summary()
        for name, entry in info.get("models", {}).items():
            if not self.has_weights(name):
                continue
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
            if trained is None or trained not in seam.infers(self) or self.version_store(trained).folder == folder:
                what = trained or "every model"
                return f"a training of {what} (started {task.get('start_ts')}) is {task['status'].lower()}"
        return None

    def on_training_stopped(self, model: str | None, started: float | None) -> None:
        """``DELETE /train/`` stopped the run of ``model`` (of every trainer for ``None``) begun at
        ``started`` (seconds since the epoch, if known); by default nothing is recorded."""

    def on_weights_changed(self, model: str) -> None:
        """Called after an upload replaced or a delete removed ``model``'s published weights."""

    def _known_infer(self, model: object) -> None:
        """404 for a model infer does not serve."""
        if model not in seam.infers(self):
            raise not_found(f"Unknown model {model!r}; served models: {sorted(seam.infers(self))}")

    def has_weights(self, model: str) -> bool:
        """Whether the served ``model`` has weights of its own (versions, uploads); an app whose
        models include some without (an interactive model on another's proposal) says so."""
        return True

    def _known_model(self, model: object) -> None:
        """404 for a model that has no weights here (the weights routes)."""
        own = sorted(m for m in seam.infers(self) if self.has_weights(m))
        if model not in seam.infers(self):
            raise not_found(f"Unknown model {model!r}; served models: {own}")
        if not self.has_weights(str(model)):
            raise not_found(f"Model {model!r} has no weights of its own; models with weights: {own}")

    def replace_weights(self, model: str, source: BinaryIO, client_id: str | None = None) -> dict[str, Any]:
        """Publish uploaded weights for ``model`` once they are known to fit its network.

        The upload is written beside the published file, checked (a PyTorch checkpoint read without
        running code, the network's tensor names and shapes, finite values: 422 otherwise; 413 over
        ``max_upload_mb``), kept as a new version (``started_by`` the request's user, ``client`` the
        ``client_id`` the client named itself by) and renamed over the
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
            record = {"source": "upload", "started_by": identity.user().name, "client": client_id}
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

    def request_image(self, request: dict[str, Any], datastore: Datastore | None, max_upload_mb: int) -> str:
        """The file an infer request names: the upload or session image its endpoint wrote for this
        very request (``server_files``), else a datastore image (404 if unknown).

        Any other absolute path is a 400, the same whether or not it exists: a client never names a
        server file, and cannot learn which exist."""
        self._known_infer(request.get("model"))
        check_device(request.get("device"), "Infer")
        image = request.get("image")
        if isinstance(image, str) and image in server_files():
            check_upload_size(image, max_upload_mb, "image")
            return image
        if isinstance(image, str) and os.path.isabs(image):
            raise bad_request(
                "Image must be a datastore id (GET /datastore/?output=all lists them), a file uploaded in the "
                "form field 'file' or a session (?session_id=), not a server path"
            )
        check_image_id(image)
        return (datastore or self.datastore()).get_image_uri(image)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer, at most ``infer_concurrency`` at once (requests run in worker threads
        now, ``THREADED_ROUTES``; before, the event loop ran one at a time)."""
        with self._infer_slot():
            result = super().infer(request, datastore)  # type: ignore[misc]
        image, model = request.get("image"), request.get("model")
        if isinstance(image, str) and isinstance(model, str):  # what a later save started from
            # no version for a model without weights of its own (an interactive or scribbles model)
            version = self.version_store(model).served_version() if self.has_weights(model) else None
            SERVED.note(image, model, version)
        return result

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
        if strategy not in seam.strategies(self):
            raise not_found(f"Unknown strategy {strategy!r}; strategies: {sorted(seam.strategies(self))}")
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
            # The labels it saves are authored by the user who asked for the batch (``started_by``,
            # written at request time: this runs in a task process, in MONAI Label's worker threads).
            started_by = req.get("started_by")
            signed = identity.current_user.set(identity.User(str(started_by))) if started_by else None
            try:
                return self.infer(req, store)
            except HTTPException as e:  # a refused series, a corrupt file, an unreachable PACS
                logger.warning("Batch infer skips %s: %s", req.get("image"), e.detail)
                return {"skipped": e.detail}
            finally:
                if signed is not None:
                    identity.current_user.reset(signed)

        return seam.batch_infer(self, request, datastore or self.datastore(), infer_or_skip)

    def bundle_path(self, model: str | None) -> str | None:
        # MONAI Label asks this before it starts a training or batch infer process: the place to
        # refuse an unknown model with a 404 instead of a background task that fails later.
        known = set(seam.trainers(self)) | set(seam.infers(self))
        if model is not None and model not in known:
            raise not_found(f"Unknown model {model!r}; models: {sorted(known)}")
        return None


class LabelingApp(RequestChecks, MONAILabelApp):
    """The base both apps extend: their registry, settings, model folder, reservations and weights.

    An app names what it plugs in (class attributes) and builds its tasks; the construction they
    share happens here once:

    - ``registry``: the models it can serve (``{"name": entry}``); ``--conf models`` picks among them
      (``self.models``, in the order asked for) and every task is built for those.
    - ``settings_class``: its ``appcore.settings.Settings`` subclass; an option it does not have is
      refused at start, with the list of those it has.
    - ``reservation_book``: the class that keeps which client holds which image
      (``strategies.reservations.ReservationBook``; appcore does not import strategies), one for all
      strategies, kept in ``<app_dir>/model/reservations.json`` across a restart.
    - weights: a model serves ``<app_dir>/model/<file>`` once a training or an upload published it
      (``published_weights``; models that run one network share it), its shipped weights before.
    - tasks: ``new_infer(model)`` for every served model and ``new_trainer(model)`` once per
      published file (listed under every model that shares it).

    MONAI Label's own scoring after each training (``_auto_update_scoring``) is off: the apps run
    their own scoring where it is needed.

    Args:
        app_dir: the app's folder (``--app``); its ``model`` folder holds what the server writes.
        studies: the studies folder or DICOMweb URL (``--studies``).
        conf: the ``--conf`` pairs, parsed by ``settings_class``.
    """

    registry: ClassVar[Mapping[str, Any]]
    settings_class: ClassVar[type[Settings]]
    reservation_book: ClassVar[Callable[..., Any]]
    app_name: ClassVar[str]
    app_description: ClassVar[str]
    app_version: ClassVar[str] = "0.1.0"

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.settings = self.settings_class.from_conf(conf or {}, self.registry)
        self.models: dict[str, Any] = {name: self.registry[name] for name in self.settings.models}
        self.model_dir = Path(app_dir) / "model"
        db = project_db(self.model_dir, self.settings.database_url)
        db.connection()  # a database it cannot reach or bring up to date stops the start, saying which and why
        # Kept in a file too: a restarted server must not hand an annotator's image to another.
        self.book = self.reservation_book(
            self.settings.reservation_s,
            path=self.model_dir / "reservations.json",  # an older server's, moved into the database
            max_pick=self.settings.max_k,
            db=db,
        )
        self.prepare()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=self.app_name,
            description=self.app_description,
            version=self.app_version,
        )
        # Scoring is triggered where it is needed (start, after training, on request), not by MONAI
        # Label after every training in the server's process.
        seam.no_auto_scoring(self)

    def prepare(self) -> None:
        """What the app sets up before MONAI Label builds its datastore and tasks (nothing by default)."""

    # -- models and weights ------------------------------------------------------------------------
    def spec(self, model: str) -> Any:
        """``model``'s spec (its network, shipped weights, labels): the registry entry by default."""
        return self.models[model]

    def published_weights(self, model: str) -> Path:
        return self.model_dir / f"{model}.pt"

    def shipped_weights(self, model: str) -> Path | None:
        return self.spec(model).shipped_weights_path

    def new_network(self, model: str) -> torch.nn.Module:
        return self.spec(model).network()

    def weight_paths(self, model: str) -> list[str]:
        """The files ``model`` may serve, in order of preference the last existing one: shipped, published."""
        shipped = self.shipped_weights(model)
        return [*([str(shipped)] if shipped else []), str(self.published_weights(model))]

    def studies_folder(self) -> str:
        """``--studies`` as a local folder; ``FileNotFoundError`` where there is none."""
        if not os.path.isdir(self.studies):
            raise FileNotFoundError(f"Studies folder {self.studies!r} does not exist; pass --studies DIR")
        return self.studies

    # -- tasks -------------------------------------------------------------------------------------
    def new_infer(self, model: str) -> Any:
        """The infer task of served model ``model``."""
        raise NotImplementedError(f"{type(self).__name__} builds no infer task (define new_infer)")

    def new_trainer(self, model: str) -> Any:
        """The training task of ``model``'s published weights (shared by the models that share them)."""
        raise NotImplementedError(f"{type(self).__name__} builds no training task (define new_trainer)")

    def init_infers(self) -> dict[str, Any]:
        return {name: self.new_infer(name) for name in self.models}

    def init_trainers(self) -> dict[str, Any]:
        # One trainer per published file: models running one network train the same weights.
        by_file: dict[Path, Any] = {}
        trainers = {}
        for name in self.models:
            path = self.published_weights(name)
            if path not in by_file:
                by_file[path] = self.new_trainer(name)
            trainers[name] = by_file[path]
        return trainers
