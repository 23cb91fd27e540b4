"""The packages' layers: serving code never imports research code, and no import cycle among the models."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# A package may import those after it in this list, never those before it.
LAYERS = ["research", "radiology", "pathology", "strategies", "appcore"]
SERVING = ["radiology", "pathology", "strategies", "appcore"]
# What the server runs: the apps' entry points and the packages they use. None may import these.
OFFLINE = {"research", "benchmarks"}


_DYNAMIC = ("import_module", "__import__", "optional_import")


def _module_imports(text: str, name: str = "<module>") -> set[str]:
    """The top-level packages a module's code imports, at any depth: ``import``, ``from ... import``,
    and a constant name given to ``importlib.import_module``, ``__import__`` or ``optional_import``."""
    names = set()
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in _DYNAMIC:
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value.split(".")[0])
    return names


def _imports(package: str) -> dict[str, set[str]]:
    """Each module file of ``package`` with the top-level packages it imports (at any depth)."""
    return {
        str(path.relative_to(ROOT)): _module_imports(path.read_text(), str(path))
        for path in sorted((ROOT / package).rglob("*.py"))
    }


@pytest.mark.parametrize("package", SERVING)
def test_serving_code_imports_no_package_above_it(package: str) -> None:
    above = set(LAYERS[: LAYERS.index(package)]) - ({"pathology"} if package == "radiology" else set())
    above |= {"radiology"} if package == "pathology" else set()
    above.add("benchmarks")
    wrong = {module: sorted(names & above) for module, names in _imports(package).items() if names & above}
    assert not wrong, f"{package} imports a package above it: {wrong}"


@pytest.mark.parametrize("package", ["apps", *SERVING])
def test_nothing_the_server_runs_imports_research_or_benchmarks(package: str) -> None:
    wrong = {module: sorted(names & OFFLINE) for module, names in _imports(package).items() if names & OFFLINE}
    assert not wrong, f"serving code imports offline code: {wrong}"


@pytest.mark.parametrize(
    ("code", "found"),
    [
        ("import research.radiology.offline", "research"),
        ("def f():\n    from benchmarks import headline", "benchmarks"),
        ("import importlib\nimportlib.import_module('research.radiology.tta')", "research"),
        ("from importlib import import_module\nimport_module('benchmarks.peer')", "benchmarks"),
    ],
)
def test_each_way_of_importing_is_seen(code: str, found: str) -> None:
    assert found in _module_imports(code)


@pytest.mark.parametrize("module", ["radiology.ensemble", "radiology.spec", "radiology.registry"])
def test_model_modules_import_without_a_cycle(module: str) -> None:
    """``radiology.ensemble`` needs neither the registry nor the models: importing it first loads neither."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('radiology'))))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    if module == "radiology.ensemble":
        assert "radiology.registry" not in loaded and "radiology.spec" not in loaded


# The command-line modules the serving packages keep, each with why it is not offline research code
# (that lives in ``research/``: training, evaluation, splits, experiments, the demo).
COMMANDS = {
    "appcore/auth.py": "prints the role table of docs/auth.md from the served one",
    "appcore/settings.py": "writes docs/options.md from the served settings",
    "appcore/dicom/pacs.py": "starts the PACS `make serve` serves from",
    "radiology/export.py": "exports a served model version as a MONAI bundle (as GET /model/<m>?bundle does)",
    "pathology/export.py": "exports a served model version as a MONAI bundle (as GET /model/<m>?bundle does)",
    "radiology/viewer_configs.py": "writes the viewer settings from the served label registry",
}


def test_the_serving_packages_keep_no_offline_tool() -> None:
    found = {
        str(path.relative_to(ROOT))
        for package in SERVING
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__main__.py" and 'if __name__ == "__main__"' in path.read_text()
    }
    assert found == set(COMMANDS), "move offline tools to research/, or say here why the server needs it"


# Test folders that are not a package's: whole-server runs through a browser, shared across packages.
NOT_A_PACKAGE = {"tests/e2e": "the whole server with a PACS and a browser (OHIF)"}


def test_the_test_folders_mirror_the_packages() -> None:
    """``tests/appcore/dicom/`` tests ``appcore/dicom/``, and so on: every test folder names a package folder."""
    folders = {
        path.parent.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if path.parent != ROOT / "tests"
    }
    unmatched = [
        f
        for f in sorted(folders)
        if f not in NOT_A_PACKAGE and not (ROOT / f.removeprefix("tests/") / "__init__.py").is_file()
    ]
    assert unmatched == []
