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
