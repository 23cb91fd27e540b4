"""The headline table of ``benchmarks/RESULTS.md``: ``python -m benchmarks.headline``.

Every figure is read from a results file stored in ``benchmarks/results/`` (nothing is rerun; the
bootstrap interval is computed from the stored per-case Dice, in well under a second), and each row
names the section of RESULTS.md, and so the command, that made its file. Prints Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from benchmarks.dice_interval import bootstrap_interval

RESULTS = Path(__file__).resolve().parent / "results"

# Files and the RESULTS.md sections (anchors) they come from.
ACCURACY = RESULTS / "cpu_ensemble" / "final4_test.json"
ACCURACY_SECTION = "held-out-accuracy-hippocampus"
PEER = RESULTS / "peer" / "quiet_2026-11-27.json"
ACTIVE_LEARNING = RESULTS / "active_learning_gpu" / "curves.csv"
ACTIVE_LEARNING_SECTION = "active-learning-does-it-save-labels-issue-5"
INTERACTIVE = RESULTS / "interactive" / "sessions.json"  # CT sessions (and the hippocampus before its correction)
INTERACTIVE_SECTION = "interactive-models-the-intensity-term-ct-clicks-reach-088-issue-26-2026-12-07"
CLICKS_HIPPOCAMPUS = RESULTS / "clicks" / "interactive_hippocampus" / "sessions.json"
CLICKS_HIPPOCAMPUS_SECTION = "hippocampus-clicks-each-click-corrects-as-far-as-the-networks-disagree-with-it-2026-12-07"
NUCLEI_AL = RESULTS / "al_dsb2018" / "curves.csv"
NUCLEI_AL_SECTION = "active-learning-on-dsb2018-and-the-labelling-effort-results-issue-27-2026-12-07"
OHIF_LABELING = RESULTS / "ohif_labeling" / "2026-12-07.json"  # transcribed: see its "source"
NUCLEI = RESULTS / "nuclei" / "2026-12-07.json"  # transcribed: see its "source"
TARGET_SHARE = 0.95  # of the whole-pool Dice (the run's full_pool rows), the level "labels to target" is read at


def accuracy_rows(path: Path = ACCURACY, resamples: int = 10_000) -> list[str]:
    """Held-out Dice of the shipped hippocampus model, with its 95% bootstrap interval over cases."""
    result = json.loads(path.read_text())
    per_case = np.array([float(np.mean(list(c.values()))) for c in result["per_case"].values()])
    low, high = bootstrap_interval(per_case, resamples, np.random.default_rng(0))
    classes = ", ".join(f"{name} {dice:.3f}" for name, dice in result["mean_dice"].items())
    return [
        f"| accuracy | `hippocampus` held-out Dice, {result['cases']} MSD test cases | "
        f"**{result['mean_of_classes']:.3f}** (95% CI {low:.3f}-{high:.3f}; {classes}) | "
        f"[Held-out accuracy](RESULTS.md#{ACCURACY_SECTION}) |"
    ]


def nuclei_rows(path: Path = NUCLEI) -> list[str]:
    """Held-out Dice / AJI of the shipped nuclei model on each dataset."""
    result = json.loads(path.read_text())
    figures = "; ".join(f"{name} {v['dice']:.3f} / {v['aji']:.3f}" for name, v in result["held_out"].items())
    return [
        f"| accuracy | `nuclei` held-out Dice / AJI, shipped weights | {figures} | "
        f"[Nuclei](RESULTS.md#{result['section']}) |"
    ]


def ohif_rows(path: Path = OHIF_LABELING) -> list[str]:
    """Seconds in the browser (``benchmarks.ohif_labeling``): next case to proposal and save, then a click."""
    result = json.loads(path.read_text())
    speed, clicks = result["speed"], result["clicks"]
    link = f"[OHIF labeling speed](RESULTS.md#{speed['section']})"
    nxt, save = float(np.median(speed["next_case_to_proposal_s"])), speed["save_in_page_median_s"]
    at_once = float(np.median(speed["next_case_saved_at_once_s"]))
    click = float(np.median(clicks["click_to_label_map_s"]))

    def verdict(value: float, goal: float) -> str:
        return f"goal {goal:g} s: {'met' if value <= goal else 'not met'}"

    return [
        f"| OHIF labeling | {speed['dataset']}: *Next case* to proposal shown, 5 s on each case (median of "
        f"{len(speed['next_case_to_proposal_s'])}) | **{nxt:.2f} s** ({verdict(nxt, speed['next_case_goal_s'])}; "
        f"saved at once: {at_once:.2f} s, {verdict(at_once, speed['next_case_goal_s']).split(': ')[1]}) | {link} |",
        f"| OHIF labeling | {speed['dataset']}: *Save* to SEG stored, in the page (median of 5) | **{save:.2f} s** "
        f"({verdict(save, speed['save_goal_s'])}) | {link} |",
        f"| OHIF labeling | {clicks['dataset']}: click to label map updated (median of "
        f"{len(clicks['click_to_label_map_s'])}) | **{click:.2f} s** | [OHIF clicks](RESULTS.md#{clicks['section']}) |",
    ]


def peer_rows(path: Path = PEER) -> list[str]:
    """Speed and memory against MONAI Label's sample radiology app, as ratios (ours / sample)."""
    run = json.loads(path.read_text())
    rows = []
    for row in run["rows"]:
        ratio = row["ours"] / row["sample"]
        target = f"; target <= {row['target']}x" if row["target"] else ""
        rows.append(
            f"| speed vs sample app | {row['measure']} | **{ratio:.2f}x** ({row['ours']:g} vs {row['sample']:g} "
            f"{row['unit']}{target}) | [Side by side](RESULTS.md#{run['section']}) |"
        )
    return rows


def interactive_rows(ct: Path = INTERACTIVE, hippocampus: Path = CLICKS_HIPPOCAMPUS) -> list[str]:
    """Mean Dice of the simulated annotator's sessions (``benchmarks.interactive``) after the issue's
    click counts: CT organs with no saved labels at 10 clicks, the hippocampus test split at 5."""
    rows = []
    for what, path, section, keep, clicks, goal in (
        (
            "CT organs, no saved labels",
            ct,
            INTERACTIVE_SECTION,
            lambda name: not name.startswith("hippocampus "),
            10,
            0.85,
        ),
        (
            "hippocampus test split",
            hippocampus,
            CLICKS_HIPPOCAMPUS_SECTION,
            lambda name: name.startswith("hippocampus "),
            5,
            0.92,
        ),
    ):
        dice = [s["dice"][clicks] for name, s in json.loads(path.read_text()).items() if keep(name)]
        mean = float(np.mean(dice))
        rows.append(
            f"| interactive | {what}: mean Dice after {clicks} clicks ({len(dice)} sessions) | **{mean:.3f}** "
            f"(goal {goal}: {'met' if mean >= goal else 'not met'}) | [Interactive](RESULTS.md#{section}) |"
        )
    return rows


def labels_to_target(path: Path = ACTIVE_LEARNING, measure: str = "dice") -> dict[str, float]:
    """Per strategy, the labels at which its mean curve crosses ``TARGET_SHARE`` of the whole-pool
    Dice (mean of the ``full_pool`` rows), read between rounds (a straight line between the two
    rounds it crosses between)."""
    curves: dict[str, dict[int, list[float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["strategy"], {}).setdefault(int(row["labelled"]), []).append(float(row[measure]))
    reference = float(np.mean([d for dice in curves.pop("full_pool").values() for d in dice]))
    target = TARGET_SHARE * reference
    crossing = {}
    for strategy, points in curves.items():
        mean = sorted((n, float(np.mean(d))) for n, d in points.items())
        for (n0, d0), (n1, d1) in zip(mean, mean[1:], strict=False):
            if d0 < target <= d1:
                crossing[strategy] = n0 + (target - d0) / (d1 - d0) * (n1 - n0)
                break
            if d0 >= target:
                crossing[strategy] = float(n0)
                break
    return crossing


def active_learning_rows(path: Path = ACTIVE_LEARNING, nuclei: Path = NUCLEI_AL) -> list[str]:
    rows = []
    for what, curves, section, measure in (
        ("hippocampus (3 seeds, shipped network, GPU run)", path, ACTIVE_LEARNING_SECTION, "dice"),
        ("nuclei, DSB2018 (3 seeds)", nuclei, NUCLEI_AL_SECTION, "dice"),
        ("nuclei, DSB2018 (3 seeds)", nuclei, NUCLEI_AL_SECTION, "aji"),
    ):
        crossing = labels_to_target(curves, measure)
        random = crossing["random"]
        best = min((s for s in crossing if s not in ("random", "oracle")), key=crossing.__getitem__)
        ratio = crossing[best] / random
        name = "Dice" if measure == "dice" else "AJI"
        verdict = "met" if ratio <= 0.5 else "not met"
        rows.append(
            f"| active learning | labels to {TARGET_SHARE:.0%} of whole-pool {name}, {what} | random {random:.1f}, "
            f"best `{best}` {crossing[best]:.1f}: **{ratio:.2f}x** (goal 0.5x: {verdict}) | "
            f"[Active learning](RESULTS.md#{section}) |"
        )
    return rows


def headline() -> str:
    rows = ["| area | figure | value | section |", "|---|---|---|---|"]
    rows += accuracy_rows() + nuclei_rows() + peer_rows() + interactive_rows() + active_learning_rows()
    rows += ohif_rows()
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(headline(), end="")


if __name__ == "__main__":
    main()
