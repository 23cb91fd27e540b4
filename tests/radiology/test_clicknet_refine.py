"""Feature-space refinement of the automatic network per click (``radiology.clicknet.FeatureRefiner``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from appcore.weights import save_weights_atomically
from radiology.clicknet import ClickNet, FeatureRefiner, clicked_voxels, unet_parts
from radiology.hippocampus import HIPPOCAMPUS
from radiology.infer import window_inferer
from radiology.spec import WEIGHTS_DIR

CLICK_WEIGHTS = WEIGHTS_DIR / "hippocampus_clicks.pt"
SHAPE = (34, 48, 36)  # about an MSD hippocampus crop


def phantom(seed: int = 0) -> np.ndarray:
    """A noisy grey crop with a bright curved tube (where the hippocampus would be)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    tube = (((x - 17 - 3 * np.sin(y / 8)) / 5) ** 2 + ((z - 18) / 4) ** 2 < 1) & (y > 8) & (y < 40)
    image = 40 + 8 * rng.standard_normal(SHAPE).astype(np.float32)
    image[tube] += 60
    return image


@pytest.fixture(scope="module", params=[1, 4], ids=["one network", "ensemble of four"])
def automatic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random automatic weights (one UNet, or the shipped ensemble's layout): on a phantom they answer
    every class somewhere, so a click that changes the answer can be told apart from one that does not."""
    torch.manual_seed(request.param)
    path = tmp_path_factory.mktemp("automatic") / f"random{request.param}.pt"
    save_weights_atomically(replace(HIPPOCAMPUS, members=request.param).network().state_dict(), path)
    return path


def engine_of(automatic: Path, **options: object) -> ClickNet:
    return ClickNet(HIPPOCAMPUS, weights=CLICK_WEIGHTS, automatic_weights=[automatic], **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("frozen_norm", [True, False], ids=["frozen statistics", "own statistics"])
def test_unchanged_features_answer_as_the_automatic_network(automatic: Path, frozen_norm: bool) -> None:
    """Scale 1 and bias 0 give back the sliding-window answer (the features are cut at the last
    layer, on the same padding as the window)."""
    engine = engine_of(automatic, cpu_bf16=False)
    network = engine.automatic_network()
    x = torch.from_numpy((phantom() - 60) / 30)[None, None].float()
    window = window_inferer(HIPPOCAMPUS).window(SHAPE)
    refiner = FeatureRefiner(network, x, window, cpu_bf16=False, device=torch.device("cpu"), frozen_norm=frozen_norm)
    members, channels = len(refiner.heads), refiner.features[0].shape[1]
    mine = refiner.scores(torch.ones(members, channels), torch.zeros(members, channels)).detach()
    with torch.inference_mode():
        theirs = torch.log_softmax(window_inferer(HIPPOCAMPUS)(x, network)[0].float(), dim=0)
    assert mine.shape == theirs.shape
    assert float((mine - theirs).abs().max()) < 1e-3


def test_a_clicks_crop_answers_as_the_whole_layer(automatic: Path) -> None:
    """The loss reads each click's features through a 7^3 crop: at the clicked voxel (the image's
    corners and edges included) it gives what the whole layer gives."""
    engine = engine_of(automatic)
    x = torch.from_numpy((phantom() - 60) / 30)[None, None].float()
    refiner = FeatureRefiner(
        engine.automatic_network(),
        x,
        window_inferer(HIPPOCAMPUS).window(SHAPE),
        cpu_bf16=False,
        device=torch.device("cpu"),
    )
    members, channels = len(refiner.heads), refiner.features[0].shape[1]
    whole = refiner.scores(torch.ones(members, channels), torch.zeros(members, channels)).detach()
    voxels = [(0, 0, 0), (33, 47, 35), (17, 24, 18), (1, 46, 2), (32, 1, 34)]
    crops, inside = refiner._crops(voxels)
    for k, v in enumerate(voxels):
        logits = [
            head(crop[k : k + 1])[(0, slice(None), *inside[k])] for head, crop in zip(refiner.heads, crops, strict=True)
        ]
        assert float((refiner._combine(logits) - whole[(slice(None), *v)]).abs().max()) < 1e-4, v


@pytest.mark.parametrize("frozen_norm", [True, False], ids=["frozen statistics", "own statistics"])
def test_refinement_gives_clicked_voxels_their_class(automatic: Path, frozen_norm: bool) -> None:
    """The optimised features alone (no correction) give most clicked voxels their class where the
    network answered another one."""
    engine = engine_of(automatic)
    x = torch.from_numpy((phantom() - 60) / 30)[None, None].float()
    window = window_inferer(HIPPOCAMPUS).window(SHAPE)
    refiner = FeatureRefiner(
        engine.automatic_network(), x, window, cpu_bf16=False, device=torch.device("cpu"), frozen_norm=frozen_norm
    )
    members, channels = len(refiner.heads), refiner.features[0].shape[1]
    before = refiner.scores(torch.ones(members, channels), torch.zeros(members, channels)).detach().argmax(0)
    rng = np.random.default_rng(0)
    clicked = []
    for c in (0, 1, 2):
        wrong = np.argwhere(before.numpy() != c)
        for v in wrong[rng.choice(len(wrong), 2, replace=False)]:
            clicked.append((c, (int(v[0]), int(v[1]), int(v[2]))))
    after = refiner.refine(
        torch.zeros_like(before, dtype=torch.float32)[None].expand(3, *SHAPE), clicked, steps=20, margin=1.0, decay=0.01
    ).argmax(0)
    held = sum(int(after[v]) == c for c, v in clicked)
    assert held >= 4, (held, clicked)


@pytest.mark.parametrize("grid", ["ras_1mm", "flipped"])
def test_with_refinement_no_clicks_answer_the_automatic_model_and_each_click_holds(automatic: Path, grid: str) -> None:
    affine = (
        np.eye(4) if grid == "ras_1mm" else np.array([[-1.0, 0, 0, 40], [0, -1.0, 0, 50], [0, 0, 1, -3], [0, 0, 0, 1]])
    )
    image = phantom()
    plain, refined = engine_of(automatic), engine_of(automatic, refine_steps=5)
    assert np.array_equal(refined.segment(image, affine, {}, None), plain.segment(image, affine, {}, None))
    clicks = {"anterior": [(17, 24, 18), (12, 30, 20)], "background": [(17, 12, 18)], "posterior": [(20, 36, 16)]}
    answer = refined.segment(image, affine, clicks, None)
    assert answer.shape == SHAPE and answer.dtype == np.uint8
    names = refined.channels
    for name, voxels in clicks.items():
        for v in voxels:
            assert answer[v] == names.index(name), (name, v)


def test_an_image_larger_than_one_window_is_answered_without_refinement(automatic: Path) -> None:
    """The features are cut from one window; a larger image keeps the engine's answer without it."""
    big = (40, 120, 40)
    x = torch.zeros((1, 1, *big))
    window = window_inferer(HIPPOCAMPUS).window(big)
    assert any(w < n for w, n in zip(window, big, strict=True))
    with pytest.raises(ValueError, match=r"needs several windows"):
        FeatureRefiner(engine_of(automatic).automatic_network(), x, window, cpu_bf16=False, device=torch.device("cpu"))
    image = np.zeros(big, np.float32)
    refined, plain = engine_of(automatic, refine_steps=3), engine_of(automatic)
    clicks = {"anterior": [(20, 60, 20)]}
    assert np.array_equal(
        refined.segment(image, np.eye(4), clicks, None), plain.segment(image, np.eye(4), clicks, None)
    )


def test_clicked_voxels_are_the_nearest_on_the_grid() -> None:
    points = [torch.zeros((0, 3)), torch.tensor([[1.4, -0.6, 9.7]]), torch.tensor([[2.5, 3.0, 4.0]])]
    assert clicked_voxels(points, (5, 5, 5)) == [(1, (1, 0, 4)), (2, (2, 3, 4))]


def test_unet_parts_refuses_another_network() -> None:
    with pytest.raises(ValueError, match="feature refinement needs MONAI UNets"):
        unet_parts(torch.nn.Conv3d(1, 3, 3))


def test_a_unet_of_another_top_layer_is_refused() -> None:
    """A UNet whose top layer is not a transposed convolution with its normalisation (no residual units)."""
    network = replace(HIPPOCAMPUS, members=1).network()
    network.model[2] = torch.nn.Sequential(torch.nn.Conv3d(48, 3, 1), torch.nn.Identity())
    with pytest.raises(ValueError, match="needs a UNet's transposed-conv top layer"):
        FeatureRefiner(network, torch.zeros((1, 1, *SHAPE)), (48, 64, 48), cpu_bf16=False, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refine_steps": -1}, r"refine_steps must be a whole number, 0 or more \(0: no refinement\), got -1"),
        ({"refine_steps": 2.5}, r"refine_steps must be a whole number, 0 or more \(0: no refinement\), got 2.5"),
        ({"refine_margin": -1.0}, "refine_margin must be 0 or more, got -1.0"),
        ({"refine_decay": -0.5}, "refine_decay must be 0 or more, got -0.5"),
        ({"refine_reach": 0.0}, r"refine_reach must be more than 0 voxels \(or None: everywhere\), got 0.0"),
    ],
)
def test_bad_refinement_settings_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClickNet(HIPPOCAMPUS, weights=CLICK_WEIGHTS, **options)
