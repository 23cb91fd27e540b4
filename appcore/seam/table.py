"""Every change this project makes to MONAI Label (0.8.5), in the order ``appcore.seam.install`` applies it.

``docs/seam.md`` is generated from this table (``python -m appcore.seam``); a test checks it is current.
"""

from __future__ import annotations

from typing import Any

from appcore import app as checks
from appcore import auth, history_routes, model_routes
from appcore.cross_site import guard_cross_site, server_policy
from appcore.datastore import CheckedLocalDatastore
from appcore.dicom import labeling
from appcore.dicom import proxy as dicom_proxy
from appcore.dicom.ohif import serve_ohif
from appcore.routes import limit_request_bodies, serve_in_threads, time_request_bodies
from appcore.seam import (
    Kind,
    Row,
    batch_infer,
    infers,
    local_index,
    no_auto_scoring,
    scoring_methods,
    strategies,
    train_files,
    trainers,
)

_EP = "monailabel.endpoints"
_APP = "monailabel.interfaces.app:MONAILabelApp"
_LOCAL = "monailabel.datastore.local:LocalDatastore"
_TRAIN = "monailabel.tasks.train.basic_train:BasicTrainTask"
_INFER = "monailabel.tasks.infer.basic_infer:BasicInferTask"


def limit_bodies(app: Any) -> None:
    """``appcore.routes.limit_request_bodies`` at ``--conf max_upload_mb``, with room for the form around a file."""
    mb = app.settings.max_upload_mb
    limit_request_bodies((mb + 1) * 2**20, limit_mb=mb)


def time_bodies(app: Any) -> None:
    """``appcore.routes.time_request_bodies`` at ``--conf body_timeout_s``."""
    time_request_bodies(app.settings.body_timeout_s)


def guard_sites(app: Any) -> None:
    """``appcore.cross_site.guard_cross_site`` with ``--conf cors_origins`` and ``allowed_hosts``."""
    guard_cross_site(server_policy(app.settings.cors_origins, app.settings.allowed_hosts))


def audit_log(app: Any) -> None:
    """``appcore.history_routes.audit_requests`` into the app's project database."""
    history_routes.audit_requests(app.label_history().db)


def _rebind(target: str, replacement: Any, why: str, *, wraps: bool = False, when: str = "") -> Row:
    return Row(target, Kind.REBIND, replacement, why, wraps=wraps, when=when)


def _refuse(target: str, refusal: Any, name: str, why: str, *, read_body: bool = True) -> Row:
    return Row(target, Kind.ROUTE_IN_FRONT, refusal, why, name=name, how="refuse", read_body=read_body)


def _private(target: str, reader: Any, why: str, kind: Kind = Kind.PRIVATE_READ) -> Row:
    return Row(target, kind, reader, why)


_THREADED_WHY = "MONAI Label's async endpoint runs synchronous work on the server's only event loop"

ROWS: tuple[Row, ...] = (
    # -- routes first in MONAI Label's router (the last one placed answers first) ---------------------
    *(
        Row(f"{m} /model/{p}", Kind.ROUTE_IN_FRONT, endpoint, why, name=name, how="api")
        for m, p, endpoint, name, why in (
            (
                "GET",
                "{model}/versions",
                model_routes.versions,
                "model_versions",
                "MONAI Label keeps no weight versions",
            ),
            ("PUT", "{model}/serve", model_routes.serve, "model_serve_version", "MONAI Label cannot roll weights back"),
            ("GET", "{model}", model_routes.download, "model_download_versioned", "serves one version or a bundle"),
            ("PUT", "{model}", model_routes.upload, "model_upload_versioned", "a checked upload, naming its client"),
        )
    ),
    Row(
        "POST /auth/token",
        Kind.ROUTE_IN_FRONT,
        auth.token,
        "calls the realm on the event loop; a refused password is a 500",
        name="auth_token",
        how="api",
    ),
    *(
        Row(f"{m} {p}", Kind.ROUTE_IN_FRONT, endpoint, why, name=name, how="api")
        for m, p, endpoint, name, why in history_routes.ROUTES
    ),
    *(
        Row(
            f"{','.join(methods)} {path}",
            Kind.ROUTE_IN_FRONT,
            serve_in_threads,
            _THREADED_WHY,
            name=f"threaded {path}",
            how="threaded",
        )
        for path, methods in checks.THREADED_ROUTES
    ),
    _refuse(
        "POST /scoring/{method}",
        checks._unknown_scoring,
        "refuse_scoring",
        "an unknown method or bad parameters start a failing task",
    ),
    _refuse("POST /scoring/", checks._unknown_scoring_all, "refuse_scoring_all", "bad parameters start a failing task"),
    _refuse(
        "POST /batch/infer/{model}",
        checks._bad_batch_infer,
        "refuse_batch_infer",
        "bad parameters start a failing task",
    ),
    _refuse(
        "POST /train/{model}",
        checks._cannot_train,
        "refuse_train_model",
        "an unknown model, bad parameters or no label start a failing task",
    ),
    _refuse(
        "POST /train/", checks._cannot_train, "refuse_train_all", "bad parameters or no label start a failing task"
    ),
    _refuse(
        "POST /infer/{model}",
        checks._unservable_infer,
        "refuse_infer",
        "output=dicom_seg is a 500 off a DICOMweb datastore",
        read_body=False,
    ),
    _refuse("GET /logs/gpu", checks._no_gpu_info, "refuse_gpu_info", "a 500 without nvidia-smi"),
    _refuse(
        "GET /logs/",
        checks._hidden_logs,
        "refuse_logs",
        "the log names images and folders, served to anyone",
        read_body=False,
    ),
    _refuse(
        "GET,POST /proxy/dicom/{path:path}",
        checks._no_dicomweb,
        "refuse_dicom_proxy",
        "a 500 on a local studies folder",
        read_body=False,
    ),
    *(
        Row(f"GET {path}", Kind.ROUTE_IN_FRONT, serve_ohif, why, name=name, how="app")
        for path, name, why in (
            ("/ohif/app-config.js", "ohif_app_config", "the wheel's OHIF configuration cannot be set"),
            ("/ohif/labeling/{name}", "ohif_extension", "the labeling panel is an extension of OHIF 3.13"),
            ("/ohif/{path:path}", "ohif_viewer", "the wheel's OHIF cannot save a label: OHIF 3.13 is served"),
        )
    ),
    *(
        Row(f"{m} {p}", Kind.ROUTE_IN_FRONT, endpoint, "the OHIF labeling panel's server side", name=name, how="api")
        for m, p, endpoint, name in (
            ("POST", "/labeling/next", labeling.next_case, "labeling_next"),
            ("GET", "/labeling/proposal", labeling.proposal, "labeling_proposal"),
            ("PUT", "/labeling/label", labeling.save_label, "labeling_save"),
            ("GET", "/labeling/status", labeling.status, "labeling_status"),
            ("POST", "/labeling/clicks", labeling.clicks, "labeling_clicks"),
        )
    ),
    # -- names rebound in MONAI Label's endpoint modules (they look them up at each request) -----------
    *(
        _rebind(f"{module}:json", checks._FormJson, "a form field that is not a JSON object is a 500")
        for module in checks.FORM_JSON_MODULES
    ),
    _rebind(f"{_EP}.model:update_model", checks._update_model, "copies any upload over the served weights in place"),
    _rebind(
        f"{_EP}.model:delete_model", checks._delete_model, "removes whatever file is served, shipped weights included"
    ),
    _rebind(
        f"{_EP}.train:stop",
        checks._records_stops,
        "/info's train_stats would go on describing the run before",
        wraps=True,
    ),
    _rebind(
        f"{_EP}.user.auth:from_token",
        auth.from_token,
        "jwt.decode without algorithms refuses every token under PyJWT 2; RBAC wants exact roles",
    ),
    *(
        _rebind(f"{_EP}.train:{function}", checks._signed_by_user, "a run names no user", wraps=True)
        for function in ("run_model", "run")
    ),
    _rebind(
        f"{_EP}.batch_infer:run", checks._signed_by_user, "a batch infer's labels were saved as anonymous", wraps=True
    ),
    _rebind(f"{_EP}.proxy:proxy_dicom", dicom_proxy.proxy_dicom, "a slow PACS blocks the server's event loop"),
    *(
        _rebind(f"{module}:{function}", checks._needs_input, "an infer with nothing to segment is a 500", wraps=True)
        for module, function in checks.INFER_FUNCTIONS
    ),
    *(
        _rebind(
            f"{module}:{function}",
            checks._removes_uploads_on_error,
            "a refused upload stays in the temporary folder",
            wraps=True,
        )
        for module, function in checks.UPLOAD_FUNCTIONS
    ),
    *(
        _rebind(f"{module}:{function}", checks._short_upload_names, "a file name over 255 bytes is a 500", wraps=True)
        for module, function in checks.NAMED_UPLOAD_FUNCTIONS
    ),
    _rebind(
        f"{_EP}.datastore:download_dataset",
        checks._download_dataset,
        "writes the whole archive on the event loop and keeps it",
    ),
    _rebind(f"{_EP}.datastore:datastore", checks._datastore_listing, "the listing names server paths", wraps=True),
    *(
        _rebind(f"{_EP}.{module}:status", checks._no_task_paths, "a task's status names server folders", wraps=True)
        for module in ("train", "scoring", "batch_infer")
    ),
    *(
        _rebind(
            f"{_EP}.session:{function}", checks._no_session_paths, "a session's answer names server paths", wraps=True
        )
        for function in ("create_session", "get_session", "remove_session")
    ),
    _rebind(
        f"{_EP}.logs:get_logs",
        checks._own_log_reader,
        "app.log is shared by every server on the app folder",
        wraps=True,
        when="expose_logs",
    ),
    # -- layers around the built ASGI stack, innermost first --------------------------------------------
    Row(
        "middleware: request body size",
        Kind.MIDDLEWARE,
        limit_bodies,
        "an upload of any size is written to disk before a check",
        name="_BodyLimit",
    ),
    Row(
        "middleware: request body pauses",
        Kind.MIDDLEWARE,
        time_bodies,
        "a stalled body holds its request (and thread) forever",
        name="_BodyTimeout",
    ),
    Row(
        "middleware: authentication and roles",
        Kind.MIDDLEWARE,
        auth.guard_requests,
        "no token check before the body is read, and no role on most routes",
        name="AuthLayer",
    ),
    Row(
        "middleware: CORSMiddleware",
        Kind.MIDDLEWARE,
        guard_sites,
        "every origin is allowed, with credentials; no host check",
        name="_CrossSiteGuard",
    ),
    Row(
        "middleware: audit log",
        Kind.MIDDLEWARE,
        audit_log,
        "no record of who changed what; outermost, so refusals by inner layers are recorded",
        name="_AuditLog",
    ),
    # -- private members read or set, through the accessors of appcore.seam --------------------------
    _private(f"{_APP}._infers", infers, "the infer tasks by name: no public accessor"),
    _private(f"{_APP}._trainers", trainers, "the train tasks by name: no public accessor"),
    _private(f"{_APP}._strategies", strategies, "the strategies by name: no public accessor"),
    _private(f"{_APP}._scoring_methods", scoring_methods, "the scoring methods by name: no public accessor"),
    _private(
        f"{_APP}._auto_update_scoring", no_auto_scoring, "set off: MONAI Label would score in the server's process"
    ),
    _private(f"{_APP}._batch_infer", batch_infer, "MONAI Label's batch loop, with an infer that skips bad images"),
    _private(
        f"{_APP}._load_sessions",
        checks.RequestChecks._load_sessions,
        "sessions checked by header",
        Kind.SUBCLASS_OVERRIDE,
    ),
    _private(
        "monailabel.utils.async_tasks.utils:background_processes",
        "appcore.lifecycle.background_children",
        "the task processes to stop with the server",
    ),
    # -- private members of LocalDatastore, read or overridden by appcore.datastore's subclass --------
    _private(
        f"{_LOCAL}._datastore",
        local_index,
        "its index of images and labels: checked writes keep it current",
    ),
    *(
        _private(f"{_LOCAL}.{member}", CheckedLocalDatastore, why)
        for member, why in (
            ("_datastore_path", "the index file's folder (DICOMweb cache)"),
            ("_extensions", "the file patterns the folder watcher notices"),
            ("_filename", "an image's or label's file name"),
            ("_datastore_config_path", "the index file, written beside and renamed into place"),
            ("_config_ts", "the index file's time as last read or written: no re-read of its own write"),
            ("_lock_file", "the index's lock"),
            ("_to_id", "a file's image id"),
        )
    ),
    *(
        _private(f"{_LOCAL}.{member}", CheckedLocalDatastore, why, Kind.SUBCLASS_OVERRIDE)
        for member, why in (
            ("_on_any_event", "a changed file loses its score"),
            ("_on_modify_event", "a changed file loses its score"),
            ("_reconcile_datastore", "files removed from the folder lose their scores"),
            ("_init_from_datastore_file", "a cut-off index file is set aside at start, not a failed start"),
            ("_update_datastore_file", "the index written beside and renamed into place (kill -9 safe)"),
        )
    ),
    # -- private members of MONAI Label's tasks, read by radiology's subclasses ----------------------
    *(
        _private(f"{_TRAIN}.{member}", train_files, why)
        for member, why in (
            ("_model_dir", "where MONAI Label writes a run's files: a stale best-metric file is removed"),
            ("_key_metric_filename", "the best-metric file's name"),
            ("_load_path", "the weights a run starts from"),
            ("_stats_path", "where train_stats are written"),
        )
    ),
    _private(
        f"{_INFER}._get_network",
        "radiology.infer.SegmentationInfer",
        "the network MONAI Label loaded, with its weights",
    ),
)
