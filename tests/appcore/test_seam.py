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
