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


def test_options_table_matches_settings() -> None:
    rows = _table_rows("`")
    options = {k: _cells(v)[1] for k, v in rows.items() if v.count("|") == 4}
    assert set(options) == {f.name for f in fields(AppSettings)}
    defaults = AppSettings.from_conf({}, list(MODELS))
    documented = {"models": "`all`", "al_model": "first of `models`"}
    for f in fields(AppSettings):
        value = getattr(defaults, f.name)
        if f.name in documented:
            continue
        if isinstance(value, tuple):  # a list option: empty by default
            documented[f.name] = ", ".join(value) or "none"
        else:
            documented[f.name] = str(value).lower() if isinstance(value, bool | str) else f"{value:g}"
    assert options == documented
