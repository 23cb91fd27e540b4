"""The one seam with MONAI Label (``appcore.seam``): its table applies in a real server, is checked
against the installed monailabel, names the rows that did not apply, and is the only code that
touches MONAI Label's internals."""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from appcore import seam
from appcore.seam import MONAILABEL_VERSION, Kind, Row, SeamError
from appcore.seam.table import ROWS
from tests.conftest import HIPPO, ROOT, requires_shared
from tests.servers import Server, monailabel_server

CASE = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
CONF = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}


def _studies(root: Path) -> Path:
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(CASE, studies / CASE.name)
    return studies


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("seam")
    with monailabel_server(root, str(_studies(root)), {**CONF, "expose_logs": "true"}) as running:
        yield running


@requires_shared
def test_every_row_applies_in_a_real_server(server: Server) -> None:
    log = server.log.read_text()
    # OHIF's routes are the radiology app's own, on a studies folder too (the wheel's OHIF is never served)
    applicable = len(ROWS)
    summary = f"MONAI Label seam: {applicable} of {len(ROWS)} rows applied for monailabel {MONAILABEL_VERSION}"
    assert summary in log, log[-3000:]
    shown = server.http.get("/info/").json()["seam"]
    assert shown["monailabel"] == shown["written_for"] == MONAILABEL_VERSION, shown
    assert (shown["rows"], shown["applied"]) == (len(ROWS), applicable), shown
    assert list(shown["skipped"]) == [], shown
    # A row of each kind at work: a route in front, a rebound name, a layer, a conditional rebinding.
    assert server.http.post("/scoring/nope", json={}).status_code == 404, "refuse_scoring answers first"
    bad = server.http.put("/datastore/label", params={"image": "x"}, data={"params": "[1]"}, files={"label": b"x"})
    assert bad.status_code == 422 and "must be a JSON object" in bad.text, bad.text
    foreign = server.http.post("/info/", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403, foreign.text
    assert "This server logs to" in server.http.get("/logs/", params={"text": "true", "lines": 2000}).text, (
        "the own log is served"
    )


_WRONG_VERSION = """
import importlib.metadata as _metadata

_version = _metadata.version


def _pretend(name):
    return "0.9.0" if name.lower() == "monailabel" else _version(name)


_metadata.version = _pretend
"""


@requires_shared
def test_a_server_on_another_monailabel_stops_with_the_message(tmp_path: Path) -> None:
    """A real server whose monailabel reports 0.9.0 (a ``sitecustomize`` changes the version lookup)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_WRONG_VERSION)
    env = {"PYTHONPATH": f"{site}:{ROOT}"}
    with (
        pytest.raises(AssertionError, match=r"monailabel 0\.9\.0 is installed.*written for monailabel 0\.8\.5") as e,
        monailabel_server(tmp_path, str(_studies(tmp_path)), CONF, env=env, timeout=240),
    ):
        pass
    assert "Application startup failed" in str(e.value), "uvicorn ends the process (exit status 3)"


def test_another_version_stops_the_start_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seam, "installed_version", lambda: "0.9.0")
    with pytest.raises(SeamError, match=r"monailabel 0\.9\.0 is installed.*written for monailabel 0\.8\.5"):
        seam.install(None)


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Starlette:
    """A server process as MONAI Label's: ``monailabel.app.app``, its stack built."""

    async def theirs(request: object) -> None:
        raise AssertionError("not called")

    app = Starlette(routes=[Route("/train/{model}", theirs, methods=["POST"], name="theirs")])
    app.middleware_stack = app.build_middleware_stack()
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    return app


_MISSING = (
    (Row("monailabel.endpoints.infer:no_such_function", Kind.REBIND, len, "x"), "has no 'no_such_function'"),
    (Row("monailabel.no_such_module:f", Kind.REBIND, len, "x"), "module monailabel.no_such_module is not loaded"),
    (
        Row("monailabel.interfaces.app:MONAILabelApp._no_such_member", Kind.PRIVATE_READ, len, "x"),
        "does not exist in the installed monailabel",
    ),
    (
        Row("monailabel.datastore.local:NoSuchClass._datastore", Kind.SUBCLASS_OVERRIDE, len, "x"),
        "does not exist in the installed monailabel",
    ),
    (Row("middleware: x", Kind.MIDDLEWARE, lambda app: None, "x", name="_Nothing"), "no _Nothing layer"),
    (Row("POST /train/{model}", Kind.ROUTE_IN_FRONT, len, "x", name="r", how="sideways"), "unknown route kind"),
)


@pytest.mark.parametrize(("row", "reason"), _MISSING, ids=[r.target for r, _ in _MISSING])
@pytest.mark.usefixtures("fake_server")
def test_a_row_that_cannot_apply_is_named(row: Row, reason: str) -> None:
    import monailabel.endpoints.infer  # noqa: F401 - loaded, as in a server: its missing name is the row's fault

    good = Row("monailabel.interfaces.app:MONAILabelApp._infers", Kind.PRIVATE_READ, seam.infers, "x")
    with pytest.raises(SeamError, match=re.escape(row.key) + ".*" + re.escape(reason)) as e:
        seam.install(None, [good, row])
    assert good.key not in str(e.value), "only the rows that did not apply are named"


@pytest.mark.usefixtures("fake_server")
def test_a_route_behind_monai_labels_own_is_reported(fake_server: Starlette) -> None:
    from appcore.routes import refuse_early

    row = Row(
        "POST /train/{model}", Kind.ROUTE_IN_FRONT, lambda p, b: None, "x", name="refuse_train_model", how="refuse"
    )
    report = seam.Report(MONAILABEL_VERSION, seam.apply([row]))
    seam.check(report)  # first: in place
    assert refuse_early("/train/{model}", ["POST"], lambda p, b: None, name="refuse_train_model")
    routes = fake_server.router.routes
    routes.append(routes.pop(0))  # an upgrade that puts its own route first
    with pytest.raises(SeamError, match="refuse_train_model is behind MONAI Label's route theirs"):
        seam.check(report)


def _of_ours(what: object) -> object:
    what.__module__ = "appcore.new_feature"  # type: ignore[attr-defined]
    return what


@pytest.mark.usefixtures("fake_server")
def test_a_route_of_ours_without_a_row_stops_the_start() -> None:
    from starlette.routing import Route as StarletteRoute

    async def endpoint(request: object) -> None:
        raise AssertionError("not called")

    assert seam.insert_first(StarletteRoute("/labeling/new", _of_ours(endpoint), name="new_feature"))
    with pytest.raises(SeamError, match=r"route 'new_feature' \(/labeling/new\) is not a row of the table\nAdd a row"):
        seam.install(None, [])


def test_an_asgi_layer_of_ours_without_a_row_stops_the_start(fake_server: Starlette) -> None:
    layer = _of_ours(type("_NewLayer", (), {"__init__": lambda self, app: setattr(self, "app", app)}))
    seam.set_server_stack(layer(fake_server.middleware_stack))  # type: ignore[operator]
    with pytest.raises(SeamError, match=r"ASGI layer _NewLayer is not a row of the table"):
        seam.install(None, [])


def test_the_doc_lists_every_row() -> None:
    doc = (ROOT / "docs" / "seam.md").read_text()
    assert doc == seam.markdown(), "docs/seam.md is out of date: python -m appcore.seam > docs/seam.md"
    for row in ROWS:
        assert f"`{row.target}`" in doc and row.why in doc, row.key
    assert "docs/seam.md" in (ROOT / "README.md").read_text()


def test_rows_are_unique_and_name_what_replaces() -> None:
    keys = [row.key for row in ROWS]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]
    for row in ROWS:
        assert isinstance(row.kind, Kind) and isinstance(row.why, str) and row.why, row.key
        assert row.since == MONAILABEL_VERSION, row.key
        if not isinstance(row.replacement, str):
            assert callable(row.replacement), row.key


# -- nothing outside appcore/seam touches MONAI Label's internals ------------------------------------

PACKAGES = ("appcore", "radiology", "pathology", "strategies", "apps")
# What only the seam may write: MONAI Label's app, router and stack, and names in its modules.
_FORBIDDEN = re.compile(r"sys\.modules(\.get)?\(?\[?[\"']monailabel|\.middleware_stack\b|router\.routes\b")


def _sources() -> Iterator[tuple[str, str]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if not relative.startswith("appcore/seam/"):
                yield relative, path.read_text()


def test_only_the_seam_reaches_into_the_running_server() -> None:
    found = [f"{name}: {m.group(0)}" for name, text in _sources() for m in _FORBIDDEN.finditer(text)]
    assert found == []


def _monai_label_private(cls: type) -> dict[str, set[str]]:
    """The private members each of MONAI Label's classes in ``cls``'s bases defines or assigns, by class name."""
    names: dict[str, set[str]] = {}
    for base in cls.__mro__:
        if not base.__module__.startswith("monailabel"):
            continue
        found = {n for n in vars(base) if n.startswith("_") and not n.startswith("__")}
        found |= set(re.findall(r"self\.(_[A-Za-z]\w*)", textwrap.dedent(inspect.getsource(base))))
        names[base.__name__] = found
    return names


def _facing_monai_label(cls: type) -> bool:
    """A class with a MONAI Label base, or a mixin of one (``RequestChecks``)."""
    pending = [cls]
    while pending:
        current = pending.pop()
        if any(b.__module__.startswith("monailabel") for b in current.__mro__):
            return True
        pending += current.__subclasses__()
    return False


def _tabled() -> set[tuple[str, str]]:
    """(MONAI Label's class, member) of the table's private-read and override rows."""
    rows = [r for r in ROWS if r.kind in (Kind.PRIVATE_READ, Kind.SUBCLASS_OVERRIDE)]
    return {tuple(r.target.split(":")[1].rsplit(".", 1)) for r in rows if "." in r.target.split(":")[1]}


def private_uses() -> list[str]:
    """Each MONAI Label private member a class of ours (or a mixin of one) reads, sets or overrides
    without a row in the table: ``file Class.member (MONAI Label's class)``."""
    import importlib

    from monailabel.interfaces.app import MONAILabelApp

    import pathology.app  # noqa: F401 - the apps' classes make RequestChecks a mixin of MONAILabelApp
    import radiology.app  # noqa: F401

    tabled, untabled = _tabled(), []
    for name, text in _sources():
        if name.startswith("apps/"):
            continue
        module = importlib.import_module(name.removesuffix(".py").replace("/", "."))
        for node in ast.walk(ast.parse(text)):
            cls = getattr(module, node.name, None) if isinstance(node, ast.ClassDef) else None
            if not (inspect.isclass(cls) and _facing_monai_label(cls)):
                continue
            theirs = [b for b in cls.__mro__ if b.__module__.startswith("monailabel")]
            private = _monai_label_private(theirs[0] if theirs else MONAILabelApp)
            for sub in ast.walk(node):
                if not isinstance(sub, ast.Attribute | ast.FunctionDef):
                    continue
                member = sub.attr if isinstance(sub, ast.Attribute) else sub.name
                owners = [owner for owner, members in private.items() if member in members]
                if owners and not any((owner, member) in tabled for owner in owners):
                    untabled.append(f"{name} {node.name}.{member} ({', '.join(owners)})")
    return sorted(set(untabled))


def test_every_private_member_our_classes_touch_is_a_row() -> None:
    assert private_uses() == [], "add a row to appcore/seam/table.py (or read it through an accessor)"


def test_apps_read_monai_labels_registries_through_the_seam() -> None:
    """On other objects than ``self`` (the classes' own reads are the test above's)."""
    private = re.compile(
        r"(?<!\bself)\._(infers|trainers|strategies|scoring_methods|auto_update_scoring|batch_infer)\b"
    )
    found = [f"{name}: {m.group(0)}" for name, text in _sources() for m in private.finditer(text)]
    assert found == []


def _theirs(tree: ast.AST) -> set[str]:
    """The names a module binds to MONAI Label's modules, classes and functions (at any depth)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name.split(".")[0]) for a in node.names if a.name.split(".")[0] == "monailabel"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "monailabel":
            names |= {a.asname or a.name for a in node.names}
    return names


def _monai_label_private_names() -> dict[str, set[str]]:
    """Every private member of MONAI Label's loaded classes, with the classes that define or assign it."""
    import pathology.app  # noqa: F401 - loads what the apps use of MONAI Label
    import radiology.app  # noqa: F401

    owners: dict[str, set[str]] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("monailabel"):
            continue
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == name:
                try:
                    members = _monai_label_private(cls).get(cls.__name__, set())
                except (OSError, TypeError):  # no source
                    members = {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
                for member in members:
                    owners.setdefault(member, set()).add(cls.__name__)
    return owners


def _self_or_super(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def outside_uses() -> list[str]:
    """What code outside ``appcore/seam`` does to MONAI Label, in any function or class, other than its
    own classes' members (``test_every_private_member_our_classes_touch_is_a_row``): a private
    member read on another object than ``self`` (``app._trainers``: the seam's accessors read those), a
    private name imported or read from its modules, a name of its modules or classes assigned,
    deleted or ``setattr``'d (``endpoints.train.run = ...``)."""
    private, found = _monai_label_private_names(), []
    for name, text in _sources():
        tree = ast.parse(text)
        theirs = _theirs(tree)
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "monailabel":
                found += [f"{where} imports {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in theirs:
                    found.append(f"{where} reads {node.value.id}.{node.attr}")
                elif not _self_or_super(node.value) and node.attr in private:
                    # on another object than self, even a tabled member is read through the seam's accessor
                    found.append(f"{where} reads {ast.unparse(node)} ({', '.join(sorted(private[node.attr]))})")
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign | ast.Delete):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("setattr", "delattr")
            ):
                targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute | ast.Subscript):
                    root = root.value
                if target is not root and isinstance(root, ast.Name) and root.id in theirs:
                    found.append(f"{where} rebinds {ast.unparse(target)}")
    return sorted(found)


def test_no_other_code_reads_privates_or_rebinds_names_of_monai_label() -> None:
    assert outside_uses() == [], "go through an accessor of appcore.seam, or add a row to appcore/seam/table.py"


_OUTSIDE = (
    ("def f(app):\n    return app._trainers\n", "reads app._trainers (MONAILabelApp)"),
    ("def f(task):\n    return task._model_dir\n", "reads task._model_dir (BasicTrainTask"),
    ("from monailabel.utils.async_tasks.utils import _x\n", "imports _x"),
    ("from monailabel.endpoints import train\ntrain._helper()\n", "reads train._helper"),
    ("from monailabel.endpoints import train\ntrain.run = len\n", "rebinds train.run"),
    ("import monailabel.endpoints.train\nmonailabel.endpoints.train.run = len\n", "rebinds monailabel.endpoints"),
    ("from monailabel.config import settings\nsetattr(settings, 'X', 1)\n", "rebinds settings.?"),
    ("from monailabel.interfaces.app import MONAILabelApp\nMONAILabelApp.info = len\n", "rebinds MONAILabelApp"),
)


@pytest.mark.parametrize(("code", "reported"), _OUTSIDE, ids=[r for _, r in _OUTSIDE])
def test_each_way_of_reaching_into_monai_label_is_found(
    code: str, reported: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "_sources", lambda: iter([("appcore/new.py", code)]))
    found = outside_uses()
    assert len(found) == 1 and reported in found[0], found


@pytest.mark.parametrize("layer", [r.name for r in ROWS if r.kind is Kind.MIDDLEWARE])
def test_the_request_flow_names_every_layer(layer: str) -> None:
    assert layer in (ROOT / "docs" / "architecture.md").read_text(), (
        "add it to the request's way in docs/architecture.md"
    )
