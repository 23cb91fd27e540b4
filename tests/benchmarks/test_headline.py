"""``benchmarks/RESULTS.md`` opens with the headline table ``python -m benchmarks.headline`` prints."""

from __future__ import annotations

import re

import pytest

from benchmarks import headline
from tests.conftest import ROOT

RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text()


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


ANCHORS = {_anchor(line.lstrip("#")) for line in RESULTS.splitlines() if line.startswith("#")}


def test_results_page_opens_with_the_headline_table() -> None:
    table = headline.headline()
    top = RESULTS[: RESULTS.index("# History")]
    assert table in top, "regenerate the table at the top of RESULTS.md: python -m benchmarks.headline"
    assert len(table.splitlines()) <= 20, "one screen"


def test_every_link_of_the_top_goes_to_a_section() -> None:
    top = RESULTS[: RESULTS.index("# History")]
    links = re.findall(r"\]\((?:RESULTS\.md)?#([^)]+)\)", top + headline.headline())
    assert links and not sorted(set(links) - ANCHORS)
    files = re.findall(r"\]\(((?!https?:|#|RESULTS\.md#)[^)#]+)", top)
    assert files and [f for f in files if not (ROOT / "benchmarks" / f).exists()] == []


@pytest.mark.parametrize("area", ["accuracy", "speed vs sample app", "interactive", "active learning", "OHIF labeling"])
def test_the_headline_covers_each_area(area: str) -> None:
    assert f"| {area} |" in headline.headline()


def test_the_headline_figures_are_the_recorded_ones() -> None:
    table = headline.headline()
    assert "**0.881** (95% CI 0.870-0.891" in table  # the held-out accuracy section's figures
    assert "random 8.9, best `bald` 7.4: **0.83x**" in table  # the active learning section's
    assert "random 26.3, best `epistemic` 12.4: **0.47x**" in table  # DSB2018's (issue 27)
    assert "after 10 clicks (5 sessions) | **0.880**" in table  # the interactive section's (issue 26)
    assert "CPM-15 held-out (3 tiles) 0.882 / 0.639" in table  # the nuclei section's (issue 27)
    assert "(median of 5) | **1.81 s** (goal 2 s: met; saved at once: 3.38 s, not met)" in table  # issue 25's
    assert "click to label map updated (median of 5) | **0.84 s**" in table  # OHIF clicks (issue 26)


# Sections appended since the redesign that hold no current figure, and why.
NOT_CURRENT = {
    "interactive-models-clicks-with-a-simulated-annotator-issue-26-2026-12-07": "superseded by the intensity term's",
    "hippocampus-click-network-2026-12-07": "superseded by 'Hippocampus clicks: each click corrects ...'",
    "active-learning-on-a-varied-pool-nuclei-of-dsb2018-rules-committed-before-runs-issue-27-2026-12-07": (
        "the rules, written before the runs; the results section holds the figures"
    ),
    "hippocampus-clicks-feature-space-refinement-2026-12-07": (
        "an experiment not shipped (validation only); the engine's figures are 'each click corrects ...'"
    ),
}


def test_every_newer_section_with_a_current_figure_is_reached_from_the_top() -> None:
    top = RESULTS[: RESULTS.index("# History")]
    linked = set(re.findall(r"\]\((?:RESULTS\.md)?#([^)]+)\)", top))
    newer = RESULTS[RESULTS.index("\n## New results\n") :]
    sections = [_anchor(line[3:]) for line in newer.splitlines() if line.startswith("## ")][1:]
    assert set(NOT_CURRENT) <= set(sections)
    assert [s for s in sections if s not in linked and s not in NOT_CURRENT] == []


def test_the_maintained_benchmarks_are_the_ones_listed() -> None:
    listed = set(re.findall(r"`python -m benchmarks\.(\w+)`", RESULTS[: RESULTS.index("# History")]))
    present = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__"}
    assert listed == present


def test_new_results_go_at_the_end() -> None:
    assert "\n## New results\n" in RESULTS
