"""The offline training recipe: mirroring only where labels allow it, the deadline, and server-free imports."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from monai.transforms import RandFlipd

from radiology.registry import MODELS
from radiology.transforms import augment
from research.radiology.offline import train
from tests.conftest import ROOT, phantom_cases


@pytest.mark.parametrize(
    ("flip_axes", "ok"),
    [((), True), ((0,), True), ((0, 2), True), ((3,), False), ((0, 0), False), ((-1,), False)],
)
def test_flip_axes_are_checked(flip_axes: tuple[int, ...], ok: bool) -> None:
    spec = MODELS["hippocampus"]
    if ok:
        assert dataclasses.replace(spec, flip_axes=flip_axes).flip_axes == flip_axes
    else:
        with pytest.raises(ValueError, match="flip_axes"):
            dataclasses.replace(spec, flip_axes=flip_axes)


@pytest.mark.parametrize("flip_axes", [(), (0,), (0, 2)])
def test_augment_mirrors_only_along_the_spec_axes(flip_axes: tuple[int, ...]) -> None:
    spec = dataclasses.replace(MODELS["hippocampus"], flip_axes=flip_axes)
    flips = [t for t in augment(spec) if isinstance(t, RandFlipd)]
    assert [f.flipper.spatial_axis for f in flips] == list(flip_axes)


@pytest.mark.parametrize(
    ("model", "forbidden", "why"),
    [
        ("organs_ct", 0, "left and right kidney swap under a left-right mirror"),
        ("hippocampus", 1, "anterior and posterior swap under an anterior-posterior mirror"),
    ],
)
def test_registered_models_never_mirror_a_side_dependent_axis(model: str, forbidden: int, why: str) -> None:
    assert forbidden not in MODELS[model].flip_axes, why


def test_deadline_stops_after_the_epoch_with_a_validation_and_weights(tmp_path: Path) -> None:
    cases = phantom_cases(tmp_path, 3)
    out = tmp_path / "w.pt"
    history = train(
        MODELS["hippocampus"],
        cases[:2],
        cases[2:],
        out=out,
        epochs=50,
        batch_size=2,
        lr=1e-3,
        seed=0,
        val_every=10,
        deadline=time.monotonic() - 1.0,  # already passed: one epoch, then stop
    )
    assert history["stopped_early"] is True
    assert [e["epoch"] for e in history["epochs"]] == [1]
    assert "val_mean_dice" in history["epochs"][0]
    assert out.exists() and history["best"]["epoch"] == 1


def test_gpu_and_simulation_code_imports_without_the_server() -> None:
    """The GPU machine has no monailabel: scoring, windows, offline training and the benchmarks must not need it."""
    code = (
        "import sys, json; "
        "import radiology.uncertainty, radiology.windows, research.radiology.offline; "
        "import benchmarks.gpu, benchmarks.active_learning; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'monailabel')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_server_and_offline_training_share_one_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss, optimiser and validation window come from ``radiology.recipe`` in both trainings."""
    from radiology import recipe
    from radiology.train import SegmentationTrainer
    from research.radiology import offline

    spec = MODELS["hippocampus"]
    marks = {"loss": object(), "optimizer": object(), "window": []}
    monkeypatch.setattr(recipe, "loss", lambda: marks["loss"])
    monkeypatch.setattr(recipe, "optimizer", lambda params, lr: (marks["optimizer"], lr))
    monkeypatch.setattr(recipe, "validation_window", lambda s, sw_batch_size: marks["window"].append(s) or "window")

    server = SegmentationTrainer(spec, str(tmp_path / "m"), str(tmp_path / "m.pt"), cpu_bf16=False)
    context = type("Context", (), {"network": spec.unet()})()
    assert server.loss_function(context) is marks["loss"]
    assert server.optimizer(context) == (marks["optimizer"], spec.learning_rate)
    server.val_inferer(context)
    assert offline.make_optimizer("adamw", [], 0.01) == (marks["optimizer"], 0.01)
    assert marks["window"] == [spec]
    assert offline.recipe is recipe, "the offline trainer reads the same module"


@pytest.mark.parametrize(("model", "batch"), [("hippocampus", 2), ("organs_ct", 4)])
def test_the_validation_window_is_the_model_roi_blended_as_at_inference(model: str, batch: int) -> None:
    from radiology import recipe

    window = recipe.validation_window(MODELS[model], sw_batch_size=batch)
    assert (tuple(window.roi_size), window.sw_batch_size, window.overlap) == (MODELS[model].roi_size, batch, 0.25)
    assert str(window.mode) in ("gaussian", "BlendMode.GAUSSIAN")


# Code that builds a radiology loss or optimiser of its own, and why it is not training with the recipe.
OWN_RECIPE = {
    "benchmarks/gpu.py": "times a training step on the GPU (lr 1e-4): its figure is seconds, not a trained network",
    "benchmarks/training_precision.py": "times float32 against bfloat16 training steps: seconds and memory",
}
_RECIPE_PARTS = {"DiceCELoss", "DiceLoss", "AdamW", "Adam", "SGD"}


def _builds_its_own(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in _RECIPE_PARTS:
                found.append(f"{path.relative_to(ROOT)} {name}")
    return found


def test_every_radiology_training_takes_loss_and_optimiser_from_the_recipe() -> None:
    """Server, offline, click network and the active learning simulation: ``radiology.recipe``
    (nnU-Net's SGD variant of the offline trainer is the one other optimiser, and says so)."""
    files = [*(ROOT / "radiology").rglob("*.py"), *(ROOT / "research" / "radiology").rglob("*.py")]
    files += list((ROOT / "benchmarks").glob("*.py"))
    skipped = {ROOT / "radiology" / "recipe.py", *(ROOT / f for f in OWN_RECIPE)}
    found = [hit for path in sorted(files) if path not in skipped for hit in _builds_its_own(path)]
    assert found == ["research/radiology/offline.py SGD"], "use radiology.recipe.loss() / optimizer()"
