"""The one place this project changes MONAI Label rather than extends it, checked at start.

Every interception is a row of ``appcore.seam.table.ROWS``: what of MONAI Label is replaced or read,
by what of ours, why, and for which monailabel version. ``install`` applies the rows in order when
the app has been built (``RequestChecks.on_init_complete``); ``check`` verifies that each is in
place and that the installed monailabel is the version the table was written for, and
``install`` raises ``SeamError`` otherwise: MONAI Label's start-up (a FastAPI lifespan) then fails
and the server exits with the message instead of serving half-patched.

MONAI Label builds its FastAPI application (routes, CORS middleware) when ``monailabel.app`` is
imported, before it creates the app, and Starlette builds the middleware stack before the
lifespan runs; ``add_middleware`` and ``include_router`` are refused or come too late by then. So
routes are inserted at the front of the built router and layers wrapped around the built stack,
here and nowhere else (``server_routes``, ``server_stack``, ``set_server_stack``).

The other packages read MONAI Label's private members through the accessors below
(``infers(app)``, ...), each a row of the table.
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import inspect
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MONAILABEL_VERSION = "0.8.5"  # the version every row was written for and checked against


class Kind(enum.StrEnum):
    """How a row changes MONAI Label."""

    REBIND = "rebind"  # a name in one of its modules is bound to ours
    ROUTE_IN_FRONT = "route-in-front"  # a route of ours goes first in its router
    MIDDLEWARE = "middleware"  # a layer of ours wraps its built ASGI stack
    PRIVATE_READ = "private-read"  # one of its private members is read (or set) by our code
    SUBCLASS_OVERRIDE = "subclass-override"  # one of its private methods is overridden by a subclass of ours


@dataclass(frozen=True)
class Row:
    """One interception of MONAI Label.

    Args:
        target: what of MONAI Label: ``module:name`` (rebind), ``METHODS path`` (route),
            ``middleware: <what>``, or ``module:Class.member`` (private read, override).
        kind: how it is changed.
        replacement: ours: the function or class bound, the route's refusal or endpoint, the
            function that wraps the stack, or the accessor or subclass that reads the member.
        why: one line: what MONAI Label does that this changes.
        since: the monailabel version this was written for.
        name: the route's name or the ASGI layer's class name, which ``check`` looks for.
        wraps: for a rebind, ``replacement(original)`` is bound instead of ``replacement``.
        how: for a route, ``refuse``, ``threaded`` or ``api`` (``appcore.routes``, FastAPI).
        read_body: for a refusing route, whether its refusal gets the body.
        when: the app setting that must be true for the row to apply (empty: always).
    """

    target: str
    kind: Kind
    replacement: Any
    why: str
    since: str = MONAILABEL_VERSION
    name: str = ""
    wraps: bool = False
    how: str = ""
    read_body: bool = True
    when: str = ""

    @property
    def key(self) -> str:
        """The row's name in logs, ``/info`` and error messages."""
        if self.kind is Kind.REBIND:  # one name may be wrapped by several rows
            return f"{self.kind.value} {self.target} <- {self.replacement_name.rsplit('.', 1)[-1]}"
        return f"{self.kind.value} {self.target}" + (f" ({self.name})" if self.name else "")

    @property
    def replacement_name(self) -> str:
        what = self.replacement
        if isinstance(what, str):  # named, not imported: code of a package that imports appcore
            return what
        return f"{getattr(what, '__module__', '?')}.{getattr(what, '__qualname__', repr(what))}"


@dataclass(frozen=True)
class Outcome:
    """What became of one row at start: ``applied``, ``skipped`` (the reason) or ``failed`` (the reason)."""

    row: Row
    state: str
    reason: str = ""


@dataclass
class Report:
    """What ``install`` did, row by row, and the version found."""

    version: str
    outcomes: list[Outcome] = field(default_factory=list)

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "failed"]

    def summary(self) -> dict[str, Any]:
        """For ``/info`` (``seam``): the version found and expected, how many rows applied, the rows skipped."""
        return {
            "monailabel": self.version,
            "written_for": MONAILABEL_VERSION,
            "rows": len(self.outcomes),
            "applied": sum(o.state == "applied" for o in self.outcomes),
            "skipped": {o.row.key: o.reason for o in self.outcomes if o.state == "skipped"},
            "table": "docs/seam.md",
        }


class SeamError(RuntimeError):
    """The installed MONAI Label is not the one the table was written for, or rows did not apply."""


# -- the running server -----------------------------------------------------------------------------


def server_app() -> Any:
    """MONAI Label's FastAPI application in the server process; None elsewhere (a training child, a
    test building the app in-process)."""
    server = sys.modules.get("monailabel.app")
    return getattr(server, "app", None)


def server_routes() -> list[Any] | None:
    """The running server's router's list of routes (None outside a server)."""
    app = server_app()
    return None if app is None else app.router.routes


def insert_first(route: Any) -> bool:
    """Put ``route`` first in the running server's router unless a route of that name is there.

    Returns whether such a route is in place (False outside a server process).
    """
    routes = server_routes()
    if routes is None:
        return False
    if not any(getattr(r, "name", None) == route.name for r in routes):
        routes.insert(0, route)
    return True


def server_stack() -> Any:
    """The running server's built ASGI middleware stack (None outside a server, or before Starlette built it)."""
    return getattr(server_app(), "middleware_stack", None)


def set_server_stack(stack: Any) -> None:
    """Make ``stack`` the running server's ASGI middleware stack."""
    server_app().middleware_stack = stack


def stack_layers(stack: Any) -> list[Any]:
    """The layers of an ASGI stack, outermost first (following ``.app`` and ``.inner``)."""
    layers, layer, seen = [], stack, set()
    while layer is not None and id(layer) not in seen:
        seen.add(id(layer))
        layers.append(layer)
        layer = getattr(layer, "app", getattr(layer, "inner", None))
    return layers


# -- accessors of MONAI Label's private members (rows of the table) ---------------------------------


def infers(app: Any) -> dict[str, Any]:
    """``MONAILabelApp._infers``: the app's infer tasks by model name."""
    return app._infers


def trainers(app: Any) -> dict[str, Any]:
    """``MONAILabelApp._trainers``: the app's train tasks by model name."""
    return app._trainers


def strategies(app: Any) -> dict[str, Any]:
    """``MONAILabelApp._strategies``: the app's active learning strategies by name."""
    return app._strategies


def scoring_methods(app: Any) -> dict[str, Any]:
    """``MONAILabelApp._scoring_methods``: the app's scoring methods by name."""
    return app._scoring_methods


def no_auto_scoring(app: Any) -> None:
    """Turn off ``MONAILabelApp._auto_update_scoring``: MONAI Label would score every image after
    each training in the server's process; the apps run their own scoring."""
    app._auto_update_scoring = False


def local_index(store: Any) -> Any:
    """``LocalDatastore._datastore``: its index of images and labels (``objects``, ``image_path()``,
    ``label_path(tag)``, ``label(id, tag)``), which the checked datastores keep current."""
    return store._datastore


@dataclass(frozen=True)
class TrainFiles:
    """Where MONAI Label's ``BasicTrainTask`` keeps a trainer's files (its private members)."""

    model_dir: str  # ``_model_dir``: each run's folder is ``<model_dir>/<request name>``
    key_metric_filename: str  # ``_key_metric_filename``: the best checkpoint's name in a run's folder
    load_path: str | None  # ``_load_path``: the weights the task was configured to start from
    stats_path: str  # ``_stats_path``: the stats file ``/info``'s ``train_stats`` reads


def train_files(task: Any) -> TrainFiles:
    """A ``BasicTrainTask``'s files: ``_model_dir``, ``_key_metric_filename``, ``_load_path``, ``_stats_path``."""
    return TrainFiles(task._model_dir, task._key_metric_filename, task._load_path, task._stats_path)


def batch_infer(app: Any, request: dict[str, Any], datastore: Any, infer: Callable[..., Any]) -> Any:
    """``MONAILabelApp._batch_infer``: MONAI Label's batch infer loop, each image through ``infer``."""
    return app._batch_infer(request, datastore, infer)


# -- install and check -----------------------------------------------------------------------------


def installed_version() -> str:
    """The installed monailabel's version (its distribution's metadata)."""
    return importlib.metadata.version("monailabel")


def _module_attr(target: str) -> tuple[str, str]:
    module, _, name = target.partition(":")
    return module, name


def _route(target: str) -> tuple[list[str], str]:
    methods, _, path = target.partition(" ")
    return methods.split(","), path


def _rebound(value: Any) -> tuple[str, ...]:
    return tuple(getattr(value, "__seam_rows__", ()))


def _apply_rebind(row: Row, in_server: bool) -> Outcome:
    module_name, name = _module_attr(row.target)
    module = sys.modules.get(module_name)
    if module is None:
        if in_server:
            return Outcome(row, "failed", f"module {module_name} is not loaded in the server")
        return Outcome(row, "skipped", "not loaded outside a server")
    if not hasattr(module, name):
        return Outcome(row, "failed", f"{module_name} has no {name!r}")
    current = getattr(module, name)
    if row.key in _rebound(current):
        return Outcome(row, "applied", "already")
    value = row.replacement(current) if row.wraps else row.replacement
    # A replacement may serve several rows (one class for three modules), and a wrapper keeps the
    # rows of what it wraps: every row a name carries is checked.
    marks = tuple(dict.fromkeys((*(_rebound(current) if row.wraps else ()), *_rebound(value), row.key)))
    try:
        value.__seam_rows__ = marks
    except (AttributeError, TypeError):
        return Outcome(row, "failed", f"{row.replacement_name} cannot be marked as this row's")
    setattr(module, name, value)
    return Outcome(row, "applied")


def _apply_route(row: Row) -> Outcome:
    from appcore import routes as our_routes

    methods, path = _route(row.target)
    if row.how == "refuse":
        placed = our_routes.refuse_early(path, methods, row.replacement, name=row.name, read_body=row.read_body)
    elif row.how == "threaded":
        placed = row.replacement(path, methods, name=row.name)
    elif row.how == "app":  # the app places it itself, where it applies
        placed = row.name in {getattr(r, "name", None) for r in server_routes() or []}
        return Outcome(row, "applied") if placed else Outcome(row, "skipped", "not placed by this app")
    elif row.how == "api":
        from fastapi import APIRouter

        router = APIRouter()
        router.add_api_route(path, row.replacement, methods=methods, name=row.name)
        placed = insert_first(router.routes[0])
    else:
        return Outcome(row, "failed", f"unknown route kind {row.how!r}")
    return Outcome(row, "applied") if placed else Outcome(row, "failed", "the router could not be changed")


def _apply_middleware(row: Row, app: Any) -> Outcome:
    if server_stack() is None:
        return Outcome(row, "failed", "Starlette has not built the middleware stack")
    row.replacement(app)
    return Outcome(row, "applied")


def _member_exists(target: str) -> bool:
    """Whether ``module:Class.member`` (or ``module:name``) exists in the installed MONAI Label:
    a class attribute, or an instance attribute its source assigns (``self.member =``)."""
    module_name, dotted = _module_attr(target)
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return False
    *path, member = dotted.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    if hasattr(owner, member):
        return True
    if not inspect.isclass(owner):
        return False
    for cls in owner.__mro__:
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(member)}\s*(:[^=]*)?=[^=]", source):
            return True
    return False


def _apply(row: Row, app: Any, in_server: bool) -> Outcome:
    if row.when and not getattr(getattr(app, "settings", None), row.when, False):
        return Outcome(row, "skipped", f"--conf {row.when} is off")
    if row.kind in (Kind.PRIVATE_READ, Kind.SUBCLASS_OVERRIDE):
        if _member_exists(row.target):
            return Outcome(row, "applied")
        return Outcome(row, "failed", f"{row.target} does not exist in the installed monailabel")
    if row.kind is Kind.REBIND:
        return _apply_rebind(row, in_server)
    if not in_server:
        return Outcome(row, "skipped", "outside a server")
    if row.kind is Kind.ROUTE_IN_FRONT:
        return _apply_route(row)
    return _apply_middleware(row, app)


def _in_place(row: Row) -> str | None:
    """Why ``row`` (applied) is not in place in the running server, or None."""
    if row.kind is Kind.REBIND:
        module_name, name = _module_attr(row.target)
        if row.key not in _rebound(getattr(sys.modules.get(module_name), name, None)):
            return f"{row.target} is not ours"
    elif row.kind is Kind.ROUTE_IN_FRONT:
        routes = server_routes() or []
        ours = {r.name for r in ROWS() if r.kind is Kind.ROUTE_IN_FRONT}
        names = [getattr(r, "name", None) for r in routes]
        if row.name not in names:
            return f"no route named {row.name}"
        path = _route(row.target)[1]
        theirs = [i for i, r in enumerate(routes) if getattr(r, "path", None) == path and names[i] not in ours]
        if theirs and names.index(row.name) > theirs[0]:
            return f"{row.name} is behind MONAI Label's route {names[theirs[0]]} for {path}"
    elif row.kind is Kind.MIDDLEWARE and row.name not in {type(x).__name__ for x in stack_layers(server_stack())}:
        return f"no {row.name} layer in the server's ASGI stack"
    return None


def ROWS() -> Sequence[Row]:  # noqa: N802 - the table, imported late: its rows name code that imports this module
    from appcore.seam.table import ROWS as rows

    return rows


# The packages whose routes and ASGI layers must each be a row of the table.
OURS = ("appcore", "radiology", "pathology", "strategies", "apps")


def _ours(what: Any) -> bool:
    return getattr(what, "__module__", "").split(".")[0] in OURS


def undeclared() -> list[str]:
    """Routes and ASGI layers of ours in the running server that no row of the table names: each
    change to MONAI Label's router or stack is declared, whichever module made it."""
    rows = ROWS()
    routes = {r.name for r in rows if r.kind is Kind.ROUTE_IN_FRONT}
    layers = {r.name for r in rows if r.kind is Kind.MIDDLEWARE}
    found = [
        f"route {getattr(r, 'name', None)!r} ({getattr(r, 'path', '?')}) is not a row of the table"
        for r in server_routes() or []
        if _ours(getattr(r, "endpoint", None) or getattr(r, "app", None)) and getattr(r, "name", None) not in routes
    ]
    found += [
        f"ASGI layer {type(layer).__name__} is not a row of the table"
        for layer in stack_layers(server_stack())
        if _ours(type(layer)) and type(layer).__name__ not in layers
    ]
    return found


def check(report: Report) -> None:
    """Raise ``SeamError`` unless the installed monailabel is ``MONAILABEL_VERSION``, every row
    that applied is in place (in a server: every row that was not skipped by its setting), and, in a
    server, every route and ASGI layer of ours is a row (``undeclared``)."""
    problems = [f"{o.row.key}: {o.reason}" for o in report.failed()]
    in_server = server_app() is not None
    for outcome in report.outcomes:
        if outcome.state == "applied" and (in_server or outcome.row.kind is Kind.REBIND):
            why = _in_place(outcome.row)
            if why is not None:
                problems.append(f"{outcome.row.key}: {why}")
    unlisted = undeclared() if in_server else []
    if report.version != MONAILABEL_VERSION or problems:
        rows = "\n".join(f"  - {p}" for p in problems + unlisted) or "  (none)"
        raise SeamError(
            f"monailabel {report.version} is installed; this server's changes to MONAI Label "
            f"(appcore/seam/table.py) were written for monailabel {MONAILABEL_VERSION}. Rows that did not "
            f"apply:\n{rows}\nInstall monailabel=={MONAILABEL_VERSION} (requirements.txt), or check each row "
            "against the new version and raise MONAILABEL_VERSION in appcore/seam/__init__.py"
        )
    if unlisted:
        rows = "\n".join(f"  - {p}" for p in unlisted)
        raise SeamError(
            f"Changes to MONAI Label's router or ASGI stack that appcore/seam/table.py does not declare:\n{rows}\n"
            "Add a row for each to the table (then python -m appcore.seam > docs/seam.md)"
        )


_REPORT: Report | None = None


def apply(rows: Sequence[Row], app: Any = None) -> list[Outcome]:
    """Apply ``rows`` in order, without the checks of ``install``; applying twice changes nothing more."""
    in_server = server_app() is not None
    outcomes = []
    for row in rows:
        try:
            outcome = _apply(row, app, in_server)
        except Exception as e:  # a row that cannot apply is reported by name, with the others
            outcome = Outcome(row, "failed", f"{type(e).__name__}: {e}")
        logger.debug(
            "MONAI Label seam: %s %s%s", outcome.state, row.key, f" ({outcome.reason})" if outcome.reason else ""
        )
        outcomes.append(outcome)
    return outcomes


def install(app: Any, rows: Sequence[Row] | None = None) -> Report:
    """Apply ``rows`` (the table) for ``app`` in order, check them and the installed version, and log
    one line per row (debug) and a summary (info). Raises ``SeamError`` where the check fails."""
    global _REPORT
    report = Report(installed_version(), apply(ROWS() if rows is None else rows, app))
    check(report)
    applied = sum(o.state == "applied" for o in report.outcomes)
    logger.info(
        "MONAI Label seam: %d of %d rows applied for monailabel %s (appcore/seam/table.py)",
        applied,
        len(report.outcomes),
        report.version,
    )
    _REPORT = report
    return report


def last_report() -> Report | None:
    """What the last ``install`` in this process did (None before one)."""
    return _REPORT


_KIND_TITLES = {
    Kind.ROUTE_IN_FRONT: "Routes put first in MONAI Label's router",
    Kind.REBIND: "Names rebound in MONAI Label's modules",
    Kind.MIDDLEWARE: "Layers around MONAI Label's built ASGI stack",
    Kind.PRIVATE_READ: "Private members read or set (through the accessors of `appcore.seam`)",
    Kind.SUBCLASS_OVERRIDE: "Private methods overridden by subclasses",
}


def markdown(rows: Sequence[Row] | None = None) -> str:
    """``docs/seam.md``: every row of the table, by kind, in the order they are applied."""
    rows = ROWS() if rows is None else rows
    lines = [
        "# How this project changes MONAI Label",
        "",
        "Generated from `appcore/seam/table.py` by `python -m appcore.seam > docs/seam.md`; a test checks",
        "that it is current. Every row was written for monailabel "
        f"{MONAILABEL_VERSION}: at start the server checks the",
        "installed version and that every row applied, and stops with a message naming the rows that did not;",
        "a route or ASGI layer of this project's packages that no row names stops it too.",
        "MONAI Label builds its FastAPI application (routes, CORS) when `monailabel.app` is imported, before it",
        "creates the app, and Starlette has built the middleware stack before the app's `on_init_complete`",
        "runs: `add_middleware` and `include_router` are refused or come too late then, so routes go in",
        "front of the built router and layers around the built stack.",
    ]
    for kind, title in _KIND_TITLES.items():
        chosen = [r for r in rows if r.kind is kind]
        if not chosen:
            continue
        lines += ["", f"## {title}", "", "| target | ours | why | since |", "|---|---|---|---|"]
        for row in chosen:
            target = f"`{row.target}`" + (f" (`{row.name}`)" if row.name and kind is not Kind.MIDDLEWARE else "")
            extra = " (wrapping it)" if row.wraps else ""
            extra += f" (with `--conf {row.when} true`)" if row.when else ""
            cells = (target, f"`{row.replacement_name}`{extra}", row.why, row.since)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
