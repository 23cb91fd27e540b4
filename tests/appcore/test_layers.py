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


def _imports(package: str) -> dict[str, set[str]]:
    """Each module file of ``package`` with the top-level packages it imports (at any depth)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", SERVING)
def test_serving_code_imports_no_package_above_it(package: str) -> None:
    above = set(LAYERS[: LAYERS.index(package)]) - ({"pathology"} if package == "radiology" else set())
    above |= {"radiology"} if package == "pathology" else set()
    above.add("benchmarks")
    wrong = {module: sorted(names & above) for module, names in _imports(package).items() if names & above}
    assert not wrong, f"{package} imports a package above it: {wrong}"


@pytest.mark.parametrize("module", ["radiology.ensemble", "radiology.spec", "radiology.registry"])
def test_model_modules_import_without_a_cycle(module: str) -> None:
    """``radiology.ensemble`` needs neither the registry nor the models: importing it first loads neither."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('radiology'))))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    if module == "radiology.ensemble":
        assert "radiology.registry" not in loaded and "radiology.spec" not in loaded
