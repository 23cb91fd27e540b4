from __future__ import annotations

import pytest

from appcore.settings import AppSettings
from radiology.registry import MODELS

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
    assert s.max_epochs == AppSettings.__dataclass_fields__["max_epochs"].default
    with pytest.raises(AttributeError):
        s.mc_samples = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        ({"models": "spleen"}, r"unknown model\(s\) \['spleen'\]; valid choices: \['hippocampus', 'organs_ct'\]"),
        ({"models": ","}, "no model selected"),
        ({"models": "hippocampus", "al_model": "organs_ct"}, "not among the served models"),
        ({"mc_samples": "many"}, "mc_samples: expected an integer"),
        ({"mc_samples": "0"}, "mc_samples: must be at least 1"),
        ({"reservation_s": "-1"}, "reservation_s: must be at least 0"),
        ({"val_split": "0.95"}, "val_split: must be below 0.9"),
        ({"score_on_start": "maybe"}, "expected true or false"),
        ({"cpu_bf16": "bf16"}, "cpu_bf16: expected true or false"),
        ({"epochs": "3"}, r"Unknown --conf option\(s\) \['epochs'\]"),
    ],
)
def test_bad_conf_raises(conf: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AppSettings.from_conf(conf, AVAILABLE)
