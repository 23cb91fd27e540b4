"""Contract of each registered pathology model through the app, in-process.

Each model runs it on a phantom built from its ``NucleiSpec`` (always runs) and on a real CPM-15 tile
(the slow tier, where ``../shared/data`` is present).

The shipped network alone (CPU and CUDA) is in ``tests/pathology/test_pathology_network.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pathology.infer
import pathology.weights
from appcore import seam
from appcore.errors import RequestError
from appcore.weights import load_state_dict
from pathology.app import PathologyApp
from pathology.data import cpm_tiles
from pathology.registry import MODELS
from pathology.spec import NUCLEI, NucleiSpec
from pathology.weights import load_network
from research.pathology.metrics import aji
from tests.apps import unwatched_app
from tests.conftest import SHARED

CPM = SHARED / "pathology" / "nuclei_cpm15"
SLIDE = SHARED / "pathology" / "wsi" / "CMU-1-Small-Region.svs"
requires_pathology = pytest.mark.skipif(not (CPM / "images").exists(), reason=f"real tiles {CPM} are absent")


def phantom(spec: NucleiSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like tile of ``spec.patch`` pixels and its instance mask: dark purple nuclei (discs well
    above ``spec.min_area``), apart from each other, on a pink background, with noise."""
    rng = np.random.default_rng(seed)
    size, radius = spec.patch, 7
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint16)
    centres = [(y, x) for y in range(24, size - 16, 40) for x in range(24, size - 16, 40)]
    for i, (y, x) in enumerate(centres, start=1):
        jitter = rng.integers(-6, 7, 2)
        mask[(yy - y - jitter[0]) ** 2 + (xx - x - jitter[1]) ** 2 <= radius**2] = i
    image = np.where(mask[..., None] > 0, (95, 55, 135), (235, 195, 215)).astype(np.float64)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_contract_on_a_phantom(tmp_path: Path, model: str) -> None:
    image, mask = phantom(MODELS[model].spec, 0)
    _check_contract(tmp_path, model, image, mask)


@requires_pathology
@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_contract(tmp_path: Path, model: str) -> None:
    tile = cpm_tiles(CPM, ("image04",))[0]
    _check_contract(tmp_path, model, tile.image[:192, :192], tile.mask[:192, :192])


def _check_contract(tmp_path: Path, model: str, image: np.ndarray, truth: np.ndarray) -> None:
    """Listed in /info; infer answers a mask of the tile's size (one nucleus for a click); one tiny
    training step on ``truth`` publishes weights, and the next infer serves exactly them."""
    studies, app_dir = tmp_path / "studies", tmp_path / "app"
    studies.mkdir()
    Image.fromarray(image).save(studies / "tile.png")
    conf = {"models": model, "max_epochs": "1", "train_batch_size": "2"}
    app = unwatched_app(app_dir, studies, conf, PathologyApp)

    info = app.info()
    assert model in info["models"] and model in info["trainers"]
    assert info["models"][model]["nuclick"] is MODELS[model].nuclick

    request = {"model": model, "image": "tile"}
    if MODELS[model].nuclick:
        ys, xs = np.nonzero(truth == np.bincount(truth.ravel())[1:].argmax() + 1)
        request["foreground"] = [[int(xs.mean()), int(ys.mean())]]
    result = app.infer(request)
    mask = np.asarray(Image.open(result["file"]))
    assert mask.shape == truth.shape and mask.dtype == np.uint16
    assert result["params"]["count"] == len(np.unique(mask)) - 1 >= 1
    if MODELS[model].nuclick:
        assert result["params"]["count"] == 1

    label = tmp_path / "label.png"
    Image.fromarray(truth.astype(np.uint16)).save(label)
    app.datastore().save_label("tile", str(label), "final", {})
    assert not app.published_weights(model).exists()
    stats = app.train({"model": model, "max_epochs": 1, "train_batch_size": 2, "device": "cpu"})
    assert stats["steps"] == 1 and app.published_weights(model).exists(), "a completed run publishes its weights"
    app.infer(request)
    served = seam.infers(app)[model].network().state_dict()
    published = load_state_dict(app.published_weights(model))
    for key, value in served.items():
        assert torch.equal(value.cpu(), published[key]), f"infer does not serve the new weights ({key})"


@requires_pathology
def test_a_mask_over_the_pixel_budget_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    Image.fromarray(cpm_tiles(CPM, ("image04",))[0].image[:96, :96]).save(studies / "tile.png")
    app = unwatched_app(str(tmp_path / "app"), str(studies), {"models": "nuclei"}, PathologyApp)
    monkeypatch.setattr(pathology.infer, "MAX_MASK_PIXELS", 64 * 64)
    with pytest.raises(RequestError, match="POST /infer/wsi/<model> for the polygons") as e:
        app.infer({"model": "nuclei", "image": "tile"})
    assert e.value.status_code == 413
    result = app.infer({"model": "nuclei", "image": "tile", "location": [0, 0], "size": [64, 64]})
    assert np.asarray(Image.open(result["file"])).shape == (64, 64)


def test_train_without_labels_says_what_to_do(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(studies / "t.png")
    app = unwatched_app(str(tmp_path / "app"), str(studies), {"models": "nuclei"}, PathologyApp)
    with pytest.raises(ValueError, match="save at least one label"):
        app._trainers["nuclei"]({"max_epochs": 1}, app.datastore())


@pytest.mark.skipif(not SLIDE.exists(), reason=f"real slide {SLIDE} is absent")
def test_slide_label_becomes_a_training_example(tmp_path: Path) -> None:
    from pathology.train import example_from_label

    label = tmp_path / "l.json"
    label.write_text('{"polygons": [[[100, 100], [120, 100], [120, 118], [100, 118]]]}')
    studies = tmp_path / "s"
    studies.mkdir()
    shutil.copyfile(SLIDE, studies / "s.svs")
    ex = example_from_label(str(studies / "s.svs"), str(label))
    assert ex.input.shape[1:] == (18 + 64, 20 + 64)
    assert ex.target[0].sum() == 20 * 18


@pytest.mark.skipif(not SLIDE.exists(), reason=f"real slide {SLIDE} is absent")
def test_small_tiles_on_the_real_slide_neither_duplicate_nor_cut_nuclei() -> None:
    """A 384 x 384 slide region read as one tile and as nine 128-pixel tiles finds the same nuclei."""
    import openslide

    from pathology.postprocess import rasterize
    from pathology.predict import instances, predict_maps
    from pathology.wsi import SlideSource, run_tiled

    network = load_network(NUCLEI, NUCLEI.shipped_weights_path)
    source = SlideSource(openslide.OpenSlide(str(SLIDE)))
    region = (700, 1000, 384, 384)

    def segment(rgb: np.ndarray) -> np.ndarray:
        return instances(NUCLEI, predict_maps(network, NUCLEI, rgb))

    try:
        whole = run_tiled(source, region, segment, tile=384, margin=64, with_mask=True)
        tiled = run_tiled(source, region, segment, tile=128, margin=64, with_mask=True)
    finally:
        source.close()
    assert tiled.tiles == 9 and len(whole.polygons) > 30
    # No duplicates: the polygons of the tiled run hardly overlap each other.
    cover = np.zeros((384, 384), np.int32)
    for poly in tiled.polygons:
        cover += rasterize([poly], (384, 384), offset=region[:2]) > 0
    assert (cover > 1).sum() < 0.01 * (cover > 0).sum()
    # Nothing cut: as many nuclei as in one piece, with the same pixels (AJI between the two runs).
    assert abs(len(tiled.polygons) - len(whole.polygons)) <= max(2, 0.05 * len(whole.polygons))
    assert aji(tiled.mask, whole.mask) > 0.85


@requires_pathology
@pytest.mark.parametrize("tile_id", ["image04", "image09"])
def test_polygons_give_back_the_mask(tile_id: str) -> None:
    """The polygons the server sends lose nothing: filled again they are the instance mask (holes aside)."""
    from pathology.postprocess import instance_polygons, rasterize

    mask = cpm_tiles(CPM, (tile_id,))[0].mask
    polys = instance_polygons(mask)
    assert len(polys) == mask.max()
    back = rasterize([polys[i] for i in sorted(polys)], mask.shape)
    lut = np.zeros(mask.max() + 1, np.int32)
    lut[sorted(polys)] = np.arange(1, len(polys) + 1)
    assert (back != lut[mask]).sum() <= 0.001 * (mask > 0).sum()


def test_qupath_readme_matches_the_registry(tmp_path: Path) -> None:
    from pathology.spec import NUCLEUS
    from tests.conftest import ROOT

    text = (ROOT / "viewers_config" / "qupath" / "README.md").read_text()
    (tmp_path / "s").mkdir()
    app = unwatched_app(str(tmp_path / "a"), str(tmp_path / "s"), {}, PathologyApp)
    for name in [*MODELS, *app._strategies, NUCLEUS.name, NUCLEUS.hex_color]:
        assert name in text, f"{name!r} missing from the QuPath README"
    assert f'{{"{NUCLEUS.name}": {NUCLEUS.id}}}' in text


def test_the_app_measures_each_patch_once_for_the_two_entropy_strategies(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    strategies = unwatched_app(str(tmp_path / "a"), str(tmp_path / "s"), {}, PathologyApp)._strategies
    assert strategies["wsi_uncertain"].store is strategies["wsi_diversity"].store
    assert len({id(strategies[name].store) for name in ("wsi_uncertain", "wsi_bald", "wsi_tta")}) == 3


def test_the_patch_reservations_are_kept_across_a_restart(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    strategies = unwatched_app(str(tmp_path / "a"), str(tmp_path / "s"), {}, PathologyApp)._strategies
    book = strategies["wsi_uncertain"]._book
    assert all(strategies[name]._book is book for name in strategies), "one book for every strategy"
    book.pick(["slide:0:0:256:256"], lambda free: free, "reader1")
    assert book.max_pick == 50, "--conf max_k's default"
    restarted = unwatched_app(str(tmp_path / "a"), str(tmp_path / "s"), {"max_k": "8"}, PathologyApp)._strategies
    assert restarted["wsi_random"]._book.reserved() == {"slide:0:0:256:256": "reader1"}
    assert restarted["wsi_random"]._book.max_pick == 8
