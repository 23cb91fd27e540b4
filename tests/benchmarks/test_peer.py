"""The pure parts of the side-by-side benchmark (``benchmarks/peer.py``); no server or training runs here."""

from __future__ import annotations

import math
import sys
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.peer import (
    PINS,
    ROOT,
    SAMPLE_MODEL,
    WORKAROUNDS,
    Row,
    check_pins,
    check_sample_python,
    child_value,
    copy_sample_app,
    format_table,
    ratio,
    same_geometry,
    sample_conf,
    sample_env,
    torch_versions,
)
from benchmarks.radiology import median


@pytest.mark.parametrize(
    ("ours", "sample", "expected"),
    [
        (1.0, 2.0, 0.5),
        (3.0, 1.5, 2.0),
        (1.0, 0.0, math.nan),
        (math.nan, 1.0, math.nan),
        (1.0, math.nan, math.nan),
    ],
)
def test_ratio(ours: float, sample: float, expected: float) -> None:
    got = ratio(ours, sample)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


@pytest.mark.parametrize(("xs", "expected"), [([3.0, 1.0, 2.0], 2.0), ([4.0, 1.0], 2.5), ([5.0], 5.0)])
def test_median(xs: list[float], expected: float) -> None:
    assert median(xs) == expected


def test_median_of_nothing_is_nan() -> None:
    assert math.isnan(median([]))


def test_format_table_has_both_figures_and_ratio() -> None:
    table = format_table([Row("infer CT", "s", 4.0, 1.0, "median of 3"), Row("peak RSS", "MB", 2048.0, 512.0)])
    lines = table.splitlines()
    assert lines[0] == "| measure | unit | sample app | this project | ratio (ours/sample) | note |"
    assert lines[2] == "| infer CT | s | 4.00 | 1.00 | 0.25x | median of 3 |"
    assert lines[3] == "| peak RSS | MB | 2048 | 512 | 0.25x |  |"


def test_format_table_missing_figure() -> None:
    assert "| x | s | n/a | 1.00 | n/a |  |" in format_table([Row("x", "s", math.nan, 1.0, "")])


def test_child_value_reads_only_its_key() -> None:
    out = "noise\nEPOCH_SECONDS 1.5\nEPOCH_SECONDS_X 9\nEPOCH_SECONDS 2.5\n"
    assert child_value(out, "EPOCH_SECONDS") == [1.5, 2.5]


def test_sample_conf_switches_off_downloads_and_missing_modules() -> None:
    conf = sample_conf()
    assert conf["models"] == SAMPLE_MODEL
    assert conf["use_pretrained_model"] == "false"  # no weight download
    assert conf["sam2"] == "false"
    assert conf["scribbles"] == "false"  # numpymaxflow is absent


def test_sample_env_switches_off_mlflow() -> None:
    assert sample_env() == {"MONAI_LABEL_TRACKING_ENABLED": "false"}


def test_every_workaround_says_what_and_how() -> None:
    for w in WORKAROUNDS:
        assert len(w.finding) > 40
        assert w.how(), f"workaround without a setting or an action: {w.finding}"


@pytest.mark.parametrize(
    ("installed", "message"),
    [
        ({**PINS, "pydicom": "3.0.1"}, r"installed: \{'pydicom': '3.0.1'\}"),
        ({**PINS, "monai": "1.6.0"}, r"installed: \{'monai': '1.6.0'\}"),
    ],
)
def test_check_pins_refuses_other_versions(installed: dict[str, str], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        check_pins(installed.__getitem__)


def test_check_pins_accepts_the_pins() -> None:
    check_pins(PINS.__getitem__)


def test_copy_sample_app_copies_code_not_caches(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "lib" / "__pycache__").mkdir(parents=True)
    (source / "main.py").write_text("x = 1\n")
    (source / "lib" / "__pycache__" / "a.pyc").write_bytes(b"")
    dest = copy_sample_app(tmp_path / "copy", source)
    assert (dest / "main.py").read_text() == "x = 1\n"
    assert not (dest / "lib" / "__pycache__").exists()


def test_copy_sample_app_refuses_the_repository(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("")
    with pytest.raises(ValueError, match="into this repository"):
        copy_sample_app(ROOT / "work" / "sample-copy", tmp_path)


def test_copy_sample_app_without_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="monailabel==0.8.5"):
        copy_sample_app(tmp_path / "copy", tmp_path / "nothing")


@pytest.mark.parametrize(
    ("shape", "shift", "expected"),
    [((4, 5, 6), 0.0, True), ((4, 5, 7), 0.0, False), ((4, 5, 6), 0.5, False)],
)
def test_same_geometry(tmp_path: Path, shape: tuple[int, ...], shift: float, expected: bool) -> None:
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    src = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), src)
    moved = affine.copy()
    moved[0, 3] += shift
    out = tmp_path / "out.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), moved), out)
    assert same_geometry(out, src) is expected


def _fake_python(tmp_path: Path, code: int) -> str:
    script = tmp_path / f"python{code}"
    script.write_text(f"#!/bin/sh\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


def test_check_sample_python_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"--sample-python .*venv-cuda"):
        check_sample_python(_fake_python(tmp_path, 1))


def test_check_sample_python_accepts_an_environment_that_imports(tmp_path: Path) -> None:
    check_sample_python(_fake_python(tmp_path, 0))


def test_torch_versions_names_this_environment() -> None:
    assert torch_versions(sys.executable).startswith(f"torch {version('torch')}, torchvision ")
