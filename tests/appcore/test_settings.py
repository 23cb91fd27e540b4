from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from appcore.history import TrainOn
from appcore.settings import (
    AppSettings,
    PathologySettings,
    RadiologySettings,
    Settings,
    option,
    options_table,
    parse_option,
)
from radiology.registry import MODELS
from tests.conftest import ROOT

AVAILABLE = list(MODELS)


@pytest.mark.parametrize(
    ("conf", "models", "al_model"),
    [
        ({}, tuple(AVAILABLE), AVAILABLE[0]),
        ({"models": "all"}, tuple(AVAILABLE), AVAILABLE[0]),
        ({"models": "organs_ct"}, ("organs_ct",), "organs_ct"),
        ({"models": "organs_ct, hippocampus,organs_ct"}, ("organs_ct", "hippocampus"), "organs_ct"),
        ({"models": "hippocampus,organs_ct", "al_model": "organs_ct"}, ("hippocampus", "organs_ct"), "organs_ct"),
    ],
)
def test_models_parsed(conf: dict, models: tuple, al_model: str) -> None:
    s = AppSettings.from_conf(conf, AVAILABLE)
    assert s.models == models
    assert s.al_model == al_model


def test_defaults_and_values() -> None:
    conf = {"mc_samples": "4", "reservation_s": "30", "score_on_start": "false", "score_new_images": "false"}
    s = AppSettings.from_conf(conf, AVAILABLE)
    assert (s.mc_samples, s.reservation_s, s.score_on_start, s.cpu_bf16) == (4, 30.0, False, True)
    assert not s.score_new_images and AppSettings.from_conf({}, AVAILABLE).score_new_images
    assert AppSettings.from_conf({"cpu_bf16": "off"}, AVAILABLE).cpu_bf16 is False
    with pytest.raises(AttributeError):
        s.mc_samples = 3  # type: ignore[misc]


def test_defaults_are_the_documented_ones() -> None:
    """The defaults a server starts with when no ``--conf`` is given (the README's options table)."""
    s = AppSettings.from_conf({}, AVAILABLE)
    assert (s.mc_samples, s.tta_samples, s.reservation_s, s.max_epochs, s.train_batch_size) == (8, 4, 600.0, 20, 4)
    assert (s.val_split, s.max_upload_mb, s.sw_batch_size, s.infer_concurrency) == (0.2, 1024, 1, 2)
    assert (s.score_after_train, s.score_on_start, s.score_new_images, s.cpu_bf16) == (True, True, True, True)
    assert s.max_k == 50
    assert AppSettings.from_conf({"max_k": "5"}, AVAILABLE).max_k == 5


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        ({"models": "spleen"}, r"unknown model\(s\) \['spleen'\]; valid choices: \['hippocampus', 'organs_ct'\]"),
        ({"models": ","}, "no model selected"),
        ({"models": "hippocampus", "al_model": "organs_ct"}, "not among the served models"),
        ({"mc_samples": "many"}, "mc_samples: expected an integer"),
        ({"mc_samples": "0"}, "mc_samples: must be at least 1"),
        ({"tta_samples": "7"}, "tta_samples: at most 6, got 7"),
        ({"tta_samples": "-1"}, "tta_samples: must be at least 0"),
        ({"max_upload_mb": "0"}, "max_upload_mb: must be at least 1"),
        ({"reservation_s": "-1"}, "reservation_s: must be at least 0"),
        ({"max_k": "0"}, "max_k: must be at least 1"),
        ({"val_split": "0.95"}, "val_split: must be below 0.9"),
        ({"score_on_start": "maybe"}, "expected true or false"),
        ({"cpu_bf16": "bf16"}, "cpu_bf16: expected true or false"),
        ({"epochs": "3"}, r"Unknown --conf option\(s\) \['epochs'\]"),
    ],
)
def test_bad_conf_raises(conf: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AppSettings.from_conf(conf, AVAILABLE)


# -- the common part and each app's own ------------------------------------------------------------

RADIOLOGY_ONLY = sorted(set(RadiologySettings.options()) - set(Settings.options()))


def test_the_split_keeps_every_option_somewhere() -> None:
    assert set(PathologySettings.options()) == set(Settings.options())
    assert (
        sorted(
            ["cpu_bf16", "infer_memory_mb", "sw_batch_size"]
            + ["tta_samples", "val_split", "max_clicks", "train_after_labels", "proposals_ahead"]
        )
        == RADIOLOGY_ONLY
    )


@pytest.mark.parametrize("key", RADIOLOGY_ONLY)
def test_pathology_refuses_each_radiology_only_option(key: str) -> None:
    match = (
        rf"Unknown --conf option\(s\) \['{key}'\] for the pathology app \({key} is an option of the radiology app\); "
        r"valid options: \['al_model', "
    )
    with pytest.raises(ValueError, match=match):
        PathologySettings.from_conf({key: "1"}, ["nuclei", "nuclick"])


@pytest.mark.parametrize(
    ("cls", "conf", "expected"),
    [
        (PathologySettings, {"max_k": "8", "score_on_start": "off"}, {"max_k": 8, "score_on_start": False}),
        (
            PathologySettings,
            {"models": "nuclick", "reservation_s": "1.5"},
            {"models": ("nuclick",), "reservation_s": 1.5},
        ),
        (PathologySettings, {"cors_origins": "https://A.example"}, {"cors_origins": ("https://a.example",)}),
        (PathologySettings, {"preload": "true"}, {}),  # MONAI Label's own key, passed through
        (RadiologySettings, {"val_split": "0"}, {"val_split": 0.0}),
        (RadiologySettings, {"tta_samples": "6", "sw_batch_size": "2"}, {"tta_samples": 6, "sw_batch_size": 2}),
        (RadiologySettings, {"allowed_hosts": "lab,lab"}, {"allowed_hosts": ("lab",)}),
        (PathologySettings, {"allow_anonymous": "true"}, {"allow_anonymous": True}),
        (PathologySettings, {"train_on": "Approved"}, {"train_on": TrainOn.approved}),
        (
            RadiologySettings,
            {"max_clicks": "12", "train_after_labels": "0"},
            {"max_clicks": 12, "train_after_labels": 0},
        ),
    ],
)
def test_each_option_is_parsed_by_its_field_type(cls: type[Settings], conf: dict, expected: dict) -> None:
    s = cls.from_conf(conf, ["nuclei", "nuclick"] if cls is PathologySettings else AVAILABLE)
    assert {k: getattr(s, k) for k in expected} == expected
    for key, value in expected.items():
        assert type(value) is type(getattr(s, key))


@pytest.mark.parametrize(
    ("cls", "conf", "match"),
    [
        (PathologySettings, {"max_epochs": "1.5"}, "--conf max_epochs: expected an integer, got '1.5'"),
        (PathologySettings, {"reservation_s": "nan"}, "--conf reservation_s: expected a number of seconds, got 'nan'"),
        (
            RadiologySettings,
            {"val_split": "inf"},
            "--conf val_split: expected a number, got 'inf', which is not finite",
        ),
        (PathologySettings, {"expose_logs": "2"}, "--conf expose_logs: expected true or false, got '2'"),
        (PathologySettings, {"epochs": "3"}, r"\['epochs'\] for the pathology app; valid options"),
        (PathologySettings, {"allow_anonymous": "perhaps"}, "--conf allow_anonymous: expected true or false"),
        (RadiologySettings, {"train_on": "reviewed"}, r"--conf train_on: expected one of \['submitted', 'approved'\]"),
        (RadiologySettings, {"max_clicks": "0"}, "--conf max_clicks: must be at least 1, got 0"),
        (PathologySettings, {"max_clicks": "5"}, "max_clicks is an option of the radiology app"),
    ],
)
def test_bad_values_refused_per_app(cls: type[Settings], conf: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls.from_conf(conf, ["nuclei", "nuclick"] if cls is PathologySettings else AVAILABLE)


def test_a_field_of_a_type_the_parser_does_not_read_is_named() -> None:
    @dataclass(frozen=True)
    class Odd(Settings):
        ratio: complex = option(1j, doc="no parser for it")

    with pytest.raises(TypeError, match=r"Settings field Odd.ratio has type <class 'complex'>"):
        parse_option(Odd, "ratio", "1")


def test_every_option_has_a_one_line_doc() -> None:
    for cls in (Settings, RadiologySettings, PathologySettings):
        for f in fields(cls):
            assert f.metadata["doc"] and "\n" not in f.metadata["doc"], f.name


def test_the_options_page_is_generated_from_the_fields() -> None:
    """``docs/options.md`` holds the table ``python -m appcore.settings`` prints."""
    page = (ROOT / "docs" / "options.md").read_text()
    assert options_table() in page, "regenerate it: python -m appcore.settings"
