"""Reading H&E tiles and instance masks, and turning instance masks into the network's targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

# Tiles of nuclei_cpm15 never used for training or model selection: one at 20x, two at 40x.
HELD_OUT = ("image04", "image09", "image13")


@dataclass(frozen=True)
class Tile:
    """One H&E tile and its instance mask (0 background, 1..N one id per nucleus)."""

    id: str
    image: np.ndarray
    mask: np.ndarray


def rgb_of(im: Image.Image) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) of a Pillow image (alpha and palettes dropped).

    16-bit and 32-bit integer or float greyscale (as fluorescence cameras write) is stretched from
    its own minimum to its maximum: Pillow's ``convert("RGB")`` clips it at 255 instead, which
    turns a 12- or 16-bit fluorescence image nearly all white. Grey 8-bit images become three equal
    channels, as the network was trained on.
    """
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        values = np.asarray(im).astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        grey = np.zeros(values.shape, np.uint8)
        if hi > lo:
            scaled = (np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo))
            grey = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_rgb(path: str | Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) from any image Pillow reads (see :func:`rgb_of`)."""
    with Image.open(path) as im:
        return rgb_of(im)


def read_instances(path: str | Path) -> np.ndarray:
    """An instance mask as int32 (H, W); colour masks are refused."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: an instance mask has one channel, got shape {arr.shape}")
    return arr.astype(np.int32)


def cpm_tiles(folder: str | Path, ids: tuple[str, ...] | None = None) -> list[Tile]:
    """The tiles of a ``images/`` + ``masks/`` folder (as ``nuclei_cpm15``), sorted by id."""
    folder = Path(folder)
    paths = sorted((folder / "images").glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"No PNG tiles in {folder / 'images'}")
    tiles = []
    for p in paths:
        if ids is not None and p.stem not in ids:
            continue
        tiles.append(Tile(p.stem, read_rgb(p), read_instances(folder / "masks" / p.name)))
    return tiles


def split_tiles(tiles: list[Tile], held_out: tuple[str, ...] = HELD_OUT) -> tuple[list[Tile], list[Tile]]:
    """(train, held out) by the fixed ``HELD_OUT`` ids."""
    return [t for t in tiles if t.id not in held_out], [t for t in tiles if t.id in held_out]


def normalised_distance(mask: np.ndarray) -> np.ndarray:
    """Per nucleus, the distance to its border divided by its largest value: 1 at the centre, 0 outside."""
    out = np.zeros(mask.shape, dtype=np.float32)
    for i, sl in enumerate(ndimage.find_objects(mask), start=1):
        if sl is None:
            continue
        padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        inside = mask[padded] == i
        dist = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        peak = dist.max()
        if peak > 0:
            region = out[padded]
            region[inside] = (dist[inside] / peak).astype(np.float32)
    return out


def targets(mask: np.ndarray) -> np.ndarray:
    """The network's targets (2, H, W): foreground and normalised distance."""
    return np.stack([(mask > 0).astype(np.float32), normalised_distance(mask)])


def normalise(x: Any) -> Any:
    """RGB values 0-255 (an array or tensor of floats) to the network's [-1, 1]."""
    return (x / 127.5) - 1.0


def to_input(rgb: np.ndarray) -> np.ndarray:
    """Network input (3, H, W) float32 in [-1, 1] from an RGB uint8 array."""
    return normalise(rgb.astype(np.float32).transpose(2, 0, 1))
