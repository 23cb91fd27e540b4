"""The fixed train / validation / test split of ``nuclei_dsb2018``, stratified by image type.

``python -m research.pathology.dsb2018 --data ../shared/data/pathology/nuclei_dsb2018`` rewrites
``research/pathology/splits/dsb2018.txt`` (and says whether it changed); the committed file is the split.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathology.data import Tile, cpm_tiles, read_rgb

SPLIT_FILE = Path(__file__).resolve().parent / "splits" / "dsb2018.txt"
SPLITS = ("train", "validation", "test")
# Shares of each image type; the rest is training. Rounded per type, so the shares hold per type.
VALIDATION_SHARE = 0.1
TEST_SHARE = 0.2
SEED = 2018

# Fluorescence has a dark background: the median pixel is below this (measured on the 500 images:
# fluorescence medians are 0-44, brightfield 149-255).
DARK_MEDIAN = 80.0
# Mean absolute deviation of a pixel's channels from their mean, above which an image is in colour
# (greyscale sources have three equal channels: 0.0; stained brightfield images 4.5 and above).
COLOUR_CHROMA = 1.0


class ImageType(enum.StrEnum):
    """What the image looks like, from simple colour statistics."""

    FLUORESCENCE = "fluorescence"
    BRIGHTFIELD_COLOUR = "brightfield_colour"
    BRIGHTFIELD_GREY = "brightfield_grey"


def image_type(rgb: np.ndarray) -> ImageType:
    """Fluorescence (dark background) or brightfield, in colour or grey, of an RGB uint8 array."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB array (H, W, 3), got shape {rgb.shape}")
    pixels = rgb.astype(np.float32)
    if float(np.median(pixels)) < DARK_MEDIAN:
        return ImageType.FLUORESCENCE
    chroma = float(np.abs(pixels - pixels.mean(axis=2, keepdims=True)).mean())
    return ImageType.BRIGHTFIELD_COLOUR if chroma > COLOUR_CHROMA else ImageType.BRIGHTFIELD_GREY


@dataclass(frozen=True)
class Entry:
    """One image of the split: its id, its split and its image type."""

    id: str
    split: str
    type: ImageType


def make_split(types: dict[str, ImageType], seed: int = SEED) -> list[Entry]:
    """Per image type, a seeded shuffle of the sorted ids: the first 20% test, the next 10% validation."""
    rng = np.random.default_rng(seed)
    entries: list[Entry] = []
    for kind in ImageType:
        ids = sorted(i for i, t in types.items() if t is kind)
        order = [ids[j] for j in rng.permutation(len(ids))]
        n_test, n_val = round(TEST_SHARE * len(ids)), round(VALIDATION_SHARE * len(ids))
        for j, image_id in enumerate(order):
            split = "test" if j < n_test else "validation" if j < n_test + n_val else "train"
            entries.append(Entry(image_id, split, kind))
    return sorted(entries, key=lambda e: (SPLITS.index(e.split), e.type.value, e.id))


HEADER = """\
# nuclei_dsb2018 split: <split> <image type> <image id>, one image a line.
# Made by `python -m research.pathology.dsb2018 --data ../shared/data/pathology/nuclei_dsb2018`:
# image type from colour statistics (median pixel < 80: fluorescence; else mean channel spread > 1: brightfield
# colour; else brightfield grey), then per type a shuffle seeded with 2018 of the sorted ids: 20% test,
# 10% validation, the rest train. Test images are never used for training, checkpoint choice or thresholds.
"""


def format_split(entries: Iterable[Entry]) -> str:
    return HEADER + "".join(f"{e.split} {e.type.value} {e.id}\n" for e in entries)


def read_split(path: str | Path = SPLIT_FILE) -> list[Entry]:
    """The entries of a split file; a malformed line is an error that names it."""
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in SPLITS:
            raise ValueError(f"{path}:{n}: expected '<{'|'.join(SPLITS)}> <image type> <id>', got {line!r}")
        try:
            kind = ImageType(parts[1])
        except ValueError:
            valid = ", ".join(t.value for t in ImageType)
            raise ValueError(f"{path}:{n}: unknown image type {parts[1]!r}; valid: {valid}") from None
        entries.append(Entry(parts[2], parts[0], kind))
    return entries


def split_ids(split: str, path: str | Path = SPLIT_FILE) -> dict[str, ImageType]:
    """Image id -> type of one split (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return {e.id: e.type for e in read_split(path) if e.split == split}


def dsb_tiles(folder: str | Path, split: str, path: str | Path = SPLIT_FILE) -> list[tuple[Tile, ImageType]]:
    """The images of one split with their masks and types, sorted by id."""
    ids = split_ids(split, path)
    tiles = cpm_tiles(folder, tuple(ids))
    if len(tiles) != len(ids):
        missing = sorted(set(ids) - {t.id for t in tiles})
        raise FileNotFoundError(f"{len(missing)} images of the {split} split are not in {folder}: {missing[:3]}")
    return [(t, ids[t.id]) for t in tiles]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="nuclei_dsb2018 folder (images/, masks/)")
    parser.add_argument("--out", type=Path, default=SPLIT_FILE)
    args = parser.parse_args(argv)
    paths = sorted((args.data / "images").glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG images in {args.data / 'images'}")
    text = format_split(make_split({p.stem: image_type(read_rgb(p)) for p in paths}))
    changed = not args.out.exists() or args.out.read_text() != text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"{'wrote' if changed else 'unchanged'} {args.out}")


if __name__ == "__main__":
    main()
