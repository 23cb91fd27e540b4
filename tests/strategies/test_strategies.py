from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from appcore.errors import RequestError
from radiology.app import RadiologyApp
from strategies.ranked import RankedStrategy
from strategies.reservations import ReservationBook
from strategies.scores import NotForThisModel, Score, ScoreStore
from strategies.scoring import UncertaintyScoring
from tests.conftest import requires_shared


class FakeDatastore:
    def __init__(self, images: list[str], labelled: set[str]) -> None:
        self.images, self.labelled = images, labelled

    def get_unlabeled_images(self, tag: str = "final") -> list[str]:
        assert tag == "final"
        return [i for i in self.images if i not in self.labelled]

    def get_labeled_images(self, tag: str = "final") -> list[str]:
        assert tag == "final"
        return [i for i in self.images if i in self.labelled]

    def get_image_uri(self, image_id: str) -> str:
        return f"/data/{image_id}.nii.gz"


SCORES = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1, "e": 0.05}


def _strategy(scores: dict | None = SCORES, window: float = 600) -> RankedStrategy:
    return RankedStrategy(
        "test", book=ReservationBook(window), scores=(lambda: scores) if scores else None, rng=random.Random(0)
    )


def test_skips_labelled_and_honours_k() -> None:
    ds = FakeDatastore(list("abcde"), labelled={"a"})
    result = _strategy()({"k": 2, "client_id": "u1"}, ds)
    assert result["id"] == "b" and result["ids"] == ["b", "c"]
    assert result["scores"] == {"b": 0.8, "c": 0.7}


def test_reserved_images_are_skipped_until_the_window_ends() -> None:
    ds = FakeDatastore(list("abcde"), labelled=set())
    strategy = _strategy()
    assert strategy({"client_id": "u1"}, ds)["id"] == "a"
    assert strategy({"client_id": "u2"}, ds)["id"] == "b"
    assert strategy({"client_id": "u1"}, ds)["id"] == "c", "the same client is not handed its image twice either"


def test_empty_and_exhausted() -> None:
    assert _strategy()({}, FakeDatastore([], set())) is None
    ds = FakeDatastore(["a"], set())
    strategy = _strategy()
    assert strategy({}, ds)["id"] == "a"
    assert strategy({}, ds) is None


@pytest.mark.parametrize("k", ["x", 0, -2, 2.5, True, float("inf"), None, [2]])
def test_bad_k_is_a_400(k: object) -> None:
    with pytest.raises(RequestError, match="'k' must be a positive integer") as e:
        _strategy()({"k": k}, FakeDatastore(["a"], set()))
    assert e.value.status_code == 400


@pytest.mark.parametrize(("window", "cap", "k", "refused"), [(600, 3, 4, True), (600, 3, 3, False), (0, 3, 4, False)])
def test_a_k_over_the_cap_is_a_400_where_picks_are_held(window: float, cap: int, k: int, refused: bool) -> None:
    """One request must not reserve every image for the window (``--conf max_k``); without holds,
    a large ``k`` takes nothing from anyone."""
    strategy = RankedStrategy("test", book=ReservationBook(window, max_pick=cap), rng=random.Random(0))
    ds = FakeDatastore(list("abcde"), set())
    if refused:
        with pytest.raises(RequestError, match=r"'k' is 4: one request is handed at most 3 \(--conf max_k\)") as e:
            strategy({"k": k}, ds)
        assert e.value.status_code == 400
        assert len(strategy({"k": cap}, ds)["ids"]) == cap
    else:
        assert len(strategy({"k": k}, ds)["ids"]) == k


@pytest.mark.parametrize("k", [2, 2.0, "2"])
def test_whole_k_in_any_json_form_is_taken(k: object) -> None:
    assert len(_strategy()({"k": k}, FakeDatastore(list("abc"), set()))["ids"]) == 2


@pytest.mark.parametrize("scores", [SCORES, None])
def test_concurrent_requests_get_distinct_images(scores: dict | None) -> None:
    ds = FakeDatastore([f"i{n}" for n in range(30)] + list("abcde"), set())
    strategy = _strategy(scores)
    got: list[str] = []
    barrier = threading.Barrier(12)

    def ask(n: int) -> None:
        barrier.wait()
        result = strategy({"client_id": f"c{n}", "k": 2}, ds)
        got.extend(result["ids"])

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 24 and len(set(got)) == 24
    if scores:
        assert set("abcde") <= set(got), "the most uncertain images go out first"


class CountingScorer:
    def __init__(self, version: str) -> None:
        self._version = version
        self.calls: list[str] = []

    def version(self) -> str:
        return self._version

    def score(self, image_path: str) -> dict[str, float]:
        self.calls.append(image_path)
        return {"entropy": len(image_path) / 100, "bald": 0.01}


def test_scoring_only_rescores_stale_images(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "scores.json")
    ds = FakeDatastore(["a", "b", "c"], labelled={"c"})
    scorer = CountingScorer("v1")
    method = UncertaintyScoring("t", scorer=lambda: scorer, store=store, key="entropy")

    first = method({}, ds)
    assert first["scored"] == 2 and sorted(scorer.calls) == ["/data/a.nii.gz", "/data/b.nii.gz"]
    assert store.load()["a"].extra == {"bald": 0.01}

    scorer.calls.clear()
    assert method({}, ds)["scored"] == 0 and scorer.calls == []

    ds.images.append("d")
    assert method({}, ds)["scored"] == 1 and scorer.calls == ["/data/d.nii.gz"]

    scorer._version = "v2"  # new weights published: everything is stale
    scorer.calls.clear()
    assert method({}, ds)["scored"] == 3


class FailingScorer(CountingScorer):
    """Cannot score image ``b`` (a 2D or truncated file); with ``down``, the datastore is unreachable."""

    def __init__(self, version: str, down: bool = False) -> None:
        super().__init__(version)
        self.down = down

    def score(self, image_path: str) -> dict[str, float]:
        if self.down:
            raise HTTPException(503, "The PACS at http://pacs does not answer")
        if image_path.endswith("/b.nii.gz"):
            raise ValueError("zip() argument 2 is longer than argument 1")
        return super().score(image_path)


def test_an_image_that_cannot_be_scored_is_skipped_not_the_run(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "scores.json")
    ds = FakeDatastore(["a", "b", "c"], labelled=set())
    result = UncertaintyScoring("t", scorer=lambda: FailingScorer("v1"), store=store, key="entropy")({}, ds)
    assert result["scored"] == 2
    assert result["skipped"] == {"b": "ValueError: zip() argument 2 is longer than argument 1"}
    assert sorted(store.load()) == ["a", "c"]
    assert store.unusable() == result["skipped"], "kept for the strategies"
    for scores in (None, {"a": 0.1, "b": 0.9, "c": 0.5}):  # random, and a ranking that would put b first
        source = (lambda s=scores: s) if scores else None
        strategy = RankedStrategy("t", book=ReservationBook(0), scores=source, unusable=store.unusable)
        assert sorted(strategy({"k": 3}, ds)["ids"]) == ["a", "c"], "b, which cannot be scored, is not handed out"

    down = UncertaintyScoring("t", scorer=lambda: FailingScorer("v2", down=True), store=store, key="entropy")
    with pytest.raises(HTTPException) as e:
        down({}, ds)
    assert e.value.status_code == 503
    assert {k: v.model_version for k, v in store.load().items()} == {"a": "v1", "c": "v1"}, "earlier scores kept"


class OtherModalityScorer(CountingScorer):
    """Image ``b`` is for another served model."""

    def score(self, image_path: str) -> dict[str, float]:
        if image_path.endswith("/b.nii.gz"):
            self.calls.append(image_path)
            raise NotForThisModel("the image is no MR: handed out for organs_ct")
        return super().score(image_path)


def test_an_image_another_model_is_for_is_handed_out_and_not_scored_again_until_it_changes(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "scores.json")
    ds = FakeDatastore(["a", "b", "c"], labelled=set())
    scorer = OtherModalityScorer("v1")
    method = UncertaintyScoring("t", scorer=lambda: scorer, store=store, key="entropy")
    result = method({}, ds)
    assert result["skipped"] == {} and result["out_of_scope"] == {"b": "the image is no MR: handed out for organs_ct"}
    assert store.unusable() == {} and store.out_of_scope().keys() == {"b"} and sorted(store.load()) == ["a", "c"]
    strategy = RankedStrategy("t", book=ReservationBook(0), scores=store.values, unusable=store.unusable)
    assert strategy({"k": 3}, ds)["ids"][-1] == "b", "handed out, after the scored images"
    newer = OtherModalityScorer("v2")
    UncertaintyScoring("t", scorer=lambda: newer, store=store, key="entropy")({}, ds)
    assert "/data/b.nii.gz" not in newer.calls, "a new model version does not make it worth loading again"
    assert store.out_of_scope().keys() == {"b"}
    store.forget("b")  # its file was replaced
    assert store.out_of_scope() == {}
    assert method({}, ds)["out_of_scope"].keys() == {"b"}, "the new file is looked at again"


def test_score_store_roundtrip_and_filter(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "sub" / "s.json")
    assert store.load() == {}
    store.update({"a": Score(0.5, "v1", 1.0, {}), "b": Score(0.7, "v2", 2.0, {"bald": 0.1})})
    assert store.values() == {"a": 0.5, "b": 0.7}
    assert store.values("v2") == {"b": 0.7}
    assert not list((tmp_path / "sub").glob("*.tmp")), "no temporary file is left behind"


def test_score_store_forgets_one_image(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "s.json")
    store.update({"a": Score(0.5, "v1", 1.0, {}), "b": Score(0.7, "v1", 2.0, {})})
    store.set_unusable({"c": "ValueError: constant", "d": "EOFError"})
    for image_id in ("a", "c", "missing"):
        store.forget(image_id)
    assert (set(store.load()), store.unusable()) == ({"b"}, {"d": "EOFError"})
    assert not list(tmp_path.glob("*.tmp"))


def test_a_score_begun_before_its_image_changed_is_not_stored(tmp_path: Path) -> None:
    # A scoring run (another process) read the old file; the server then dropped the score; the run
    # flushes afterwards.
    store = ScoreStore(tmp_path / "s.json")
    begun = time.time()
    store.forget("a")
    store.update({"a": Score(0.9, "v1", begun - 1.0, {}), "b": Score(0.4, "v1", begun - 1.0, {})})
    assert set(store.load()) == {"b"}
    store.update({"a": Score(0.8, "v1", time.time() + 1.0, {})})  # the next run reads the new file
    assert store.load()["a"].value == 0.8


def test_score_store_measures_and_embeddings(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "s.json")
    store.update(
        {
            "a": Score(0.5, "v1", 1.0, {"bald": 0.2, "tta": 0.3, "embedding": [1.0, 0.0]}),
            "b": Score(0.7, "v1", 1.0, {"bald": 0.1}),
        }
    )
    assert store.measure(None) == {"a": 0.5, "b": 0.7}
    assert store.measure("bald") == {"a": 0.2, "b": 0.1}
    assert store.measure("tta") == {"a": 0.3}, "an image without the measure is unscored for that strategy"
    assert store.embeddings() == {"a": [1.0, 0.0]}


def test_scoring_flushes_in_batches_and_keeps_extra_measures(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "scores.json")
    ds = FakeDatastore([f"i{n}" for n in range(7)], labelled=set())
    writes: list[int] = []
    original = store.update
    store.update = lambda new: (writes.append(len(new)), original(new))  # type: ignore[method-assign]
    UncertaintyScoring("t", scorer=lambda: CountingScorer("v1"), store=store, key="entropy", flush_every=3)({}, ds)
    assert writes == [3, 3, 1] and len(store.load()) == 7


def _app_strategies(store: ScoreStore) -> dict:
    """The strategies exactly as the radiology app builds them, over ``store``."""
    host = SimpleNamespace(
        score_store=lambda: store,
        settings=SimpleNamespace(al_model="m"),
        book=ReservationBook(600),
    )
    return RadiologyApp.init_strategies(host)  # type: ignore[arg-type]


def _populated_store(tmp_path: Path, images: list[str]) -> ScoreStore:
    rng = random.Random(3)
    store = ScoreStore(tmp_path / "scores.json")
    store.update(
        {
            i: Score(
                rng.random(), "v1", 0.0, {"bald": rng.random(), "tta": rng.random(), "embedding": [rng.random()] * 3}
            )
            for i in images
        }
    )
    return store


STRATEGY_NAMES = ["random", "epistemic", "bald", "tta", "diversity"]


def test_app_offers_every_strategy(tmp_path: Path) -> None:
    assert sorted(_app_strategies(ScoreStore(tmp_path / "s.json"))) == sorted(STRATEGY_NAMES)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_honours_k_skips_labelled_and_never_double_serves(tmp_path: Path, name: str) -> None:
    images = [f"i{n:02d}" for n in range(40)]
    ds = FakeDatastore(images, labelled=set(images[:10]))
    strategy = _app_strategies(_populated_store(tmp_path, images))[name]
    got: list[list[str]] = []
    barrier = threading.Barrier(8)

    def ask(n: int) -> None:
        barrier.wait()
        got.append(strategy({"client_id": f"annotator{n}", "k": 3}, ds)["ids"])

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for ids in got for i in ids]
    assert all(len(ids) == 3 for ids in got), "k is honoured"
    assert len(set(flat)) == 24, "no image goes to two annotators within the reservation window"
    assert not set(flat) & set(images[:10]), "labelled images are never candidates"
    rest = strategy({"client_id": "late", "k": 100}, ds)["ids"]
    assert sorted(rest) == sorted(set(images[10:]) - set(flat)), "a large k gets every free image, once"


@pytest.mark.parametrize(("name", "key"), [("epistemic", None), ("bald", "bald"), ("tta", "tta")])
def test_ranked_strategies_follow_their_measure(tmp_path: Path, name: str, key: str | None) -> None:
    images = [f"i{n:02d}" for n in range(20)]
    store = _populated_store(tmp_path, images)
    ds = FakeDatastore(images, labelled=set())
    expected = sorted(images, key=lambda i: -store.measure(key)[i])[:4]
    assert _app_strategies(store)[name]({"client_id": "u", "k": 4}, ds)["ids"] == expected


def test_diversity_strategy_spreads_a_batch(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "s.json")
    emb = {"a1": [1.0, 0.0, 0.0], "a2": [0.99, 0.01, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}
    unc = {"a1": 0.9, "a2": 0.89, "b": 0.5, "c": 0.4}
    store.update({i: Score(unc[i], "v1", 0.0, {"embedding": e}) for i, e in emb.items()})
    ds = FakeDatastore(list(emb), labelled=set())
    assert _app_strategies(store)["epistemic"]({"k": 3}, ds)["ids"] == ["a1", "a2", "b"]
    assert _app_strategies(store)["diversity"]({"k": 3}, ds)["ids"] == ["a1", "b", "c"], "one of the near-twins"
    ds.labelled = {"a1"}
    assert _app_strategies(store)["diversity"]({"k": 1}, ds)["ids"] == ["b"], "a1 labelled covers a2"
    ds.labelled = set()
    diversity = _app_strategies(store)["diversity"]
    assert diversity({"client_id": "u1", "k": 1}, ds)["ids"] == ["a1"]
    assert diversity({"client_id": "u2", "k": 1}, ds)["ids"] == ["b"], "a1, held by u1, covers its near-twin"


@requires_shared
def test_next_sample_parses_the_scores_once_per_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.apps import make_app

    app = make_app(tmp_path, "hippocampus", labelled=0, conf={"score_new_images": "true"})
    ids = app.datastore().get_unlabeled_images("final")
    app.score_store().update({i: Score(0.5 + n / 10, "v1", 0.0, {}) for n, i in enumerate(ids)})
    parsed: list[str] = []
    query = app.score_store().db.query

    def counting(sql: str, params: object = ()) -> list:
        if "FROM scores WHERE" in sql:
            parsed.append(sql)
        return query(sql, params)

    monkeypatch.setattr(app.score_store().db, "query", counting)
    picked = [app.next_sample({"strategy": "epistemic", "k": 1, "client_id": c})["ids"] for c in ("u1", "u2")]
    assert picked == [[ids[1]], [ids[0]]], "ranked by score, never the same image twice"
    assert len(parsed) == 1, "the strategy and the new-image check share one cached store"
    assert app.score_store() is app.score_store()


@requires_shared
def test_a_restarted_app_keeps_the_reservations(tmp_path: Path) -> None:
    from appcore.identity import User, current_user
    from tests.apps import make_app, unwatched_app

    app = make_app(tmp_path, "hippocampus", labelled=0)
    as_alice = current_user.set(User("alice"))  # the owner is the request's user (its token), not client_id
    try:
        first = app._strategies["random"]({"client_id": "slicer"}, app.datastore())["id"]
    finally:
        current_user.reset(as_alice)
    restarted = unwatched_app(
        tmp_path / "app", tmp_path / "studies", {"models": "hippocampus", "score_on_start": "false", "max_k": "1"}
    )
    assert restarted.book.reserved() == {first: "alice"}
    second = restarted._strategies["random"]({"client_id": "bob"}, restarted.datastore())["id"]
    assert second != first
    with pytest.raises(RequestError, match="at most 1 .--conf max_k."):  # the app's book has the cap
        restarted._strategies["epistemic"]({"client_id": "bob", "k": 2}, restarted.datastore())


def test_a_store_with_a_cached_copy_loses_no_score_and_revives_no_forgotten_one(tmp_path: Path) -> None:
    """Two stores on one database (the server and a scoring process): each write merges into the
    rows as they are, and a cached copy is read again after another's change."""
    path = tmp_path / "scores.json"
    first, second = ScoreStore(path), ScoreStore(path)
    first.update({"a": Score(0.1, "v", 0.0, {})})
    assert set(first.load()) == {"a"}  # read and cached
    second.update({"b": Score(0.2, "v", 0.0, {})})
    assert set(first.load()) == {"a", "b"}, "a reader kept its old copy after another store's write"
    first.update({"c": Score(0.3, "v", 0.0, {})})
    second.forget("a")
    first.update({"d": Score(0.4, "v", 0.0, {})})
    assert set(ScoreStore(path).load()) == {"b", "c", "d"}, "a forgotten score came back"
    second.set_unusable({"e": "EOFError"})
    assert first.unusable() == {"e": "EOFError"}


def test_reads_parse_the_scores_again_only_after_a_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ScoreStore(tmp_path / "scores.json")
    store.update({"a": Score(0.1, "v", 0.0, {"bald": 0.2})})
    reads: list[str] = []
    query = store.db.query
    monkeypatch.setattr(store.db, "query", lambda sql, params=(): (reads.append(sql), query(sql, params))[1])
    for _ in range(3):
        assert set(store.load()) == {"a"}
    assert sum("FROM scores WHERE" in sql for sql in reads) == 1, reads
    ScoreStore(tmp_path / "scores.json").update({"b": Score(0.2, "v", 0.0, {})})  # another process's write
    assert set(store.load()) == {"a", "b"}
    assert sum("FROM scores WHERE" in sql for sql in reads) == 2, reads


def test_two_rankings_in_one_database_stay_apart(tmp_path: Path) -> None:
    hippo, tiles = ScoreStore(tmp_path / "scores_hippocampus.json"), ScoreStore(tmp_path / "scores_tiles.json")
    hippo.update({"a": Score(0.1, "v", 0.0, {})})
    tiles.update({"b": Score(0.2, "v", 0.0, {})})
    tiles.set_unusable({"c": "a whole-slide image"})
    assert (set(hippo.load()), hippo.unusable(), set(tiles.load())) == ({"a"}, {}, {"b"})


def test_a_nan_score_is_stored_as_nan(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "scores.json")
    store.update({"a": Score(float("nan"), "v", 0.0, {"bald": float("inf")})})
    fresh = ScoreStore(tmp_path / "scores.json").load()["a"]
    assert fresh.value != fresh.value and fresh.extra == {"bald": float("inf")}


def _legacy_files(folder: Path, forgotten_at: float) -> None:
    """The score files an older server left in its model folder."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    scores = {
        "a": {"value": 0.9, "model_version": "v1", "ts": 1.0, "extra": {"embedding": [1.0, 2.0]}},
        "b": {"value": 0.5, "model_version": "v1", "ts": forgotten_at - 10, "extra": {}},  # older than its file
        "c": {"value": 0.4, "model_version": "v1", "ts": 2.0, "extra": {"bald": 0.3}},
    }
    (folder / "scores_hippocampus.json").write_text(json.dumps(scores))
    (folder / "scores_hippocampus.unusable.json").write_text(json.dumps({"d": "EOFError"}))
    (folder / "scores_hippocampus.forgotten.json").write_text(json.dumps({"b": forgotten_at}))


def test_the_json_score_files_of_an_older_server_move_into_the_database(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _legacy_files(model, forgotten_at=100.0)
    ScoreStore(model / "scores_hippocampus.json").update({"c": Score(0.7, "v2", 3.0, {})})  # newer than the file's
    store = ScoreStore(model / "scores_hippocampus.json")
    scores = store.load()
    assert sorted(scores) == ["a", "c"], "b was scored from the file it had before it changed"
    assert scores["a"].extra == {"embedding": [1.0, 2.0]} and scores["c"].model_version == "v2"
    assert store.unusable() == {"d": "EOFError"}
    assert sorted(p.name for p in model.iterdir() if "scores" in p.name) == [
        "scores_hippocampus.forgotten.json.migrated",
        "scores_hippocampus.json.migrated",
        "scores_hippocampus.unusable.json.migrated",
    ]
    store.update({"b": Score(0.6, "v2", 50.0, {})})
    assert "b" not in ScoreStore(model / "scores_hippocampus.json").load(), "the forgotten time was moved in too"


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        ('{"a": {"value": 0.', set()),  # cut off by an older server's crash
        ("[1, 2]", set()),  # not an object
        ('{"a": {"value": 0.5}, "b": {"value": 0.4, "model_version": "v", "ts": 1.0, "extra": {}}}', {"b"}),
    ],
)
def test_a_damaged_score_file_or_entry_is_left_to_rescoring(tmp_path: Path, content: str, kept: set[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "scores_tiles.json").write_text(content)
    store = ScoreStore(model / "scores_tiles.json")
    assert set(store.load()) == kept
    assert (model / "scores_tiles.json.migrated").exists() and not (model / "scores_tiles.json").exists()


_PROCESS_WRITER = """
import sys
from strategies.scores import Score, ScoreStore
store = ScoreStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.update({f"{sys.argv[2]}_{i}": Score(0.5, "v", 0.0, {"embedding": [float(i)] * 8})})
    if i % 5 == 0:
        store.forget(f"{sys.argv[2]}_{i}")
"""


def test_scoring_processes_and_the_server_write_scores_at_once(tmp_path: Path) -> None:
    """Scoring runs are processes of their own, beside the server's threads: nothing is lost."""
    import subprocess
    import sys

    path, each = tmp_path / "model" / "scores_hippocampus.json", 30
    _legacy_files(tmp_path / "model", forgotten_at=100.0)  # every process races to move them in
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _PROCESS_WRITER, str(path), name, str(each)], env=env)
        for name in ("p", "q", "r")
    ]
    ScoreStore(path).update({f"s_{i}": Score(0.1, "v", 0.0, {}) for i in range(each)})  # the server meanwhile
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    got = set(ScoreStore(path).load())
    expected = {f"{n}_{i}" for n in "pqr" for i in range(each) if i % 5} | {f"s_{i}" for i in range(each)}
    assert got == expected | {"a", "c"}


def test_concurrent_score_updates_lose_nothing(tmp_path: Path) -> None:
    """Scoring runs write from processes of their own (a POST /scoring run and the one at the end of a
    training may overlap): each merges into the file as it is, under a lock, so no score is lost."""
    path, writers, each = tmp_path / "scores.json", 4, 25
    start = threading.Barrier(writers)

    def write(w: int) -> None:
        store = ScoreStore(path)  # one per writer, as each process has its own
        start.wait()
        for i in range(each):
            store.update({f"w{w}_{i}": Score(0.5, "v", 0.0, {})})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ScoreStore(path).load()) == writers * each
