"""Image-level next sample on a folder of nuclei tiles: the tile scorer, the correction effort, who
holds a pick, and the five strategies on a real pathology server with a few DSB2018 tiles."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from appcore.identity import User, current_user
from pathology.app import PathologyApp
from pathology.spec import NUCLEI
from pathology.tile_scoring import TileScorer
from research.pathology.metrics import correction_effort
from strategies.ranked import holder
from strategies.reservations import ReservationBook
from strategies.scores import Score, ScoreStore
from tests.conftest import SHARED
from tests.servers import monailabel_server
from tests.strategies.test_strategies import FakeDatastore

DSB = SHARED / "pathology" / "nuclei_dsb2018"
SLIDE = SHARED / "pathology" / "wsi" / "CMU-1-Small-Region.svs"
requires_dsb = pytest.mark.skipif(not (DSB / "images").is_dir(), reason=f"the DSB2018 tiles under {DSB} are absent")
# Five small DSB2018 tiles (256 x 256 to 256 x 320; fluorescence and brightfield), by sorted id.
TILES = 5


def dsb_tiles(n: int = TILES) -> list[Path]:
    return sorted((DSB / "images").glob("*.png"))[:n]


def _mask(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    """An instance mask of 20 x 20 with one nucleus per (y0, y1, x0, x1) box, ids 1.. in order."""
    m = np.zeros((20, 20), np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        m[y0:y1, x0:x1] = i
    return m


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        # identical: nothing to change; from scratch two nuclei and their pixels
        (_mask((0, 4, 0, 4), (10, 14, 10, 14)), _mask((0, 4, 0, 4), (10, 14, 10, 14)), (0, 0, 0, 0, 32)),
        # empty prediction: every nucleus added
        (_mask(), _mask((0, 4, 0, 4), (10, 14, 10, 14)), (2, 0, 0, 32, 32)),
        # a false nucleus: deleted
        (
            _mask((0, 4, 0, 4), (10, 14, 10, 14), (16, 18, 0, 2)),
            _mask((0, 4, 0, 4), (10, 14, 10, 14)),
            (0, 1, 0, 4, 32),
        ),
        # one nucleus drawn at a quarter of its size (IoU 0.25): redrawn
        (_mask((0, 2, 0, 2)), _mask((0, 4, 0, 4)), (0, 0, 1, 12, 16)),
        # IoU 9/16 = 0.56: kept; the 7 pixels that differ are changed
        (_mask((0, 3, 0, 3)), _mask((0, 4, 0, 4)), (0, 0, 0, 7, 16)),
        # split in two halves (IoU 0.5 each): the first, its best match, kept; the other deleted
        (_mask((0, 2, 0, 4), (2, 4, 0, 4)), _mask((0, 4, 0, 4)), (0, 1, 0, 0, 16)),
        # split in three (IoU 1/3 each): one piece reshaped, the other two deleted
        (_mask((0, 2, 0, 4), (2, 4, 0, 4), (4, 6, 0, 4)), _mask((0, 6, 0, 4)), (0, 2, 1, 0, 24)),
        # two nuclei merged into one (IoU 0.5 with each): one kept, the other drawn again
        (_mask((0, 4, 0, 8)), _mask((0, 4, 0, 4), (0, 4, 4, 8)), (1, 0, 0, 0, 32)),
    ],
)
def test_correction_effort(pred: np.ndarray, truth: np.ndarray, expected: tuple[int, ...]) -> None:
    got = correction_effort(pred, truth)
    add, delete, redraw, pixels, scratch_pixels = expected
    assert (got["nuclei_add"], got["nuclei_delete"], got["nuclei_redraw"]) == (add, delete, redraw)
    assert got["nuclei"] == add + delete + redraw
    assert (got["pixels"], got["scratch_pixels"]) == (pixels, scratch_pixels)
    assert got["scratch_nuclei"] == len(np.unique(truth)) - 1


@pytest.mark.parametrize(
    ("pred", "truth", "iou", "message"),
    [
        (np.zeros((2, 2)), np.zeros((3, 2)), 0.5, "shapes differ"),
        (np.zeros((2, 2)), np.zeros((2, 2)), 0.0, r"iou must be in \(0, 1\]"),
        (np.zeros((2, 2)), np.zeros((2, 2)), 1.5, r"iou must be in \(0, 1\]"),
    ],
)
def test_correction_effort_refuses(pred: np.ndarray, truth: np.ndarray, iou: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        correction_effort(pred, truth, iou)


@pytest.mark.parametrize(
    ("user", "request_", "expected"),
    [
        (None, {"client_id": "reader1"}, "reader1"),  # authentication off: the client's name
        (None, {}, "anonymous"),
        (User("alice"), {"client_id": "reader1"}, "alice"),  # signed in: the user, whatever the client says
        (User("alice"), {}, "alice"),
        (User("anonymous", frozenset({"monailabel-annotator"})), {"client_id": "mallory"}, "anonymous"),  # a realm user
    ],
)
def test_picks_are_held_for_the_signed_in_user_else_the_client(
    user: User | None, request_: dict, expected: str
) -> None:
    token = current_user.set(user) if user is not None else None
    try:
        assert holder(request_) == expected
    finally:
        if token is not None:
            current_user.reset(token)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"passes": 0}, "passes must be at least 1"), ({"dropout": 0.0}, r"dropout must be in \(0, 1\)")],
)
def test_tile_scorer_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TileScorer(NUCLEI, [NUCLEI.shipped_weights_path], **kwargs)


@requires_dsb
def test_tile_scorer_measures_a_tile_in_one_pass() -> None:
    torch.manual_seed(0)
    scorer = TileScorer(NUCLEI, ["/nonexistent.pt", NUCLEI.shipped_weights_path], passes=4)
    assert scorer.weights() == NUCLEI.shipped_weights_path
    assert scorer.version().startswith("nuclei.pt:")
    measures = scorer.score(str(dsb_tiles(1)[0]))
    assert set(measures) == {"entropy", "bald", "tta", "embedding"}
    assert 0.0 <= measures["entropy"] <= 1.0 and 0.0 <= measures["bald"] <= 1.0 and 0.0 <= measures["tta"] <= 0.5
    assert len(measures["embedding"]) == NUCLEI.channels[-1]
    json.dumps(measures)  # stored as the score's JSON


def test_tile_scorer_leaves_glass_at_zero_and_refuses_slides_and_huge_tiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(tmp_path / "glass.png")
    scorer = TileScorer(NUCLEI, [NUCLEI.shipped_weights_path])
    assert scorer.score(str(tmp_path / "glass.png")) == {"entropy": 0.0, "bald": 0.0, "tta": 0.0}
    monkeypatch.setattr("pathology.tile_scoring.MAX_TILE_PIXELS", 64 * 63)
    with pytest.raises(ValueError, match="64 x 64 pixels is over a tile's 4032"):
        scorer.score(str(tmp_path / "glass.png"))


@pytest.mark.skipif(not SLIDE.exists(), reason=f"the slide {SLIDE} is absent")
def test_tile_scorer_refuses_a_slide() -> None:
    with pytest.raises(ValueError, match="a whole-slide image: the wsi_\\* strategies pick its patches"):
        TileScorer(NUCLEI, [NUCLEI.shipped_weights_path]).score(str(SLIDE))


def _tile_strategies(store: ScoreStore) -> dict:
    """The image-level strategies exactly as the pathology app builds them, over ``store``."""
    host = SimpleNamespace(score_store=lambda: store, book=ReservationBook(600))
    return PathologyApp._tile_strategies(host)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "key"), [("epistemic", None), ("entropy", None), ("bald", "bald"), ("tta", "tta")])
def test_tile_strategies_follow_their_measure_and_never_serve_twice(tmp_path: Path, name: str, key: str | None) -> None:
    rng = np.random.default_rng(0)
    images = [f"t{n:02d}" for n in range(12)]
    store = ScoreStore(tmp_path / "scores.json")
    store.update(
        {
            i: Score(float(rng.random()), "v", 0.0, {"bald": float(rng.random()), "tta": float(rng.random())})
            for i in images
        }
    )
    store.set_unusable({"t11": "a whole-slide image: the wsi_* strategies pick its patches"})
    ds = FakeDatastore(images, labelled={"t00"})
    strategy = _tile_strategies(store)[name]
    value = store.measure(key)
    ranked = sorted((i for i in images if i not in ("t00", "t11")), key=lambda i: -value[i])
    assert strategy({"client_id": "a", "k": 3}, ds)["ids"] == ranked[:3]
    assert strategy({"client_id": "b", "k": 3}, ds)["ids"] == ranked[3:6], "the next free tiles for another annotator"


def test_tile_strategies_are_the_five_of_radiology_and_entropy(tmp_path: Path) -> None:
    strategies = _tile_strategies(ScoreStore(tmp_path / "s.json"))
    assert sorted(strategies) == ["bald", "diversity", "entropy", "epistemic", "random", "tta"]
    assert not strategies["random"].ranks_by_score and strategies["diversity"].ranks_by_score


def test_tile_diversity_spreads_a_batch(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "s.json")
    emb = {"a1": [1.0, 0.0, 0.0], "a2": [0.99, 0.01, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}
    unc = {"a1": 0.9, "a2": 0.89, "b": 0.5, "c": 0.4}
    store.update({i: Score(unc[i], "v", 0.0, {"embedding": e}) for i, e in emb.items()})
    ds = FakeDatastore(list(emb), labelled=set())
    assert _tile_strategies(store)["diversity"]({"k": 3}, ds)["ids"] == ["a1", "b", "c"], "one of the near-twins"


# -- a real server -----------------------------------------------------------------------------

SERVED_TILES = 13  # enough that every test below finds free tiles while the others' picks are held


def _scores(app_dir: Path) -> dict:
    """The tile scores in the server's project database, as ``{tile: {"value", "model_version", ...}}``."""
    return {k: asdict(v) for k, v in ScoreStore(app_dir / "model" / "scores_tiles.json").load().items()}


def _wait_scored(app_dir: Path, images: set[str], version: str | None = None, timeout: float = 1200) -> dict:
    """The tile scores once every image of ``images`` has one (by ``version`` if given); a hang
    guard, not a speed bound."""
    deadline = time.monotonic() + timeout
    while True:
        scores = _scores(app_dir)
        if all(i in scores and version in (None, scores[i]["model_version"]) for i in images):
            return scores
        assert time.monotonic() < deadline, f"tiles {sorted(images)} not all scored after {timeout} s"
        time.sleep(0.5)


def _holders(app_dir: Path) -> dict[str, str]:
    """Reserved tiles and who holds each (the project database's reservations)."""
    path = app_dir / "model" / "project.db"
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT item, client FROM reservations WHERE until > ?", (time.time(),)))


def _held(app_dir: Path) -> set[str]:
    return set(_holders(app_dir))


@pytest.fixture(scope="module")
def tile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    if not (DSB / "images").is_dir():
        pytest.skip(f"the DSB2018 tiles under {DSB} are absent")
    root = tmp_path_factory.mktemp("tiles")
    studies = root / "studies"
    studies.mkdir()
    for i, tile in enumerate(dsb_tiles(SERVED_TILES)):
        shutil.copyfile(tile, studies / f"tile{i:02d}.png")
    if SLIDE.exists():
        shutil.copyfile(SLIDE, studies / "slide.svs")
    # Scoring at start and for new images (the defaults), 2 dropout passes for bald to keep it short.
    conf = {"reservation_s": "3600", "max_k": "3", "mc_samples": "2"}
    with monailabel_server(root, str(studies), conf, app="pathology") as running:
        _wait_scored(root / "app", {f"tile{i:02d}" for i in range(SERVED_TILES)})
        yield running.http, root / "app"


@pytest.mark.slow
def test_info_lists_the_tile_strategies_beside_the_slide_ones(tile_server: tuple[httpx.Client, Path]) -> None:
    client, _ = tile_server
    info = client.get("/info/").json()
    tiles = {"random", "epistemic", "entropy", "bald", "tta", "diversity"}
    assert tiles | {"wsi_random", "wsi_uncertain"} <= set(info["strategies"])
    assert "epistemic" in info["scoring"]


@pytest.mark.slow
def test_scoring_at_start_scored_every_tile_and_set_the_slide_aside(tile_server: tuple[httpx.Client, Path]) -> None:
    _, app_dir = tile_server
    scores = _scores(app_dir)
    assert {f"tile{i:02d}" for i in range(SERVED_TILES)} <= set(scores)
    assert all({"bald", "tta", "embedding"} <= set(s["extra"]) for s in scores.values())
    if SLIDE.exists():
        unusable = ScoreStore(app_dir / "model" / "scores_tiles.json").unusable()
        assert "whole-slide image" in unusable["slide"] and "slide" not in scores


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "key", "second"),
    [("epistemic", None, True), ("entropy", None, False), ("bald", "bald", True), ("tta", "tta", False)],
)
def test_ranked_strategies_hand_out_the_most_uncertain_free_tiles_and_hold_them(
    tile_server: tuple[httpx.Client, Path], strategy: str, key: str | None, second: bool
) -> None:
    client, app_dir = tile_server
    scores = _scores(app_dir)
    value = {i: (s["value"] if key is None else s["extra"][key]) for i, s in scores.items()}
    held = _held(app_dir)
    free = sorted((i for i in value if i not in held), key=lambda i: -value[i])
    r = client.post(f"/activelearning/{strategy}", json={"k": 2, "client_id": f"{strategy}-reader1"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["ids"] == free[:2] and answer["id"] == free[0]
    book = _holders(app_dir)
    assert {book[i] for i in answer["ids"]} == {f"{strategy}-reader1"}
    if second:
        again = client.post(f"/activelearning/{strategy}", json={"client_id": f"{strategy}-reader2"}).json()
        assert again["ids"] == [free[2]], "another annotator gets the next tile, never one held"


@pytest.mark.slow
@pytest.mark.parametrize(("body", "message"), [({"k": 4}, "one request is handed at most 3"), ({"k": 0}, "positive")])
def test_a_bad_k_is_a_400_and_nothing_is_held(tile_server: tuple[httpx.Client, Path], body: dict, message: str) -> None:
    client, app_dir = tile_server
    held = _held(app_dir)
    r = client.post("/activelearning/bald", json={**body, "client_id": "greedy"})
    assert r.status_code == 400 and message in r.json()["detail"]
    assert _held(app_dir) == held


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """A pathology server on 3 tiles, scored at start."""
    if not (DSB / "images").is_dir():
        pytest.skip(f"the DSB2018 tiles under {DSB} are absent")
    studies = tmp_path / "studies"
    studies.mkdir()
    for i, tile in enumerate(dsb_tiles(3)):
        shutil.copyfile(tile, studies / f"tile{i}.png")
    with monailabel_server(tmp_path, str(studies), {"mc_samples": "2"}, app="pathology") as running:
        _wait_scored(tmp_path / "app", {"tile0", "tile1", "tile2"})
        yield running.http, tmp_path / "app"


@pytest.mark.slow
def test_a_labelled_tile_is_never_handed_out(small_server: tuple[httpx.Client, Path]) -> None:
    """Its own 3-tile server: the module's shared one has its free tiles held by whichever tests ran first."""
    client, app_dir = small_server
    target = "tile0"
    mask = np.zeros(Image.open(app_dir.parent / "studies" / f"{target}.png").size[::-1], np.uint16)
    mask[10:20, 10:20] = 1
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    r = client.put(
        "/datastore/label", params={"image": target, "tag": "final"}, files={"label": ("l.png", buf.getvalue())}
    )
    assert r.status_code == 200, r.text
    handed = client.post("/activelearning/random", json={"k": 3, "client_id": "reader4"}).json()["ids"]
    assert sorted(handed) == ["tile1", "tile2"], "the unlabelled tiles, never the labelled one"
    r = client.post("/activelearning/diversity", json={"client_id": "reader5"})  # nothing free is left
    assert r.status_code in (200, 404) and target not in str(r.json()), r.text


@pytest.mark.slow
def test_new_weights_and_a_new_tile_are_scored_in_the_background(small_server: tuple[httpx.Client, Path]) -> None:
    client, app_dir = small_server
    with open(dsb_tiles(4)[-1], "rb") as f:
        r = client.put("/datastore/image", params={"image": "tile_new"}, files={"file": ("tile_new.png", f)})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 1200  # a hang guard: scoring on a loaded 2-core machine takes minutes
    while "tile_new" not in _scores(app_dir):  # each ranked request that finds it unscored may start a run
        assert time.monotonic() < deadline, "the new tile was never scored"
        assert client.post("/activelearning/bald", json={"client_id": "reader"}).status_code == 200
        time.sleep(5)
    with open(NUCLEI.shipped_weights_path, "rb") as f:  # new weights (the same numbers): a new version
        r = client.put("/model/nuclei", files={"file": ("nuclei.pt", f)})
    assert r.status_code == 200, r.text
    served = app_dir / "model" / "nuclei.pt"
    version = f"nuclei.pt:{served.stat().st_mtime_ns}:{served.stat().st_size}"
    _wait_scored(app_dir, {"tile0", "tile1", "tile2", "tile_new"}, version)
