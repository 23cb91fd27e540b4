"""The active-learning simulation: its pure parts, and one tiny real run on the hippocampus data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.active_learning import STRATEGIES, choose, labels_interpolated, labels_needed, main, summarise
from benchmarks.al_split import make_split
from tests.conftest import HIPPO, requires_shared


@pytest.mark.parametrize(
    ("curve", "target", "expected"),
    [
        ({4: 0.5, 8: 0.7, 12: 0.8}, 0.7, 8),
        ({4: 0.5, 8: 0.7, 12: 0.8}, 0.81, None),
        ({4: 0.9, 8: 0.7}, 0.8, 4),
        ({}, 0.1, None),
    ],
)
def test_labels_needed(curve: dict, target: float, expected: int | None) -> None:
    assert labels_needed(curve, target) == expected


@pytest.mark.parametrize(
    ("curve", "target", "expected"),
    [
        ({4: 0.5, 8: 0.7, 12: 0.8}, 0.7, 8.0),  # on a measured point
        ({4: 0.5, 8: 0.7, 12: 0.8}, 0.75, 10.0),  # halfway between 8 and 12
        ({4: 0.5, 8: 0.7, 12: 0.8}, 0.55, 5.0),
        ({8: 0.7, 4: 0.5}, 0.6, 6.0),  # order of the points does not matter
        ({4: 0.5, 8: 0.7, 12: 0.8}, 0.81, None),
        ({4: 0.9, 8: 0.7}, 0.8, 4.0),  # already there at the start: nothing measured before it
        ({4: 0.5, 8: 0.8, 12: 0.7, 16: 0.9}, 0.75, 4 + 4 * 0.25 / 0.3),  # the first crossing counts
        ({}, 0.1, None),
    ],
)
def test_labels_interpolated(curve: dict, target: float, expected: float | None) -> None:
    got = labels_interpolated(curve, target)
    assert got == (None if expected is None else pytest.approx(expected))


def _rows(strategy: str, seed: int, dice: list[float]) -> list[dict]:
    return [{"strategy": strategy, "seed": seed, "labelled": 4 * (i + 1), "dice": d} for i, d in enumerate(dice)]


def test_summary_compares_with_random_at_95_percent_of_the_reference() -> None:
    rows = [{"strategy": "full_pool", "seed": 0, "labelled": 80, "dice": 0.8}]  # target 0.76
    rows += _rows("random", 0, [0.5, 0.6, 0.7, 0.76]) + _rows("random", 1, [0.5, 0.6, 0.7, 0.78])
    rows += _rows("bald", 0, [0.5, 0.77, 0.8, 0.8]) + _rows("bald", 1, [0.5, 0.7, 0.8, 0.8])
    rows += _rows("tta", 0, [0.5, 0.5, 0.5, 0.5])
    table, info = summarise(rows)
    assert info["target"] == pytest.approx(0.76)
    assert info["needed"] == {"random": 16, "bald": 12, "tta": None}
    # Mean curves: random 0.5, 0.6, 0.7, 0.77 crosses 0.76 at 12 + 4 * 0.06 / 0.07; bald 0.5, 0.735, 0.8
    # crosses at 8 + 4 * 0.025 / 0.065.
    assert info["between"]["random"] == pytest.approx(12 + 4 * 0.06 / 0.07)
    assert info["between"]["bald"] == pytest.approx(8 + 4 * 0.025 / 0.065)
    bald_line = next(line for line in table.splitlines() if line.startswith("| bald |"))
    assert bald_line.endswith("| 12 | 8, 12 | 0.75x | 9.5 | 0.62x |")
    assert "| tta | 1 |" in table and ">16" in table


def test_summary_without_reference() -> None:
    assert summarise(_rows("random", 0, [0.5]))[1] == {}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_choose_picks_k_unlabelled(strategy: str) -> None:
    rng = random.Random(0)
    unlabelled = [f"u{i}" for i in range(10)]
    measures = {
        i: {"entropy": rng.random(), "bald": rng.random(), "tta": rng.random(), "embedding": [rng.random(), 1.0]}
        for i in unlabelled + ["l0"]
    }
    picked = choose(strategy, unlabelled, ["l0"], measures, 3, random.Random(1))
    assert len(picked) == 3 and len(set(picked)) == 3 and set(picked) <= set(unlabelled)
    if strategy in ("epistemic", "bald", "tta"):
        key = {"epistemic": "entropy"}.get(strategy, strategy)
        assert picked == sorted(unlabelled, key=lambda i: -measures[i][key])[:3]


@requires_shared
def test_tiny_simulation_writes_curves_summary_and_plot(tmp_path: Path) -> None:
    counts = make_split(HIPPO, tmp_path / "split", pool_size=6)
    assert counts == {"pool": 6, "test": 40}
    test_dir = tmp_path / "split" / "test"
    for sub in ("imagesTr", "labelsTr"):
        for link in sorted((test_dir / sub).iterdir())[2:]:
            link.unlink()  # two test cases are enough to exercise the loop
    out = tmp_path / "out"
    args = ["--pool", str(tmp_path / "split" / "pool"), "--test", str(test_dir), "--out", str(out)]
    args += [
        "--strategy",
        "random,diversity,oracle",
        "--initial",
        "2",
        "--per-round",
        "2",
        "--rounds",
        "1",
        "--seed",
        "0",
    ]
    args += ["--initial-steps", "2", "--steps-per-round", "2", "--channels", "4,8,16,32"]
    args += ["--mc-samples", "2", "--tta-samples", "2", "--threads", "1"]
    main(args)
    runs = {p.name for p in (out / "runs").glob("*.json")}
    assert runs == {"full_pool_seed0.json", "random_seed0.json", "diversity_seed0.json", "oracle_seed0.json"}
    diversity = json.loads((out / "runs" / "diversity_seed0.json").read_text())["rows"]
    assert [r["labelled"] for r in diversity] == [2, 4]
    assert len(diversity[1]["picked"].split(";")) == 2
    assert (out / "learning_curves.png").stat().st_size > 10_000
    _oracle_picked_the_worst_segmented(out, tmp_path / "split" / "pool")
    assert "| random | 1 |" in (out / "summary.md").read_text()
    # a second call resumes: nothing left to run, the files stay
    before = (out / "runs" / "random_seed0.json").stat().st_mtime_ns
    main(args)
    assert (out / "runs" / "random_seed0.json").stat().st_mtime_ns == before


def _oracle_picked_the_worst_segmented(out: Path, pool_dir: Path) -> None:
    """The oracle's first picks are the unlabelled cases with the lowest Dice under the initial model."""
    import numpy as np
    import torch

    from benchmarks.active_learning import Data, Learner, Schedule
    from research.radiology.offline import validate
    from research.radiology.splits import msd_cases

    run = json.loads((out / "runs" / "oracle_seed0.json").read_text())
    saved = torch.load(out / "runs" / "initial_seed0.pt", weights_only=False)
    schedule = Schedule(**{**run["meta"]["schedule"], "channels": tuple(run["meta"]["schedule"]["channels"])})
    learner = Learner(schedule.spec(), schedule.lr, torch.device("cpu"), schedule.cpu_bf16)
    learner.load(saved["state"])
    data = Data(schedule.spec(), msd_cases(pool_dir), [])
    dice = {
        case: float(np.mean(list(validate(schedule.spec(), learner.network, [item], torch.device("cpu")).values())))
        for case, item in data.pool.items()
        if case not in saved["initial"]
    }
    worst = sorted(dice, key=lambda c: dice[c])[:2]
    assert sorted(run["rows"][1]["picked"].split(";")) == sorted(worst)


def test_pool_and_test_must_not_overlap(tmp_path: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "d" / sub).mkdir(parents=True)
        (tmp_path / "d" / sub / "case_1.nii.gz").write_bytes(b"")
    with pytest.raises(SystemExit, match="share cases"):
        main(["--pool", str(tmp_path / "d"), "--test", str(tmp_path / "d"), "--out", str(tmp_path / "o")])


def test_next_sample_benchmark_answers_every_strategy() -> None:
    from benchmarks.strategies import STRATEGY_NAMES, next_sample_table

    table = next_sample_table(images=60, repeats=1)  # 45 picks, all reserved
    assert [line.split("|")[1].strip() for line in table.splitlines()[4:]] == list(STRATEGY_NAMES)


def _effort(strategy: str, seed: int, pixels: list[int], scratch: list[int]) -> list[dict]:
    return [
        {"strategy": strategy, "seed": seed, "round": i, "case": f"c{i}", "pixels": p, "scratch_pixels": s}
        for i, (p, s) in enumerate(zip(pixels, scratch, strict=True))
    ]


def test_effort_summary_counts_the_cheaper_of_correcting_and_drawing_per_case() -> None:
    from benchmarks.active_learning import summarise_effort

    rows = _effort("random", 0, [10, 50, 200], [100, 100, 100])  # the third: cleared and drawn (100)
    rows += _effort("random", 1, [30, 50, 60], [100, 100, 100])
    rows += _effort("bald", 0, [10, 20, 40], [100, 100, 100])
    table = summarise_effort(rows)
    random_line = next(line for line in table.splitlines() if line.startswith("| random |"))
    bald_line = next(line for line in table.splitlines() if line.startswith("| bald |"))
    # random: totals 160 and 140, mean 150 of 300 from scratch (50% saved); bald 70 (76.7%), 0.47x random's
    assert random_line == "| random | 2 | 3 | 150 ± 10 (300) | 50.0% | 1.00x |"
    assert bald_line == "| bald | 1 | 3 | 70 (300) | 76.7% | 0.47x |"
    assert summarise_effort([]) == "No effort measured.\n"


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        # one wrong voxel in axial slice 1 of 3; from scratch 2 labelled voxels in 2 slices
        ([[[0, 1, 0]], [[0, 2, 0]]], [[[1, 1, 0]], [[0, 2, 0]]], {"voxels": 1, "slices": 1, "scratch_voxels": 3}),
        ([[[0, 0, 0]]], [[[0, 0, 0]]], {"voxels": 0, "slices": 0, "scratch_voxels": 0}),
    ],
)
def test_volume_effort(pred: list, truth: list, expected: dict) -> None:
    import numpy as np

    from benchmarks.active_learning import volume_effort

    got = volume_effort(np.asarray(pred), np.asarray(truth))
    assert {k: got[k] for k in expected} == expected
    assert got["scratch_slices"] == int((np.asarray(truth) > 0).any(axis=(0, 1)).sum())


DSB = HIPPO.parent / "pathology" / "nuclei_dsb2018"


@pytest.mark.skipif(not (DSB / "images").is_dir(), reason=f"the DSB2018 tiles under {DSB} are absent")
def test_tiny_pathology_simulation_labels_the_whole_pool_and_counts_the_effort(tmp_path: Path) -> None:
    from benchmarks.al_split import main as split_main

    split = tmp_path / "split.json"
    split_main(
        ["--app", "pathology", "--source", str(DSB), "--out", str(split), "--pool-size", "5", "--test-size", "2"]
    )
    layout = json.loads(split.read_text())
    assert (len(layout["pool"]), len(layout["test"])) == (5, 2) and not set(layout["pool"]) & set(layout["test"])
    out = tmp_path / "out"
    args = ["--app", "pathology", "--pool", str(DSB), "--split", str(split), "--out", str(out)]
    args += ["--strategy", "random,bald,diversity,oracle", "--initial", "2", "--per-round", "2", "--rounds", "all"]
    args += ["--seed", "0", "--initial-steps", "1", "--steps-per-round", "1", "--batch-size", "2", "--crop", "64"]
    args += ["--mc-samples", "2", "--effort", "--threads", "1"]
    main(args)
    for strategy in ("random", "bald", "diversity", "oracle"):
        run = json.loads((out / "runs" / f"{strategy}_seed0.json").read_text())
        assert [r["labelled"] for r in run["rows"]] == [2, 4, 5], "rounds until the whole pool is labelled"
        assert {"aji", "dice"} <= set(run["rows"][-1])
        assert sorted(e["case"] for e in run["effort"]) == layout["pool"], "every pool image's effort, once"
        assert all(e["scratch_nuclei"] > 0 and e["nuclei"] >= 0 for e in run["effort"])
    summary = (out / "summary.md").read_text()
    assert "### AJI" in summary and "### Dice" in summary and "### Labelling effort" in summary
    assert (out / "learning_curves.png").stat().st_size > 10_000
    assert (out / "learning_curves_dice.png").stat().st_size > 10_000
    assert (out / "effort.csv").read_text().startswith("strategy,seed,round,case,nuclei_add")
    assert (out / "effort.png").stat().st_size > 10_000


def test_a_pathology_split_whose_pool_and_test_overlap_is_refused(tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"pool": ["a", "b"], "test": ["b"]}))
    with pytest.raises(SystemExit, match="pool and test share images"):
        main(["--app", "pathology", "--pool", str(tmp_path), "--split", str(split), "--out", str(tmp_path / "o")])
