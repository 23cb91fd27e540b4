"""Batched on-device augmentation and the batched offline trainer (mechanics, on synthetic volumes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radiology.registry import MODELS
from research.radiology.batch_augment import BatchAugment, pad_to
from research.radiology.offline import main as offline_main
from research.radiology.offline import make_optimizer, make_schedule, parse_augment, train_batched
from research.radiology.splits import Case
from tests.conftest import dice, phantom_cases, phantom_msd_folder

NO_INTENSITY = {"p_gamma": 0.0, "p_gain": 0.0, "p_shift": 0.0, "p_noise": 0.0}
SHAPE = (20, 28, 16)  # not cubic: a rotation built in normalised coordinates would shear it


def _sphere(radius: float, centre: tuple[float, float, float] | None = None) -> torch.Tensor:
    centre = centre or tuple((s - 1) / 2 for s in SHAPE)
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in SHAPE), indexing="ij"))
    distance = ((grid - torch.tensor(centre)[:, None, None, None]) ** 2).sum(0).sqrt()
    return (distance <= radius).to(torch.int64)[None]


def _mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return dice(a.bool().numpy(), b.bool().numpy())


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    label = _sphere(6.0).repeat(n, 1, 1, 1, 1)
    label[:, :, : SHAPE[0] // 2] *= 2  # two classes, split along the first axis
    return label.float(), label


def test_nothing_drawn_leaves_the_batch_unchanged() -> None:
    image, label = _batch()
    augment = BatchAugment(p_spatial=0.0, **NO_INTENSITY)
    out_image, out_label = augment(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)


def test_image_and_label_move_together_and_labels_keep_their_ids() -> None:
    _, label = _batch()
    image = torch.cat([(label == 1).float(), (label == 2).float()], dim=1)  # one channel per class
    augment = BatchAugment(p_spatial=1.0, rotate=0.5, scale=(0.8, 1.25), translate=3.0, **NO_INTENSITY)
    out_image, out_label = augment(image, label, torch.Generator().manual_seed(1))
    assert set(out_label.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_label, label), "p_spatial=1 must move something"
    for i in range(len(image)):
        for c in (1, 2):
            # Each image channel was a class mask: resampled bilinearly it must still lie on the label.
            assert _mask_dice(out_image[i, c - 1] > 0.5, out_label[i, 0] == c) > 0.9


def test_rotation_is_in_voxels_so_a_centred_sphere_stays_a_sphere() -> None:
    sphere = _sphere(6.0).repeat(8, 1, 1, 1, 1)
    augment = BatchAugment(p_spatial=1.0, rotate=0.6, scale=(1.0, 1.0), translate=0.0, **NO_INTENSITY)
    _, out = augment(sphere.float(), sphere, torch.Generator().manual_seed(2))
    for i in range(len(out)):
        # Nearest-neighbour resampling of a voxelised sphere costs a few percent; a rotation built in
        # normalised coordinates shears this volume into an ellipsoid (Dice 0.79 with these draws).
        assert _mask_dice(out[i], sphere[i]) > 0.9


@pytest.mark.parametrize(("zoom", "smaller"), [((1.3, 1.3), True), ((0.75, 0.75), False)])
def test_zoom_above_one_shows_the_anatomy_smaller(zoom: tuple[float, float], smaller: bool) -> None:
    sphere = _sphere(5.0).repeat(2, 1, 1, 1, 1)
    augment = BatchAugment(p_spatial=1.0, rotate=0.0, scale=zoom, translate=0.0, **NO_INTENSITY)
    _, out = augment(sphere.float(), sphere, torch.Generator().manual_seed(3))
    assert (out.sum() < sphere.sum()) == smaller


@pytest.mark.parametrize("flip_axes", [(), (0,), (1, 2)])
def test_mirroring_happens_only_along_the_given_axes(flip_axes: tuple[int, ...]) -> None:
    off_centre = _sphere(3.0, centre=(5.0, 7.0, 4.0)).repeat(32, 1, 1, 1, 1)
    augment = BatchAugment(p_spatial=0.0, flip_axes=flip_axes, **NO_INTENSITY)
    _, out = augment(off_centre.float(), off_centre, torch.Generator().manual_seed(4))
    seen = set()
    for i in range(len(out)):
        matches = [
            axes
            for axes in _subsets(flip_axes)
            if torch.equal(out[i], off_centre[i].flip([1 + a for a in axes]) if axes else off_centre[i])
        ]
        assert matches, f"sample {i} is not a mirror along a subset of {flip_axes}"
        seen.add(matches[0])
    assert seen == set(_subsets(flip_axes)), "every combination of mirrors should occur in 32 draws"


def _subsets(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(a for j, a in enumerate(axes) if mask >> j & 1) for mask in range(2 ** len(axes))]


def test_intensity_changes_touch_the_image_only() -> None:
    image, label = _batch()
    augment = BatchAugment(p_spatial=0.0, p_gamma=1.0, p_gain=1.0, p_shift=1.0, p_noise=1.0)
    out_image, out_label = augment(image + 0.5, label, torch.Generator().manual_seed(5))
    assert torch.equal(out_label, label)
    assert not torch.allclose(out_image, image + 0.5)
    assert torch.isfinite(out_image).all()


def test_the_same_seed_gives_the_same_batch() -> None:
    image, label = _batch()
    augment = BatchAugment(p_spatial=1.0, p_noise=1.0)
    a = augment(image, label, torch.Generator().manual_seed(6))
    b = augment(image, label, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mismatched_shapes_are_refused() -> None:
    image, label = _batch()
    with pytest.raises(ValueError, match="one size"):
        BatchAugment()(image, label[:, :, :-1], torch.Generator())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"p_spatial": 1.5}, "p_spatial must be a probability"),
        ({"p_noise": -0.1}, "p_noise must be a probability"),
        ({"scale": (1.2, 0.8)}, "scale must be a range"),
        ({"gamma": (0.0, 1.0)}, "gamma must be a range"),
        ({"flip_axes": (3,)}, "flip_axes must be among"),
    ],
)
def test_settings_are_checked(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchAugment(**change)


def test_pad_to_centres_each_volume_and_refuses_one_too_large() -> None:
    volume = torch.ones(1, 3, 4, 5)
    padded = pad_to([volume, volume * 2], (5, 4, 8))
    assert padded.shape == (2, 1, 5, 4, 8)
    assert padded[0, 0, 1:4, :, 1:6].eq(1).all() and padded[0].sum() == 60
    with pytest.raises(ValueError, match=r"volume 1 has shape \(3, 4, 9\), larger than the patch"):
        pad_to([volume, torch.ones(1, 3, 4, 9)], (5, 4, 8))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", BatchAugment(flip_axes=(0,))),
        ("p_spatial=0.7, rotate=0.5", BatchAugment(p_spatial=0.7, rotate=0.5, flip_axes=(0,))),
        ("scale=0.8:1.25", BatchAugment(scale=(0.8, 1.25), flip_axes=(0,))),
    ],
)
def test_parse_augment(text: str, expected: BatchAugment) -> None:
    assert parse_augment(text, flip_axes=(0,)) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("flip_axes=1", "expected name=value"),
        ("spin=3", "expected name=value"),
        ("p_spatial", "expected name=value"),
        ("rotate=a lot", "must be a number or a range"),
        ("scale=0.8:", "must be a number or a range"),
        ("p_noise=2", "p_noise must be a probability"),
    ],
)
def test_parse_augment_refuses_what_it_cannot_use(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_augment(text, flip_axes=())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--batched"], "exactly one of --steps and --minutes"),
        (["--batched", "--steps", "2", "--minutes", "1"], "exactly one of --steps and --minutes"),
        (["--steps", "2"], "apply to --batched training only"),
        (["--augment", "rotate=0.1"], "apply to --batched training only"),
        (["--optimizer", "sgd"], "apply to --batched training only"),
        (["--include-val"], "--include-val needs --batched"),
        (["--batched", "--steps", "2", "--augment", "spin=3"], "expected name=value"),
        # Options the batched trainer would silently ignore are refused instead.
        (["--batched", "--steps", "2", "--epochs", "5"], "--epochs apply to per-sample training only"),
        (["--batched", "--minutes", "1", "--workers", "2", "--deadline-minutes", "3"], "--workers, --deadline-minutes"),
        (["--batched", "--steps", "2", "--samples-per-image", "2"], "--samples-per-image apply to per-sample"),
    ],
)
def test_the_command_line_refuses_inconsistent_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        offline_main(["hippocampus", "--data", str(tmp_path), "--out", str(tmp_path / "w.pt"), *args])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def _train(tmp_path: Path, train_cases: list[Case], val_cases: list[Case], **settings: object) -> dict:
    """``train_batched`` on the hippocampus spec with tiny settings; ``settings`` override them."""
    arguments: dict = {
        "out": tmp_path / "w.pt",
        "steps": 2,
        "minutes": None,
        "batch_size": 2,
        "lr": 1e-3,
        "seed": 0,
        "val_every": 1,
        "augment": BatchAugment(),
    }
    return train_batched(MODELS["hippocampus"], train_cases, val_cases, **{**arguments, **settings})


def test_batched_training_keeps_the_best_and_the_last_weights(tmp_path: Path) -> None:
    cases = phantom_cases(tmp_path, 3)
    out = tmp_path / "w.pt"
    history = _train(tmp_path, cases[:2], cases[2:], out=out, steps=4, val_every=2)
    assert [r["step"] for r in history["steps"]] == [2, 4]
    assert history["volumes"] == 2 and history["best"]["step"] in (2, 4)
    assert out.exists() and out.with_suffix(".last.pt").exists()


def test_batched_training_sizes_its_steps_to_the_time_given(tmp_path: Path) -> None:
    cases = phantom_cases(tmp_path, 3)
    # 0.01 minutes are already spent on loading and calibration: the smallest plan, one validation.
    history = _train(tmp_path, cases[:2], cases[2:], steps=None, minutes=0.01, val_every=3)
    assert history["calibration"]["planned_steps"] == 3
    assert [r["step"] for r in history["steps"]] == [3]


@pytest.mark.parametrize(
    ("steps", "minutes", "volumes", "match"),
    [
        (None, None, (1, 1), "exactly one of steps and minutes"),
        (3, 1.0, (1, 1), "exactly one of steps and minutes"),
        (3, None, (0, 1), "at least one training and one validation case"),
        (3, None, (1, 0), "at least one training and one validation case"),
    ],
)
def test_batched_training_refuses_what_it_cannot_do(
    tmp_path: Path, steps: int | None, minutes: float | None, volumes: tuple[int, int], match: str
) -> None:
    cases = phantom_cases(tmp_path, 2)
    with pytest.raises(ValueError, match=match):
        _train(tmp_path, cases[: volumes[0]], cases[1 : 1 + volumes[1]], steps=steps, minutes=minutes)


def test_sgd_is_nnunets_and_its_rate_decays_from_the_peak_to_zero() -> None:
    network = torch.nn.Linear(2, 2)
    optimizer = make_optimizer("sgd", network.parameters(), 1e-2)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD) and group["momentum"] == 0.99 and group["nesterov"]
    group["lr"] = 1e-2 / 25  # what a timed calibration leaves behind
    schedule = make_schedule("sgd", optimizer, 1e-2, steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1e-2), "the decay starts at the peak, not at the calibration's rate"
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] == pytest.approx(1e-2 * 0.1**0.9)
    assert optimizer.param_groups[0]["lr"] == 0.0
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("adam", network.parameters(), 1e-2)


def test_batched_training_with_sgd_clips_the_gradients_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = phantom_cases(tmp_path, 3)
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    history = _train(tmp_path, cases[:2], cases[2:], optimizer_kind="sgd", lr=1e-2)
    assert history["optimizer"] == "sgd" and norms == [12.0, 12.0]
    assert np.isfinite(history["steps"][-1]["loss"])
    norms.clear()
    assert _train(tmp_path, cases[:2], cases[2:])["optimizer"] == "adamw" and norms == []


def test_volumes_larger_than_the_patch_are_refused(tmp_path: Path) -> None:
    cases = phantom_cases(tmp_path, 2, shape=(36, 70, 36))  # 70 > the hippocampus patch's 64
    with pytest.raises(ValueError, match="larger than the patch"):
        _train(tmp_path, cases[:1], cases[1:])


def test_the_command_line_writes_weights_and_a_history(tmp_path: Path) -> None:
    data = phantom_msd_folder(tmp_path, 12)  # the fixed split: 2 test, 1 validation, 9 training
    out = tmp_path / "cli.pt"
    offline_main(
        ["hippocampus", "--data", str(data), "--out", str(out), "--batched", "--steps", "2", "--val-every", "2"]
        + ["--batch-size", "2", "--threads", "2", "--augment", "p_spatial=1,scale=0.9:1.1", "--flip-axes", "0"]
    )
    history = json.loads(out.with_suffix(".history.json").read_text())
    assert history["volumes"] == 9 and len(history["split"]["train"]) == 9
    assert history["augment"]["p_spatial"] == 1.0 and history["augment"]["scale"] == [0.9, 1.1]
    assert history["augment"]["flip_axes"] == [0]
    assert out.exists()


def test_include_val_trains_on_the_validation_cases_too(tmp_path: Path) -> None:
    data = phantom_msd_folder(tmp_path, 12)
    out = tmp_path / "final.pt"
    offline_main(
        ["hippocampus", "--data", str(data), "--out", str(out), "--batched", "--steps", "1", "--val-every", "1"]
        + ["--batch-size", "2", "--threads", "2", "--include-val"]
    )
    history = json.loads(out.with_suffix(".history.json").read_text())
    assert history["volumes"] == 10
    assert set(history["split"]["val"]) <= set(history["split"]["train"])
    assert not set(history["split"]["test"]) & set(history["split"]["train"])
    assert out.with_suffix(".last.pt").exists()
