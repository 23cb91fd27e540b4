"""Clicks against Dice with a simulated annotator, for the interactive models (issue 26).

The annotator clicks at the centre (largest distance to its border, in mm) of the largest wrong
6-connected region: a missed region gets a click of the structure, a false one a background click;
every earlier click is sent again. Sessions: the hippocampus test split (both labels at once, the
engine registered for ``hippocampus``) and one session per CT organ (``spleen_ct``; the
TotalSegmentator example's liver, spleen and kidneys on ``example_ct_sm``, which ``example_seg``
matches), with ``organs_ct`` untrained (no proposal).

    python -m benchmarks.interactive [--data ../shared/data] [--clicks 10] [--out DIR] [--limit N] [--check]

``--check`` adds a check set of CT structures the click engine's settings were not chosen on: the
``dicom/ct_abdomen`` series (liver, spleen, stomach, aorta, pancreas of its TotalSegmentator labels),
the stomach, aorta, gallbladder and pancreas of ``example_ct_sm``, and the two contrast chest crops
(aorta, pulmonary artery).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from radiology.clicks import ClickEngine, Clicks
from radiology.graphcut import voxel_spacing

logger = logging.getLogger(__name__)

REPORTED = (0, 1, 3, 5, 10)
TARGET = 0.90


@dataclass
class Session:
    """One structure set to segment on one image: ``truth`` holds the model's label ids."""

    name: str
    image: np.ndarray
    affine: np.ndarray
    truth: np.ndarray
    labels: dict[str, int]
    proposal: np.ndarray | None = None
    dice: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def dice(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> float:
    """Mean Dice over ``labels`` (a label absent from both counts 1)."""
    scores = []
    for label in labels:
        p, t = pred == label, truth == label
        total = p.sum() + t.sum()
        scores.append(1.0 if total == 0 else 2.0 * float((p & t).sum()) / float(total))
    return float(np.mean(scores))


def next_click(
    pred: np.ndarray, truth: np.ndarray, names: dict[int, str], spacing: np.ndarray
) -> tuple[str, tuple[int, int, int]] | None:
    """The annotator's next click: the centre of the largest wrong 6-connected region, named by the
    truth there (``background`` for a false region); ``None`` when nothing is wrong."""
    wrong = pred != truth
    if not wrong.any():
        return None
    # Regions are split by what they should be, so one region is one fix.
    best: tuple[int, np.ndarray] | None = None
    for value in np.unique(truth[wrong]):
        parts, count = ndimage.label(wrong & (truth == value))
        if not count:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (int(sizes[largest - 1]), parts == largest)
    assert best is not None
    region = best[1]
    inside = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    voxel = tuple(int(c) for c in np.unravel_index(int(np.argmax(inside)), region.shape))
    value = int(truth[voxel])
    return (names.get(value, "background") if value else "background"), voxel


def run_session(engine: ClickEngine, session: Session, clicks: int) -> Session:
    """Click ``clicks`` times, recording Dice after each answer (index 0: before any click)."""
    names = {v: k for k, v in session.labels.items()}
    ids = sorted(session.labels.values())
    spacing = voxel_spacing(session.affine)
    pred = session.proposal if session.proposal is not None else np.zeros(session.truth.shape, np.uint8)
    session.dice = [dice(pred, session.truth, ids)]
    sent: Clicks = {}
    for _ in range(clicks):
        click = next_click(pred, session.truth, names, spacing)
        if click is None:
            session.dice.append(session.dice[-1])
            continue
        sent.setdefault(click[0], []).append(click[1])
        start = time.perf_counter()
        pred = engine.segment(session.image, session.affine, {k: list(v) for k, v in sent.items()}, session.proposal)
        session.seconds.append(time.perf_counter() - start)
        session.dice.append(dice(pred, session.truth, ids))
    return session


def clicks_to(curve: Sequence[float], target: float = TARGET) -> int | None:
    """The first click count whose Dice reaches ``target`` (``None``: not within the session)."""
    return next((i for i, d in enumerate(curve) if d >= target), None)


def ct_sessions(data: Path) -> list[Session]:
    """The five CT organ sessions, each with ``organs_ct``'s ids and one organ."""
    from radiology.organs_ct import ORGANS_CT
    from research.radiology.label_mapping import load_class_map, remap_by_name

    ids = ORGANS_CT.labels.name_to_id()
    sessions = []
    spleen_img = nib.load(data / "spleen_ct" / "imagesTr" / "spleen_2.nii.gz")
    spleen_lab = np.rint(np.asarray(nib.load(data / "spleen_ct" / "labelsTr" / "spleen_2.nii.gz").dataobj))
    image = np.asarray(spleen_img.dataobj, dtype=np.float32)
    truth = np.where(spleen_lab == 1, ids["spleen"], 0).astype(np.uint8)
    sessions.append(Session("spleen_ct/spleen_2 spleen", image, spleen_img.affine, truth, {"spleen": ids["spleen"]}))
    ts = data / "totalseg_ct"
    img = nib.load(ts / "example_ct_sm.nii.gz")
    seg = remap_by_name(
        np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj), load_class_map(ts / "class_map.json"), ORGANS_CT.labels
    )
    image = np.asarray(img.dataobj, dtype=np.float32)
    for organ in ("liver", "spleen", "kidney_left", "kidney_right"):
        truth = np.where(seg == ids[organ], ids[organ], 0).astype(np.uint8)
        sessions.append(Session(f"totalseg example_ct_sm {organ}", image, img.affine, truth, {organ: ids[organ]}))
    return sessions


def check_sessions(data: Path) -> list[Session]:
    """The CT check set (``--check``): structures and scans the engine's settings were not chosen on.
    Each structure under an ``organs_ct`` label (the chest crops' pulmonary artery under ``aorta``'s:
    the engine does not depend on the name)."""
    from appcore.dicom.prepare import fill_missing_uids, read_series_folder
    from appcore.dicom.series import load_series
    from radiology.organs_ct import ORGANS_CT
    from research.radiology.label_mapping import load_class_map, remap_by_name

    ids = ORGANS_CT.labels.name_to_id()
    class_map = load_class_map(data / "totalseg_ct" / "class_map.json")
    sessions = []

    def add(name: str, image: np.ndarray, affine: np.ndarray, truth: np.ndarray, organ: str) -> None:
        sessions.append(
            Session(name, image, affine, np.where(truth, ids[organ], 0).astype(np.uint8), {organ: ids[organ]})
        )

    series = fill_missing_uids(read_series_folder(data / "dicom" / "ct_abdomen"), "ct_abdomen")
    volume = load_series(series, str(series[0].SeriesInstanceUID))
    labels = nib.load(data / "dicom" / "ct_abdomen_labels_totalseg.nii.gz")
    # The label file stores the rows in the other order (tests/appcore/dicom/test_dicom.py): on its grid.
    image = np.ascontiguousarray(np.asarray(volume.data, dtype=np.float32)[:, ::-1, :])
    seg = remap_by_name(np.asarray(labels.dataobj), class_map, ORGANS_CT.labels)
    for organ in ("liver", "spleen", "stomach", "aorta", "pancreas"):
        add(f"ct_abdomen {organ}", image, labels.affine, seg == ids[organ], organ)
    ts = data / "totalseg_ct"
    img = nib.load(ts / "example_ct_sm.nii.gz")
    seg = remap_by_name(np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj), class_map, ORGANS_CT.labels)
    image = np.asarray(img.dataobj, dtype=np.float32)
    for organ in ("stomach", "aorta", "gallbladder", "pancreas"):
        add(f"totalseg example_ct_sm {organ}", image, img.affine, seg == ids[organ], organ)
    for folder, structure in (("chest_aorta", "aorta"), ("chest_pulm", "pulmonary_artery")):
        img = nib.load(ts / folder / "ct_cropped.nii.gz")
        truth = np.asarray(nib.load(ts / folder / f"{structure}.nii.gz").dataobj) > 0
        add(f"totalseg {folder} {structure}", np.asarray(img.dataobj, dtype=np.float32), img.affine, truth, "aorta")
    return sessions


def hippocampus_sessions(data: Path, limit: int | None, proposal: Callable[[Path], np.ndarray] | None) -> list[Session]:
    """The hippocampus test split (``research.radiology.splits``), both labels in one session."""
    from radiology.hippocampus import HIPPOCAMPUS
    from research.radiology.splits import msd_cases, split_cases

    cases = split_cases(msd_cases(data / "hippocampus_mr"))["test"][:limit]
    sessions = []
    for case in cases:
        img = nib.load(case.image)
        truth = np.rint(np.asarray(nib.load(case.label).dataobj)).astype(np.uint8)
        sessions.append(
            Session(
                f"hippocampus {case.id}",
                np.asarray(img.dataobj, dtype=np.float32),
                img.affine,
                truth,
                HIPPOCAMPUS.labels.name_to_id(),
                None if proposal is None else proposal(case.image),
            )
        )
    return sessions


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="hippocampus test cases (default: all 40)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/interactive"))
    parser.add_argument("--skip", choices=("ct", "hippocampus"), action="append", default=[])
    parser.add_argument("--check", action="store_true", help="also the CT check set (check_sessions)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(1)
    from radiology.interactive import click_engine
    from radiology.registry import MODELS

    groups: dict[str, list[Session]] = {}
    if "ct" not in args.skip:
        engine = click_engine(MODELS["organs_ct"])
        groups["CT organs (organs_ct untrained)"] = [
            run_session(engine, s, args.clicks) for s in ct_sessions(args.data)
        ]
    if args.check:
        engine = click_engine(MODELS["organs_ct"])
        groups["CT check set (organs_ct untrained; not tuned on)"] = [
            run_session(engine, s, args.clicks) for s in check_sessions(args.data)
        ]
    if "hippocampus" not in args.skip:
        from radiology.interactive import automatic_proposal

        spec = MODELS["hippocampus"]
        engine = click_engine(spec)
        propose = automatic_proposal(spec)
        sessions = hippocampus_sessions(args.data, args.limit, propose)
        groups[f"hippocampus test split ({len(sessions)} cases)"] = [
            run_session(engine, s, args.clicks) for s in sessions
        ]
    report(groups, args.out, args.clicks)


def report(groups: dict[str, list[Session]], out: Path, clicks: int) -> None:
    """Table (markdown, printed and written), per-session JSON and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    shown = [c for c in REPORTED if c <= clicks]
    lines = [
        "| sessions | " + " | ".join(f"Dice @{c}" for c in shown) + " | clicks to 0.90 (median; not reached) "
        "| s per click (median, max) | voxels to paint |",
        "|---|" + "---|" * (len(shown) + 3),
    ]
    records = {}
    for title, sessions in groups.items():
        curves = np.array([s.dice for s in sessions])
        reached = [clicks_to(s.dice) for s in sessions]
        done = [r for r in reached if r is not None]
        seconds = np.concatenate([s.seconds for s in sessions]) if sessions else np.zeros(0)
        voxels = [int((s.truth > 0).sum()) for s in sessions]
        lines.append(
            f"| {title} | "
            + " | ".join(f"{curves[:, c].mean():.3f}" for c in shown)
            + f" | {np.median(done) if done else '-'}; {len(reached) - len(done)} of {len(reached)} |"
            + f" {np.median(seconds):.2f}, {seconds.max():.2f} | {int(np.mean(voxels))} (mean) |"
        )
        for s in sessions:
            records[s.name] = {"dice": s.dice, "seconds": s.seconds, "voxels": int((s.truth > 0).sum())}
            if len(sessions) <= 12:
                lines.append(
                    f"| &nbsp; {s.name} | "
                    + " | ".join(f"{s.dice[c]:.3f}" for c in shown)
                    + f" | {clicks_to(s.dice) if clicks_to(s.dice) is not None else '-'} |"
                    + f" {np.median(s.seconds):.2f}, {max(s.seconds):.2f} | {records[s.name]['voxels']} |"
                )
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "sessions.json").write_text(json.dumps(records, indent=1))
    plot(groups, out / "dice_vs_clicks.png")


def plot(groups: dict[str, list[Session]], path: Path) -> None:
    """Mean Dice against clicks per group (skipped, and said, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for title, sessions in groups.items():
        curves = np.array([s.dice for s in sessions])
        ax.plot(range(curves.shape[1]), curves.mean(0), marker="o", label=title)
        if len(sessions) <= 12:
            for s in sessions:
                ax.plot(range(len(s.dice)), s.dice, color="grey", alpha=0.3, linewidth=0.8)
    ax.axhline(TARGET, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("clicks")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
