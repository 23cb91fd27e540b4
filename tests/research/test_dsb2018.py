"""The DSB2018 split (committed, disjoint, complete), image types, and the wide augmentation of offline training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathology.data import read_rgb
from pathology.training import Augment, Example, random_crop, train_steps
from research.pathology.dsb2018 import (
    SPLIT_FILE,
    SPLITS,
    Entry,
    ImageType,
    dsb_tiles,
    format_split,
    image_type,
    make_split,
    read_split,
    split_ids,
)
from tests.conftest import SHARED

DSB = SHARED / "pathology" / "nuclei_dsb2018"
requires_dsb = pytest.mark.skipif(not (DSB / "images").exists(), reason=f"real images {DSB} are absent")


def test_the_committed_split_is_disjoint_and_covers_500_images() -> None:
    entries = read_split()
    ids = [e.id for e in entries]
    assert len(ids) == 500 and len(set(ids)) == 500, "every image once, in one split"
    per_split = {s: {e.id for e in entries if e.split == s} for s in SPLITS}
    assert sum(len(v) for v in per_split.values()) == 500
    assert not per_split["train"] & per_split["test"] and not per_split["validation"] & per_split["test"]
    assert {s: len(v) for s, v in per_split.items()} == {"train": 350, "validation": 49, "test": 101}
    for kind in ImageType:  # stratified: every type in every split, test about 20% of it
        n = [sum(e.type is kind and e.split == s for e in entries) for s in SPLITS]
        assert min(n) >= 1 and abs(n[2] - 0.2 * sum(n)) <= 0.5, (kind, n)


@requires_dsb
def test_the_split_covers_the_folder_and_rederives_from_it() -> None:
    on_disk = {p.stem for p in (DSB / "images").glob("*.png")}
    committed = read_split()
    assert {e.id for e in committed} == on_disk
    # Re-derived from the images' colour statistics and the seed, it is the committed file, byte for byte.
    types = {e.id: image_type(read_rgb(DSB / "images" / f"{e.id}.png")) for e in committed}
    assert format_split(make_split(types)) == SPLIT_FILE.read_text()


@pytest.mark.parametrize(
    ("fill", "expected"),
    [
        ((10, 10, 10), ImageType.FLUORESCENCE),
        ((30, 5, 60), ImageType.FLUORESCENCE),  # a coloured fluorescence stain: still a dark background
        ((200, 200, 200), ImageType.BRIGHTFIELD_GREY),
        ((230, 180, 210), ImageType.BRIGHTFIELD_COLOUR),  # pink H&E-like background
    ],
)
def test_image_type_from_colour_statistics(fill: tuple[int, int, int], expected: ImageType) -> None:
    rgb = np.empty((32, 32, 3), np.uint8)
    rgb[:] = fill
    rgb[10:14, 10:14] = 255 - np.asarray(fill, np.uint8)  # a small "nucleus" does not change the type
    assert image_type(rgb) is expected


def test_image_type_refuses_a_grey_array() -> None:
    with pytest.raises(ValueError, match=r"expected an RGB array \(H, W, 3\), got shape \(8, 8\)"):
        image_type(np.zeros((8, 8), np.uint8))


def test_make_split_is_seeded_and_stratified() -> None:
    types = {f"f{i:03d}": ImageType.FLUORESCENCE for i in range(40)} | {
        f"c{i}": ImageType.BRIGHTFIELD_COLOUR for i in range(10)
    }
    a, b = make_split(types, seed=1), make_split(types, seed=1)
    assert a == b and make_split(types, seed=2) != a
    count = {(e.split, e.type) for e in a}
    assert len(count) == 6
    assert sum(e.split == "test" and e.type is ImageType.BRIGHTFIELD_COLOUR for e in a) == 2
    assert sum(e.split == "validation" and e.type is ImageType.FLUORESCENCE for e in a) == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("train fluorescence", r"x.txt:2: expected '<train\|validation\|test> <image type> <id>'"),
        ("holdout fluorescence abc", r"x.txt:2: expected '<train\|validation\|test>"),
        ("test phase_contrast abc", r"x.txt:2: unknown image type 'phase_contrast'; valid: fluorescence, "),
    ],
)
def test_a_malformed_split_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "x.txt"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(ValueError, match=message):
        read_split(path)


def test_an_unknown_split_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown split 'val'; valid: train, validation, test"):
        split_ids("val")


def test_a_split_image_missing_from_the_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "masks" / "a.png")
    split = tmp_path / "split.txt"
    split.write_text(
        format_split([Entry("a", "test", ImageType.FLUORESCENCE), Entry("b", "test", ImageType.FLUORESCENCE)])
    )
    with pytest.raises(FileNotFoundError, match=r"1 images of the test split are not in .*: \['b'\]"):
        dsb_tiles(tmp_path, "test", split)


# -- wide augmentation --------------------------------------------------------------------------


def _example(size: int = 64, background: int = 0) -> Example:
    rgb = np.full((size, size, 3), background, np.uint8)
    mask = np.zeros((size, size), np.int32)
    rgb[20:30, 20:30] = 255 - background
    mask[20:30, 20:30] = 1
    return Example.of(rgb, mask)


@pytest.mark.parametrize("zoom", [(0.5, 0.5), (2.0, 2.0), (0.5, 2.0)])
def test_zoomed_crops_keep_image_and_target_aligned(zoom: tuple[float, float]) -> None:
    rng = np.random.default_rng(0)
    augment = Augment(zoom=zoom, gain=(1.0, 1.0), shift=0.0, contrast=(1.0, 1.0))
    for _ in range(10):
        x, t = random_crop(_example(), 48, rng, augment)
        assert x.shape == (3, 48, 48) and t.shape == (2, 48, 48) and x.dtype == t.dtype == np.float32
        bright, fg = x[0] > 0, t[0] > 0.5
        if fg.sum() > 4:  # the nucleus, where it is in the crop, is where the target says
            assert (bright & fg).sum() / fg.sum() > 0.9


def test_padding_takes_the_images_own_background() -> None:
    """A fluorescence image smaller than the crop is padded black, not white."""
    x, t = random_crop(
        _example(32, background=0), 64, np.random.default_rng(0), Augment(gain=(1, 1), shift=0.0, contrast=(1, 1))
    )
    assert (x <= -0.99).mean() > 0.9 and t[0].sum() == 100


def test_inversion_and_grey() -> None:
    ex = Example.of(np.dstack([np.full((16, 16), v, np.uint8) for v in (0, 128, 255)]), np.zeros((16, 16), np.int32))
    plain = Augment(gain=(1, 1), shift=0.0, contrast=(1, 1))
    x, _ = random_crop(ex, 16, np.random.default_rng(0), plain)
    inv, _ = random_crop(ex, 16, np.random.default_rng(0), Augment(gain=(1, 1), shift=0.0, contrast=(1, 1), invert=1.0))
    grey, _ = random_crop(ex, 16, np.random.default_rng(0), Augment(gain=(1, 1), shift=0.0, contrast=(1, 1), grey=1.0))
    np.testing.assert_allclose(inv, -x)
    np.testing.assert_allclose(grey[0], grey[2]) and np.testing.assert_allclose(grey.mean(), x.mean(), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zoom": (2.0, 1.0)}, r"zoom must be a range 0 < low <= high, got \(2.0, 1.0\)"),
        ({"zoom": (0.0, 1.0)}, "zoom must be a range"),
        ({"invert": 1.5}, r"invert is a probability in \[0, 1\], got 1.5"),
        ({"grey": -0.1}, r"grey is a probability in \[0, 1\], got -0.1"),
    ],
)
def test_augment_refuses_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Augment(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("weights", [[1.0], [0.0, 0.0], [1.0, float("nan")], [-1.0, 2.0]])
def test_sampling_weights_are_checked(weights: list[float]) -> None:
    from pathology.spec import NUCLEI

    with pytest.raises(ValueError, match=r"weights need one finite value >= 0 per example \(2\), not all 0"):
        train_steps(
            NUCLEI.network(), NUCLEI, [_example(), _example()], steps=1, batch_size=1, lr=1e-4, seed=0, weights=weights
        )


def test_sampling_weights_pick_only_weighted_examples() -> None:
    """A zero weight is never drawn: a batch from a blank example would have no foreground."""
    import dataclasses

    from pathology.spec import NUCLEI

    spec = dataclasses.replace(NUCLEI, patch=32)
    blank = Example.of(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.int32))
    full = Example.of(np.full((32, 32, 3), 200, np.uint8), np.ones((32, 32), np.int32))
    seen: list[float] = []
    net = spec.network()
    original = net.forward

    def spy(x):  # type: ignore[no-untyped-def]
        seen.append(float(x.mean()))
        return original(x)

    net.forward = spy  # type: ignore[method-assign]
    train_steps(net, spec, [blank, full], steps=3, batch_size=2, lr=1e-5, seed=0, weights=[0.0, 1.0])
    assert len(seen) == 3 and min(seen) > 0.2, seen
