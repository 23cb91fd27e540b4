"""Simulated active learning on real labelled data: how many labels does each strategy need?

    python -m benchmarks.active_learning --pool DIR --test DIR --strategy random,epistemic,bald \\
        --initial 4 --per-round 4 --rounds 6 --seed 0,1,2 --out benchmarks/results/active_learning

Each (strategy, seed) run starts from the same ``--initial`` randomly drawn labelled cases of the
pool and the same model trained on them (one per seed). Each round the strategy picks
``--per-round`` unlabelled cases with the project's own selection code and scoring pass
(``strategies.selection``, ``radiology.uncertainty``), their true labels are revealed, the model
is fine-tuned for ``--steps-per-round`` steps on everything labelled so far, and Dice on the test
folder is recorded. ``full_pool`` is the reference: a model trained from scratch on the whole pool
for the same total number of steps. The summary says, per strategy, the labelled cases needed to
reach 95% of the reference's Dice, against random's number.

Runs are written one file each under ``OUT/runs/`` and skipped when present, so an interrupted
benchmark resumes; ``--plot-only`` rebuilds ``curves.csv``, ``summary.md`` and ``learning_curves.png``.
``--strategy oracle`` is a diagnostic, not a strategy the server offers: it knows the pool's labels
and picks the cases the current model segments worst (highest 1 - Dice), what a perfect
uncertainty measure would rank first. Where it saves no more labels than the real strategies, better
uncertainty estimates could not save more either.

``DIR`` is an MSD-layout folder (``imagesTr/`` and ``labelsTr/``, or ``dataset.json``); make the
fixed pool/test split of a dataset with ``python -m benchmarks.al_split``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose
from monai.utils import set_determinism

from appcore.precision import training_autocast
from radiology import recipe
from radiology.registry import MODELS
from radiology.spec import ModelSpec
from radiology.transforms import augment, class_index, preprocess
from radiology.uncertainty import MCDropoutScorer
from research.radiology.offline import validate
from research.radiology.splits import Case, msd_cases
from strategies.selection import RANKED_STRATEGIES, diverse_top_k, top_k

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "epistemic", "bald", "tta", "diversity")
# Picks that read the true labels of the pool (what no server can do): bounds, not strategies.
DIAGNOSTICS = ("oracle",)
REFERENCE = "full_pool"
APPS = ("radiology", "pathology")
# Which measure ranks for each strategy: the server's own table (None there is the stored ranking
# value, the predictive entropy, which also weighs the diversity strategy's picks).
MEASURE = {name: key or "entropy" for name, (key, _) in RANKED_STRATEGIES.items()}
MEASURE["diversity"] = "entropy"
MEASURE["oracle"] = "error"
TARGET_FRACTION = 0.95
# How a metric is named in tables and plots.
NAMES = {"dice": "Dice", "aji": "AJI"}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What one simulated run does; stored with every run so results say how they were made."""

    model: str
    channels: tuple[int, ...]
    initial: int
    per_round: int
    rounds: int
    initial_steps: int
    steps_per_round: int
    batch_size: int
    lr: float
    mc_samples: int
    tta_samples: int
    cpu_bf16: bool = True  # training and scoring in bfloat16 on a CPU with native units
    effort: bool = False  # also measure the labelling effort of every case as it is labelled
    crop: int = 0  # pathology: training crop size (radiology: 0, the model's ROI)

    def spec(self) -> ModelSpec:
        # One network trained from scratch per run, whatever the served model holds.
        return dataclasses.replace(MODELS[self.model], channels=self.channels, members=1)


class Data:
    """Pre-processed pool and test volumes, loaded once and kept in memory."""

    def __init__(self, spec: ModelSpec, pool: list[Case], test: list[Case]) -> None:
        load = Compose(preprocess(spec, with_label=True))
        self.pool = {c.id: load({"image": str(c.image), "label": str(c.label)}) for c in pool}
        self.test = [load({"image": str(c.image), "label": str(c.label)}) for c in test]
        self.augment = Compose(augment(spec))

    def batch(self, ids: Sequence[str], size: int, rng: random.Random) -> dict[str, torch.Tensor]:
        items = []
        for case in rng.choices(list(ids), k=size):
            out = self.augment(dict(self.pool[case]))
            items.append(out[0] if isinstance(out, list) else out)
        return {k: torch.stack([torch.as_tensor(i[k]) for i in items]) for k in ("image", "label")}


class Learner:
    """The model, its optimiser and the training steps of one run."""

    def __init__(self, spec: ModelSpec, lr: float, device: torch.device, cpu_bf16: bool) -> None:
        self.spec, self.device, self.cpu_bf16 = spec, device, cpu_bf16
        self.network = spec.network().to(device)
        self.optimizer = recipe.optimizer(self.network.parameters(), lr)
        self.loss = recipe.loss()

    def state(self) -> dict:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])

    def train(self, data: Data, ids: Sequence[str], steps: int, batch_size: int, rng: random.Random) -> float:
        start = time.perf_counter()
        self.network.train()
        for _ in range(steps):
            batch = data.batch(ids, batch_size, rng)
            self.optimizer.zero_grad(set_to_none=True)
            with training_autocast(self.device, cpu_bf16=self.cpu_bf16):
                loss = self.loss(self.network(batch["image"].to(self.device)), batch["label"].to(self.device))
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - start

    def dice(self, data: Data) -> dict[str, float]:
        per_class = validate(self.spec, self.network, data.test, self.device)
        names = {lab.id: lab.name for lab in self.spec.labels}
        return {names[c]: d for c, d in per_class.items()}


def choose(
    strategy: str,
    unlabelled: list[str],
    labelled: list[str],
    measures: dict[str, dict],
    k: int,
    rng: random.Random,
) -> list[str]:
    """The server's selection functions, applied to this round's measures."""
    if strategy == "random":
        return top_k(unlabelled, {}, k, rng)
    scores = {i: m[MEASURE[strategy]] for i, m in measures.items() if MEASURE[strategy] in m}
    if strategy == "diversity":
        embeddings = {i: m["embedding"] for i, m in measures.items() if "embedding" in m}
        return diverse_top_k(unlabelled, scores, embeddings, k, rng, covered=labelled)
    return top_k(unlabelled, scores, k, rng)


class RadiologyTask:
    """The simulation's view of the radiology app: a ``Learner`` on ``Data`` scored by the server's
    ``MCDropoutScorer``; what the shared loop (``run_strategy``) asks of every app."""

    metric = "dice"

    def __init__(self, schedule: Schedule, data: Data, device: torch.device) -> None:
        self.schedule, self.data, self.device = schedule, data, device
        self.spec = schedule.spec()
        self.learner = Learner(self.spec, schedule.lr, device, schedule.cpu_bf16)
        self.trained = False
        self._scorer = MCDropoutScorer(
            self.spec,
            [],
            samples=schedule.mc_samples,
            tta_samples=schedule.tta_samples,
            device=str(device),
            cpu_bf16=schedule.cpu_bf16,
        )

    @property
    def pool(self) -> list[str]:
        return sorted(self.data.pool)

    def start(self, seed: int) -> None:
        """The fixed start of a run: a network trained from scratch (no shipped weights here)."""
        set_determinism(seed)
        self.learner = Learner(self.spec, self.schedule.lr, self.device, self.schedule.cpu_bf16)
        self.trained = False

    def state(self) -> dict:
        return self.learner.state()

    def load(self, state: dict) -> None:
        self.learner.load(state)
        self.trained = True

    def train(self, ids: Sequence[str], steps: int, rng: random.Random) -> float:
        self.trained = True
        return self.learner.train(self.data, ids, steps, self.schedule.batch_size, rng)

    def evaluate(self) -> dict[str, float]:
        dice = self.learner.dice(self.data)
        return {"dice": float(np.mean(list(dice.values()))), **{f"dice_{k}": v for k, v in dice.items()}}

    def measures(self, case: str, strategy: str) -> dict:
        self._scorer.use_network(self.learner.network)
        return self._scorer.score_tensor(self.data.pool[case]["image"])

    def error(self, case: str) -> float:
        dice = validate(self.spec, self.learner.network, [self.data.pool[case]], self.device)
        return 1.0 - float(np.mean(list(dice.values())))

    def effort(self, case: str) -> dict[str, float]:
        """Correcting the current model's label of ``case`` against drawing it from scratch: voxels
        whose class is wrong, and axial slices with any such voxel (an untrained model's label is
        no help: the case is drawn from scratch)."""
        truth = self.data.pool[case]["label"][0].cpu().numpy().round().astype(np.int64)
        if self.trained:
            pred = predict_label(self.spec, self.learner.network, self.data.pool[case]["image"], self.device)
        else:
            pred = np.zeros_like(truth)
        return volume_effort(pred, truth)


def predict_label(spec: ModelSpec, network: torch.nn.Module, image: torch.Tensor, device: torch.device) -> np.ndarray:
    """The network's class per voxel of a pre-processed image, as ``radiology.offline.validate`` infers it."""
    network.eval()
    with torch.inference_mode():
        logits = sliding_window_inference(
            image[None].to(device), spec.roi_size, 4, network, overlap=0.25, mode="gaussian"
        )
    return class_index(logits, 1)[0, 0].cpu().numpy().astype(np.int64)


def volume_effort(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Voxels and axial slices (last axis) to correct in ``pred`` to reach ``truth``, and the voxels and
    slices drawn when labelling from scratch (every labelled voxel, every slice with one)."""
    wrong = pred != truth
    return {
        "voxels": int(wrong.sum()),
        "slices": int(wrong.any(axis=(0, 1)).sum()),
        "scratch_voxels": int((truth > 0).sum()),
        "scratch_slices": int((truth > 0).any(axis=(0, 1)).sum()),
    }


def initial_state(out: Path, schedule: Schedule, task, seed: int) -> tuple[list, dict]:
    """The seed's first labelled cases and the model trained on them (cached under ``out``)."""
    path = out / "runs" / f"initial_seed{seed}.pt"
    initial = sorted(random.Random(seed).sample(task.pool, schedule.initial))
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["initial"] == initial and saved["schedule"] == dataclasses.asdict(schedule):
            return initial, saved["state"]
    task.start(seed)
    seconds = task.train(initial, schedule.initial_steps, random.Random(seed))
    logger.info("seed %d: initial model on %d cases in %.0f s", seed, len(initial), seconds)
    state = task.state()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"initial": initial, "schedule": dataclasses.asdict(schedule), "state": state}, path)
    return initial, state


def run_strategy(
    strategy: str, schedule: Schedule, task, seed: int, initial: list[str], state: dict
) -> tuple[list[dict], list[dict]]:
    """One simulated labelling campaign, the same for every app (``task``): a row per round (round 0
    is the initial model) and the labelling effort of every case, each measured on the model the
    annotator would have corrected (the start model for the initial cases, the model of the round
    before for a picked one)."""
    efforts = []
    if schedule.effort:
        task.start(seed)
        efforts = [{"strategy": strategy, "seed": seed, "round": 0, "case": c, **task.effort(c)} for c in initial]
    set_determinism(seed + 1000)
    task.load(state)
    rng = random.Random(f"{strategy}-{seed}")
    labelled = list(initial)
    measures: dict[str, dict] = {}  # kept across rounds, like the server's score store
    rows = []
    for rnd in range(schedule.rounds + 1):
        picked, train_s, score_s = [], 0.0, 0.0
        if rnd > 0:
            unlabelled = sorted(set(task.pool) - set(labelled))
            start = time.perf_counter()
            if strategy == "oracle":  # the current model's true error on each case
                for case in unlabelled:
                    measures[case] = {"error": task.error(case)}
            elif strategy != "random":
                for case in unlabelled:
                    measures[case] = task.measures(case, strategy)
            score_s = time.perf_counter() - start
            picked = choose(strategy, unlabelled, labelled, measures, schedule.per_round, rng)
            if schedule.effort:
                efforts += [
                    {"strategy": strategy, "seed": seed, "round": rnd, "case": c, **task.effort(c)} for c in picked
                ]
            labelled += picked
            train_s = task.train(labelled, schedule.steps_per_round, rng)
        metrics = task.evaluate()
        rows.append(row(strategy, seed, rnd, len(labelled), metrics, train_s, score_s, picked))
        logger.info(
            "%s seed %d round %d: %d labelled, %s %.4f",
            *(strategy, seed, rnd, len(labelled), task.metric, rows[-1][task.metric]),
        )
    return rows, efforts


def run_reference(schedule: Schedule, task, seed: int) -> list[dict]:
    """A model trained from the run's fixed start on the whole pool for the same total steps as a campaign."""
    task.start(seed)
    steps = schedule.initial_steps + schedule.rounds * schedule.steps_per_round
    seconds = task.train(task.pool, steps, random.Random(seed))
    return [row(REFERENCE, seed, schedule.rounds, len(task.pool), task.evaluate(), seconds, 0.0, [])]


def row(strategy, seed, rnd, n, metrics: dict[str, float], train_s, score_s, picked) -> dict:
    return {
        "strategy": strategy,
        "seed": seed,
        "round": rnd,
        "labelled": n,
        **{k: round(float(v), 4) for k, v in metrics.items()},
        "train_s": round(train_s, 1),
        "score_s": round(score_s, 1),
        "picked": ";".join(picked),
    }


# -- results -----------------------------------------------------------------------------------


def read_runs(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "runs").glob("*.json")):
        rows += json.loads(path.read_text())["rows"]
    return rows


def labels_needed(curve: dict[int, float], target: float) -> int | None:
    """The fewest labelled cases at which ``curve`` (labelled -> Dice) reaches ``target``."""
    reached = [n for n, d in sorted(curve.items()) if d >= target]
    return reached[0] if reached else None


def labels_interpolated(curve: dict[int, float], target: float) -> float | None:
    """Where ``curve`` first crosses ``target``, read between its two measured points by a straight line.

    ``labels_needed`` can only answer a measured count (a multiple of the round size); this says how
    far between two rounds the crossing lies. A curve already at ``target`` on its first point gives
    that point (nothing was measured before it); one that never reaches it gives None.
    """
    points = sorted(curve.items())
    for i, (n, d) in enumerate(points):
        if d >= target:
            if i == 0:
                return float(n)
            n0, d0 = points[i - 1]
            return n0 + (target - d0) / (d - d0) * (n - n0)
    return None


def summarise(rows: list[dict], metric: str = "dice") -> tuple[str, dict]:
    """A markdown table: per strategy, the mean ``metric`` by labelled count and the labels needed
    to reach 95% of the whole-pool reference's."""
    ref = [r[metric] for r in rows if r["strategy"] == REFERENCE]
    if not ref:
        return "No reference run yet.\n", {}
    reference = float(np.mean(ref))
    target = TARGET_FRACTION * reference
    curves: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["strategy"] != REFERENCE:
            curves.setdefault(r["strategy"], {}).setdefault(int(r["labelled"]), []).append(float(r[metric]))
    seeds = {s: len({r["seed"] for r in rows if r["strategy"] == s}) for s in curves}
    counts = sorted({n for c in curves.values() for n in c})
    means = {s: {n: float(np.mean(v)) for n, v in c.items()} for s, c in curves.items()}
    needed = {s: labels_needed(m, target) for s, m in means.items()}
    between = {s: labels_interpolated(m, target) for s, m in means.items()}
    per_seed = {}
    for s in curves:
        found = []
        for seed in sorted({r["seed"] for r in rows if r["strategy"] == s}):
            curve = {int(r["labelled"]): float(r[metric]) for r in rows if r["strategy"] == s and r["seed"] == seed}
            found.append(labels_needed(curve, target))
        per_seed[s] = found
    lines = [
        f"Reference (`{REFERENCE}`, {len(ref)} seeds, whole pool): mean {NAMES.get(metric, metric)} {reference:.4f}; "
        f"target {TARGET_FRACTION:.0%} of it = {target:.4f}.",
        "",
        "| strategy | seeds | " + " | ".join(f"{n} labelled" for n in counts) + " | labels to target (mean curve) "
        "| per seed | vs random | between rounds (mean curve, linear) | vs random, between rounds |",
        "|---|---|" + "---|" * len(counts) + "---|---|---|---|---|",
    ]
    random_needed, random_between = needed.get("random"), between.get("random")
    for s in sorted(curves, key=lambda s: (s != "random", s)):
        cells = []
        for n in counts:
            v = curves[s].get(n)
            cells.append(f"{np.mean(v):.4f} ± {np.std(v):.4f}" if v else "")
        got = needed[s]
        ratio = f"{got / random_needed:.2f}x" if got and random_needed else "n/a"
        seed_cells = ", ".join(str(x) if x else f">{max(counts)}" for x in per_seed[s])
        near = between[s]
        near_cell = f"{near:.1f}" if near is not None else f">{max(counts)}"
        near_ratio = f"{near / random_between:.2f}x" if near is not None and random_between else "n/a"
        lines.append(
            f"| {s} | {seeds[s]} | "
            + " | ".join(cells)
            + f" | {got or f'>{max(counts)}'} | {seed_cells} | {ratio} | {near_cell} | {near_ratio} |"
        )
    info = {"reference": reference, "target": target, "needed": needed, "between": between}
    return "\n".join(lines) + "\n", info


def plot(rows: list[dict], path: Path, target: float | None, metric: str = "dice") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = NAMES.get(metric, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for s in [s for s in STRATEGIES + DIAGNOSTICS if any(r["strategy"] == s for r in rows)]:
        by_n: dict[int, list[float]] = {}
        for r in rows:
            if r["strategy"] == s:
                by_n.setdefault(int(r["labelled"]), []).append(float(r[metric]))
        ns = sorted(by_n)
        mean = np.array([np.mean(by_n[n]) for n in ns])
        ax.plot(ns, mean, marker="o", ms=3, label=f"{s} ({len(by_n[ns[0]])} seeds)")
        ax.fill_between(ns, [min(by_n[n]) for n in ns], [max(by_n[n]) for n in ns], alpha=0.15)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"{TARGET_FRACTION:.0%} of whole-pool {name}")
    ax.set_xlabel("labelled cases")
    ax.set_ylabel(f"mean {name} on the test folder")
    ax.set_title("Simulated active learning (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_efforts(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "runs").glob("*.json")):
        rows += json.loads(path.read_text()).get("effort", [])
    return rows


def summarise_effort(rows: list[dict]) -> str:
    """Per strategy, the correction work of labelling the whole pool in its order (summed over the
    pool, mean over seeds) against drawing every case from scratch, and against random's order.

    Every measure ``m`` with a ``scratch_m`` beside it is one column: the total, and the share of
    the from-scratch work it saves. Per case the work is the smaller of correcting the model's
    label and drawing from scratch (an annotator clears a label that is worse than none).
    """
    if not rows:
        return "No effort measured.\n"
    keys = [k for k in rows[0] if f"scratch_{k}" in rows[0]]
    totals: dict[str, dict[str, list[float]]] = {}
    for s in sorted({r["strategy"] for r in rows}, key=lambda s: (s != "random", s)):
        for seed in sorted({r["seed"] for r in rows if r["strategy"] == s}):
            mine = [r for r in rows if r["strategy"] == s and r["seed"] == seed]
            for k in keys:
                work = sum(min(r[k], r[f"scratch_{k}"]) for r in mine)
                totals.setdefault(s, {}).setdefault(k, []).append(float(work))
                totals[s].setdefault(f"scratch_{k}", []).append(float(sum(r[f"scratch_{k}"] for r in mine)))
            totals[s].setdefault("cases", []).append(float(len(mine)))
    lines = [
        "| strategy | seeds | cases | "
        + " | ".join(f"{k}: to correct (from scratch) | {k}: saved by the loop | {k} vs random" for k in keys)
        + " |",
        "|---|---|---|" + "---|---|---|" * len(keys),
    ]
    for s, t in totals.items():
        cells = []
        for k in keys:
            mean, scratch = float(np.mean(t[k])), float(np.mean(t[f"scratch_{k}"]))
            saved = 1.0 - mean / scratch if scratch else 0.0
            rnd = totals.get("random", {}).get(k)
            vs = f"{mean / float(np.mean(rnd)):.2f}x" if rnd and np.mean(rnd) else "n/a"
            spread = f" ± {np.std(t[k]):,.0f}" if len(t[k]) > 1 else ""
            cells.append(f"{mean:,.0f}{spread} ({scratch:,.0f}) | {saved:.1%} | {vs}")
        lines.append(f"| {s} | {len(t[keys[0]])} | {np.mean(t['cases']):.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_effort(rows: list[dict], path: Path) -> None:
    """Cumulative correction work (the first measure with a from-scratch count) against images
    labelled, per strategy (mean over seeds), and the work of drawing the whole pool from scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(k for k in rows[0] if f"scratch_{k}" in rows[0])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    scratch_curve = None
    for s in [s for s in STRATEGIES + DIAGNOSTICS if any(r["strategy"] == s for r in rows)]:
        curves, scratch = [], []
        for seed in sorted({r["seed"] for r in rows if r["strategy"] == s}):
            mine = [r for r in rows if r["strategy"] == s and r["seed"] == seed]
            curves.append(np.cumsum([min(r[key], r[f"scratch_{key}"]) for r in mine]))
            scratch.append(np.cumsum([r[f"scratch_{key}"] for r in mine]))
        n = min(len(c) for c in curves)
        ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], axis=0), label=f"{s} ({len(curves)} seeds)")
        scratch_curve = np.mean([c[:n] for c in scratch], axis=0)
    if scratch_curve is not None:  # the whole pool drawn from scratch, whatever the order
        ax.axhline(scratch_curve[-1], color="k", ls="--", lw=1, label="the whole pool from scratch")
    ax.set_xlabel("images labelled, in the strategy's order")
    ax.set_ylabel(f"cumulative {key} to correct")
    ax.set_title("Labelling effort with the model retrained every round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(out: Path, metrics: Sequence[str] = ("dice",)) -> str:
    """``curves.csv``, ``summary.md`` (one table per metric, the effort table when measured) and a plot
    per metric (``learning_curves.png`` for the first, ``learning_curves_<metric>.png`` for others)."""
    rows = read_runs(out)
    if not rows:
        raise SystemExit(f"No runs under {out / 'runs'} yet")
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "strategy", k != "seed", k))
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    parts = []
    for i, metric in enumerate(metrics):
        table, info = summarise(rows, metric)
        parts.append(table if len(metrics) == 1 else f"### {NAMES.get(metric, metric)}\n\n{table}")
        name = "learning_curves.png" if i == 0 else f"learning_curves_{metric}.png"
        plot(rows, out / name, info.get("target"), metric)
    efforts = read_efforts(out)
    if efforts:
        fields = list(efforts[0])
        with open(out / "effort.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(efforts)
        parts.append(f"### Labelling effort (whole pool)\n\n{summarise_effort(efforts)}")
        plot_effort(efforts, out / "effort.png")
    text = "\n".join(parts)
    (out / "summary.md").write_text(text)
    return text


def _csv_list(text: str, cast=str) -> list:
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=APPS, default="radiology", help="which app's model, data and measures")
    parser.add_argument(
        "--pool",
        type=Path,
        help="radiology: MSD-layout folder of labelled cases to pick from; pathology: the images/ + masks/ "
        "folder the --split file's ids name",
    )
    parser.add_argument("--test", type=Path, help="radiology: MSD-layout folder of cases to measure Dice on")
    parser.add_argument(
        "--split", type=Path, help="pathology: the pool/test split file (benchmarks.al_split --app pathology)"
    )
    parser.add_argument(
        "--strategy",
        default=",".join(STRATEGIES),
        help=f"comma list of {', '.join(STRATEGIES)}, or the diagnostic {', '.join(DIAGNOSTICS)}",
    )
    parser.add_argument("--initial", type=int, default=4, help="labelled cases at the start")
    parser.add_argument("--per-round", type=int, default=4, help="cases the strategy picks per round")
    parser.add_argument("--rounds", default="6", help="rounds, or 'all': as many as label the whole pool")
    parser.add_argument("--seed", default="0,1,2", help="comma list of seeds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/active_learning"))
    parser.add_argument("--model", default=None, help="radiology model (default hippocampus)")
    parser.add_argument("--channels", help="radiology: UNet channels for the simulation (default: the model's)")
    parser.add_argument("--initial-steps", type=int, default=150)
    parser.add_argument("--steps-per-round", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, help="learning rate (default: the model's; pathology 1e-3)")
    parser.add_argument("--crop", type=int, default=0, help="pathology: training crop size (default: the model's)")
    parser.add_argument("--mc-samples", type=int, default=8)
    parser.add_argument("--tta-samples", type=int, default=4)
    parser.add_argument(
        "--effort",
        action="store_true",
        help="also count the correction work of every case as it is labelled (with --rounds all: the whole pool)",
    )
    parser.add_argument(
        "--float32",
        action="store_true",
        help="train and score in float32 on the CPU even where bfloat16 is native (as the runs recorded "
        "before 2026-11-27 08:00 did)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the whole-pool reference runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true", help="only rebuild csv, summary and plot from runs/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = ("aji", "dice") if args.app == "pathology" else ("dice",)
    if args.plot_only:
        print(write_results(args.out, metrics))
        return
    strategies = _csv_list(args.strategy)
    unknown = sorted(set(strategies) - set(STRATEGIES + DIAGNOSTICS))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES + DIAGNOSTICS)}")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    if args.app == "pathology":
        if not (args.pool and args.split):
            parser.error("--app pathology needs --pool (the images/ + masks/ folder) and --split (unless --plot-only)")
        from benchmarks.al_pathology import PathologyTask, load_split
        from pathology.spec import NUCLEI

        pool, test = load_split(args.pool, args.split)
        model, channels, lr, crop = "nuclei", NUCLEI.channels, args.lr or 1e-3, args.crop or NUCLEI.patch
    else:
        if not (args.pool and args.test):
            parser.error("--pool and --test are required (unless --plot-only)")
        model = args.model or "hippocampus"
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        spec = MODELS[model]
        pool, test = msd_cases(args.pool), msd_cases(args.test)
        overlap = {c.id for c in pool} & {c.id for c in test}
        if overlap:
            raise SystemExit(
                f"--pool and --test share cases {sorted(overlap)[:5]}...: the test folder must be held out"
            )
        channels = tuple(_csv_list(args.channels, int)) if args.channels else spec.channels
        lr, crop = args.lr or spec.learning_rate, 0
    rounds = -(-(len(pool) - args.initial) // args.per_round) if args.rounds == "all" else int(args.rounds)
    schedule = Schedule(
        model=model,
        channels=channels,
        initial=args.initial,
        per_round=args.per_round,
        rounds=rounds,
        initial_steps=args.initial_steps,
        steps_per_round=args.steps_per_round,
        batch_size=args.batch_size,
        lr=lr,
        mc_samples=args.mc_samples,
        tta_samples=args.tta_samples,
        cpu_bf16=not args.float32,
        effort=args.effort,
        crop=crop,
    )
    need = schedule.initial + schedule.per_round * schedule.rounds
    if need > len(pool) and args.rounds != "all":
        raise SystemExit(f"the schedule labels {need} cases but the pool has {len(pool)}")
    if args.app == "pathology":
        task = PathologyTask(
            pool, test, lr=lr, batch_size=schedule.batch_size, crop=crop, mc_passes=schedule.mc_samples
        )
        where = {"pool": str(args.pool), "split": str(args.split)}
    else:
        task = RadiologyTask(schedule, Data(schedule.spec(), pool, test), device)
        where = {"pool": str(args.pool), "test": str(args.test)}
    logger.info("loaded %d pool and %d test cases in %.0f s", len(pool), len(test), time.perf_counter() - start)
    # As it reads back from JSON (tuples become lists), so a finished run is recognised and skipped.
    meta = json.loads(json.dumps({"schedule": dataclasses.asdict(schedule), **where}))
    for seed in _csv_list(args.seed, int):
        jobs = ([] if args.no_reference else [REFERENCE]) + strategies
        for name in jobs:
            path = args.out / "runs" / f"{name}_seed{seed}.json"
            if path.exists() and json.loads(path.read_text())["meta"] == meta:
                continue
            began = time.perf_counter()
            efforts: list[dict] = []
            if name == REFERENCE:
                rows = run_reference(schedule, task, seed)
            else:
                initial, state = initial_state(args.out, schedule, task, seed)
                rows, efforts = run_strategy(name, schedule, task, seed, initial, state)
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"meta": meta, "seconds": round(time.perf_counter() - began, 1), "rows": rows}
            if efforts:
                payload["effort"] = efforts
            path.write_text(json.dumps(payload, indent=1))
            print(write_results(args.out, metrics), flush=True)


if __name__ == "__main__":
    main()
