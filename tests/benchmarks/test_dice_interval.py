"""The bootstrap interval behind the held-out Dice's error bars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.dice_interval import bootstrap_interval, main


def test_identical_cases_leave_nothing_to_vary() -> None:
    assert bootstrap_interval(np.full(10, 0.88), 200, np.random.default_rng(0)) == pytest.approx((0.88, 0.88))


def test_the_interval_holds_the_mean_and_narrows_with_more_cases() -> None:
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.88, 0.03, 10), rng.normal(0.88, 0.03, 1000)
    low_few, high_few = bootstrap_interval(few, 2000, rng)
    low_many, high_many = bootstrap_interval(many, 2000, rng)
    assert low_few < few.mean() < high_few and low_many < many.mean() < high_many
    assert high_many - low_many < (high_few - low_few) / 3


@pytest.mark.parametrize("values", [np.array([0.9]), np.zeros((3, 2))])
def test_one_value_per_case_for_two_cases_or_more(values: np.ndarray) -> None:
    with pytest.raises(ValueError, match="need one value per case for at least two cases"):
        bootstrap_interval(values, 10, np.random.default_rng(0))


def test_the_command_reads_evaluate_s_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = tmp_path / "test.json"
    per_case = {f"case{i}": {"anterior": 0.9, "posterior": 0.8} for i in range(5)}
    result.write_text(json.dumps({"per_case": per_case}))
    main([str(result), "--resamples", "50"])
    assert "| mean of classes | 0.8500 | 0.8500 - 0.8500 |" in capsys.readouterr().out
    result.write_text(json.dumps({"mean_of_classes": 0.85}))
    with pytest.raises(SystemExit):
        main([str(result)])


def test_the_paired_difference_against_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours, base = tmp_path / "ours.json", tmp_path / "base.json"
    spread = [0.70, 0.80, 0.90, 0.85, 0.75]
    # The cases vary a lot, the difference does not: +0.01 on four cases, -0.01 on one.
    ours.write_text(json.dumps({"per_case": {f"c{i}": {"a": v, "b": v} for i, v in enumerate(spread)}}))
    shift = [0.01, 0.01, 0.01, 0.01, -0.01]
    base.write_text(
        json.dumps(
            {
                "per_case": {
                    f"c{i}": {"a": v - d, "b": v - d} for i, (v, d) in enumerate(zip(spread, shift, strict=True))
                }
            }
        )
    )
    main([str(ours), "--versus", str(base), "--resamples", "2000"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "minus base.json" in line)
    mean, interval = row.split("|")[2:4]
    assert float(mean) == pytest.approx(0.006)
    low, high = (float(v) for v in interval.split(" - "))
    assert -0.01 <= low < 0.006 < high <= 0.01  # paired: far narrower than the cases' own spread
    assert "higher on 4 of 5 cases, lower on 1" in out
    base.write_text(json.dumps({"per_case": {"other": {"a": 0.5, "b": 0.5}}}))
    with pytest.raises(SystemExit):
        main([str(ours), "--versus", str(base)])
