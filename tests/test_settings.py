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
    with pytest.raises(AttributeError):
        s.mc_samples = 3  # type: ignore[misc]


def test_defaults_are_the_documented_ones() -> None:
    """The defaults a server starts with when no ``--conf`` is given (the README's options table)."""
    s = AppSettings.from_conf({}, AVAILABLE)
    assert (s.mc_samples, s.tta_samples, s.reservation_s, s.max_epochs, s.train_batch_size) == (8, 4, 600.0, 20, 4)
    assert (s.val_split, s.max_upload_mb, s.sw_batch_size, s.infer_concurrency) == (0.2, 1024, 1, 2)
    assert (s.score_after_train, s.score_on_start, s.score_new_images, s.cpu_bf16) == (True, True, True, True)
    assert s.max_k == 50
    assert s.allow_anonymous is False and AppSettings.from_conf({"allow_anonymous": "true"}, AVAILABLE).allow_anonymous
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
        ({"allow_anonymous": "perhaps"}, "allow_anonymous: expected true or false"),
        ({"epochs": "3"}, r"Unknown --conf option\(s\) \['epochs'\]"),
    ],
)
def test_bad_conf_raises(conf: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AppSettings.from_conf(conf, AVAILABLE)
