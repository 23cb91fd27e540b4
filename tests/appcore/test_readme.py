"""The README's models table is checked against the registry, its links against the docs pages."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from appcore.settings import PathologySettings, RadiologySettings, Settings
from radiology.registry import MODELS
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _table_rows(first_cell_prefix: str) -> dict[str, str]:
    rows = {}
    for line in README.splitlines():
        if line.startswith(f"| {first_cell_prefix}"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = line
    return rows


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_models_table_matches_registry() -> None:
    rows = _table_rows("`")
    models = {k: v for k, v in rows.items() if v.count("|") == 6}
    assert set(models) == set(MODELS)
    for name, spec in MODELS.items():
        _, modality, labels, spacing, weights = _cells(models[name])
        assert labels == ", ".join(f"{label.name} ({label.id})" for label in spec.labels)
        assert modality == spec.modality
        assert spacing == " x ".join(f"{s:g}" for s in spec.spacing)
        assert weights.startswith("shipped" if spec.shipped_weights else "none")


@pytest.mark.parametrize("page", ["api", "options", "pacs", "pathology", "architecture", "seam"])
def test_readme_links_each_reference_page(page: str) -> None:
    assert f"](docs/{page}.md)" in README
    assert (ROOT / "docs" / f"{page}.md").is_file()


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(page: str) -> None:
    """Every link of the README and the docs to a file of this repository names one that exists."""
    path = ROOT / page
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{page} links to missing files: {missing}"


def test_options_page_lists_every_option_of_each_app() -> None:
    rows = [line for line in (ROOT / "docs" / "options.md").read_text().splitlines() if line.startswith("| `")]
    options = {_cells(row)[0].strip("`"): _cells(row)[1] for row in rows}
    expected = {f.name: "both" for f in fields(Settings)}
    expected |= {
        f.name: app
        for cls, app in ((RadiologySettings, "radiology"), (PathologySettings, "pathology"))
        for f in fields(cls)
        if f.name not in expected
    }
    assert options == expected
