"""The pathology app in the active-learning simulation (``benchmarks.active_learning --app pathology``).

Cases are nuclei tiles of an ``images/`` + ``masks/`` folder (``nuclei_dsb2018``, ``nuclei_cpm15``),
each cut to its central ``CROP`` x ``CROP`` pixels so that every case costs the same to score and to
evaluate. Every run starts from the same fixed weights (the shipped ``nuclei`` network, trained on
H&E tiles only) and fine-tunes them; the measures are the server's own (``pathology.activelearning``:
foreground entropy with the bottleneck embedding, BALD under injected dropout, flip disagreement),
on the one probe window a crop is.

The fixed pool/test split is a JSON file ``{"pool": [ids], "test": [ids], ...}`` written by
``python -m benchmarks.al_split --app pathology`` (``make_split`` here); any file of that form
(another split of the same folder) can replace it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pathology.activelearning import MC_DROPOUT, box_measures, scoring_copy
from pathology.data import read_instances, read_rgb
from pathology.predict import predict_instances
from pathology.spec import NUCLEI, NucleiSpec
from pathology.training import Example, train_steps
from pathology.weights import load_network
from pathology.wsi import ArraySource
from research.pathology.metrics import aji, correction_effort, dice

# Side of the central crop that stands for each image.
CROP = 256
# Which server measure ranks for each strategy (the diversity strategy weighs entropy by distance).
MEASURE = {"epistemic": "entropy", "diversity": "entropy", "bald": "bald", "tta": "tta"}


def centre_crop(array: np.ndarray, size: int = CROP) -> np.ndarray:
    """The central ``size`` x ``size`` pixels (the whole array along a side shorter than ``size``)."""
    h, w = array.shape[:2]
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return array[y : y + size, x : x + size]


def make_split(source: Path, out: Path, *, pool_size: int, test_size: int, seed: int) -> dict[str, int]:
    """A seeded draw of ``pool_size`` + ``test_size`` images of ``source`` whose central crop holds at
    least one nucleus, written to ``out`` (JSON) with how it was made."""
    ids = sorted(p.stem for p in (source / "images").glob("*.png"))
    if not ids:
        raise SystemExit(f"No PNG tiles in {source / 'images'}")
    rng = random.Random(seed)
    order = rng.sample(ids, len(ids))
    chosen: list[str] = []
    for image in order:
        if len(chosen) == pool_size + test_size:
            break
        if centre_crop(read_instances(source / "masks" / f"{image}.png")).any():
            chosen.append(image)
    if len(chosen) < pool_size + test_size:
        raise SystemExit(f"{source} has {len(chosen)} usable images, fewer than {pool_size} + {test_size}")
    split = {
        "source": source.name,
        "rule": f"random.Random({seed}) order of the sorted ids; images whose central {CROP}x{CROP} crop "
        f"holds no nucleus skipped; first {test_size} test, next {pool_size} pool",
        "test": sorted(chosen[:test_size]),
        "pool": sorted(chosen[test_size:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(split, indent=1))
    return {"pool": pool_size, "test": test_size}


@dataclasses.dataclass(frozen=True)
class Crop:
    rgb: np.ndarray
    mask: np.ndarray


def load_split(source: Path, split_file: Path) -> tuple[dict[str, Crop], dict[str, Crop]]:
    split = json.loads(split_file.read_text())
    overlap = set(split["pool"]) & set(split["test"])
    if overlap:
        raise SystemExit(
            f"{split_file}: pool and test share images {sorted(overlap)[:5]}...: the test must be held out"
        )

    def load(ids: Sequence[str]) -> dict[str, Crop]:
        return {
            i: Crop(
                centre_crop(read_rgb(source / "images" / f"{i}.png")),
                centre_crop(read_instances(source / "masks" / f"{i}.png")),
            )
            for i in ids
        }

    return load(split["pool"]), load(split["test"])


class PathologyTask:
    """The simulation's view of the pathology app (see ``benchmarks.active_learning.RadiologyTask``).

    Args:
        pool: the cases the strategies pick from, by id.
        test: the fixed test cases.
        lr: peak learning rate of each fine-tuning call (warm-up, then cosine to zero).
        batch_size: crops per training step.
        crop: training crop size (a multiple of the network's divisor).
        mc_passes: Monte Carlo dropout passes behind ``bald``.
        start_weights: the fixed start of every run.
    """

    metric = "aji"

    def __init__(
        self,
        pool: dict[str, Crop],
        test: dict[str, Crop],
        *,
        lr: float,
        batch_size: int,
        crop: int,
        mc_passes: int,
        start_weights: Path = NUCLEI.shipped_weights_path,
    ) -> None:
        self.data, self.test = pool, test
        self.spec: NucleiSpec = dataclasses.replace(NUCLEI, patch=crop)
        self.lr, self.batch_size, self.mc_passes = lr, batch_size, mc_passes
        self.start_weights = start_weights
        self.examples = {i: Example.of(c.rgb, c.mask) for i, c in pool.items()}
        self.network = load_network(NUCLEI, start_weights)
        self._copies: dict[str, torch.nn.Module] = {}

    @property
    def pool(self) -> list[str]:
        return sorted(self.data)

    def start(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.network = load_network(NUCLEI, self.start_weights)
        self._copies = {}

    def state(self) -> dict:
        return copy.deepcopy(self.network.state_dict())

    def load(self, state: dict) -> None:
        self.network.load_state_dict(state)
        self._copies = {}

    def train(self, ids: Sequence[str], steps: int, rng: random.Random) -> float:
        start = time.perf_counter()
        train_steps(
            self.network,
            self.spec,
            [self.examples[i] for i in ids],
            steps=steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=rng.randrange(2**31),
            log_every=max(steps, 1),
        )
        self._copies = {}
        return time.perf_counter() - start

    def _predict(self, crop: Crop) -> np.ndarray:
        return predict_instances(self.network, NUCLEI, crop.rgb)

    def evaluate(self) -> dict[str, float]:
        preds = {i: self._predict(c) for i, c in self.test.items()}
        return {
            "aji": float(np.mean([aji(preds[i], c.mask) for i, c in self.test.items()])),
            "dice": float(np.mean([dice(preds[i], c.mask) for i, c in self.test.items()])),
        }

    def measures(self, case: str, strategy: str) -> dict:
        measure = MEASURE[strategy]
        if measure not in self._copies:  # one private copy per measure and weights, as the server keeps
            self._copies[measure] = scoring_copy(self.network, dropout=MC_DROPOUT if measure == "bald" else None)
        rgb = self.data[case].rgb
        out = box_measures(
            ArraySource(rgb),
            (0, 0, rgb.shape[1], rgb.shape[0]),
            {measure: self._copies[measure]},
            NUCLEI,
            passes=self.mc_passes,
        )
        return {k: (np.asarray(v).tolist() if k == "embedding" else float(v)) for k, v in out.items()}

    def error(self, case: str) -> float:
        crop = self.data[case]
        return 1.0 - aji(self._predict(crop), crop.mask)

    def effort(self, case: str) -> dict[str, float]:
        crop = self.data[case]
        return correction_effort(self._predict(crop), crop.mask)
