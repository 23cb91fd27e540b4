"""The README's tables of models and options are checked against the registry and the settings."""

from __future__ import annotations

from dataclasses import fields

from appcore.settings import AppSettings
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


def test_models_table_matches_registry() -> None:
    rows = _table_rows("`")
    models = {k: v for k, v in rows.items() if v.count("|") == 6}
    assert set(models) == set(MODELS)
    for name, spec in MODELS.items():
        for label in spec.labels:
            assert f"{label.name} ({label.id})" in models[name]
        assert spec.modality in models[name]


def test_options_table_matches_settings() -> None:
    rows = _table_rows("`")
    options = {k for k, v in rows.items() if v.count("|") == 4}
    assert options == {f.name for f in fields(AppSettings)}
