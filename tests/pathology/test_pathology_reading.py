"""Reading microscopy tiles: 16-bit and float greyscale (fluorescence cameras) is stretched, not clipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathology.data import read_rgb, rgb_of
from pathology.wsi import read_tile


def _grey16() -> np.ndarray:
    """A 12-bit fluorescence frame in a 16-bit container: dark background 100, nucleus 4000."""
    a = np.full((20, 24), 100, np.uint16)
    a[5:10, 5:10] = 4000
    return a


@pytest.mark.parametrize(
    ("mode", "suffix", "background", "nucleus"),
    [
        ("I;16", ".png", 0, 255),  # 16-bit PNG: stretched, not clipped to white
        ("I", ".tif", 0, 255),
        ("F", ".tif", 0, 255),
        ("L", ".png", 6, 250),  # 8-bit grey: kept as it is
        ("LA", ".png", 6, 250),
        ("RGBA", ".png", 6, 250),
    ],
)
def test_grey_and_16_bit_images_become_rgb(
    tmp_path: Path, mode: str, suffix: str, background: int, nucleus: int
) -> None:
    frame = _grey16()
    if mode == "I;16":
        image = Image.fromarray(frame)
    elif mode in ("I", "F"):
        image = Image.fromarray(frame.astype(np.int32 if mode == "I" else np.float32))
    else:
        image = Image.fromarray((frame // 16).astype(np.uint8)).convert(mode)
    assert image.mode == mode
    path = tmp_path / f"frame{suffix}"
    image.save(path)
    for rgb in (read_rgb(path), read_tile(path)):
        assert rgb.shape == (20, 24, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], rgb[..., 2])
        assert rgb[0, 0, 0] == background and rgb[7, 7, 0] == nucleus


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.full((4, 4), 7, np.float32), 0),  # constant: black, not a division by zero
        (np.array([[np.nan, 1.0], [2.0, np.inf]], np.float32), None),  # non-finite read as the range's ends
    ],
)
def test_degenerate_float_images(values: np.ndarray, expected: int | None) -> None:
    rgb = rgb_of(Image.fromarray(values))
    assert rgb.dtype == np.uint8 and rgb.shape == (*values.shape, 3)
    if expected is not None:
        assert (rgb == expected).all()
    else:
        assert rgb[0, 0, 0] == 0 and rgb[0, 1, 0] == 0 and rgb[1, 0, 0] == 255 and rgb[1, 1, 0] == 255
