from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from appcore.networks import bottleneck
from radiology.uncertainty import (
    TTA_AUGMENTS,
    dropout_off,
    enable_dropout_only,
    mc_window,
    numpy_dropout,
    tta_window,
    uncertainty_from_outputs,
)


def _outputs(probs: torch.Tensor, expected_entropy: torch.Tensor) -> torch.Tensor:
    return torch.cat([probs, expected_entropy[None]], dim=0)


@pytest.mark.parametrize(
    ("probs", "expected_entropy", "entropy", "bald"),
    [
        # confident foreground everywhere: nothing uncertain
        (torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 2, 2, 2), torch.zeros(2, 2, 2), 0.0, 0.0),
        # uniform mean, each sample confident: maximal disagreement (epistemic)
        (torch.full((3, 2, 2, 2), 1 / 3), torch.zeros(2, 2, 2), 1.0, 1.0),
        # uniform mean, each sample uniform too: all aleatoric, no mutual information
        (torch.full((3, 2, 2, 2), 1 / 3), torch.full((2, 2, 2), math.log(3)), 1.0, 0.0),
    ],
)
def test_scores(probs: torch.Tensor, expected_entropy: torch.Tensor, entropy: float, bald: float) -> None:
    s = uncertainty_from_outputs(_outputs(probs, expected_entropy), 3)
    assert s["entropy"] == pytest.approx(entropy, abs=1e-5)
    assert s["bald"] == pytest.approx(bald, abs=1e-5)


def test_region_ignores_confident_background() -> None:
    probs = torch.zeros(2, 10, 1, 1)
    probs[0] = 1.0
    probs[:, 0] = 0.5  # one uncertain voxel among nine certain background voxels
    s = uncertainty_from_outputs(_outputs(probs, torch.zeros(10, 1, 1)), 2)
    assert s["entropy"] == pytest.approx(1.0, abs=1e-5)
    assert s["foreground_fraction"] == pytest.approx(0.1)


def test_mc_window_deterministic_network_has_no_epistemic_uncertainty() -> None:
    net = torch.nn.Conv3d(1, 3, 1)
    out = mc_window(net, samples=4)(torch.randn(2, 1, 4, 4, 4))
    assert out.shape == (2, 4, 4, 4, 4)
    s = uncertainty_from_outputs(out[0], 3)
    assert s["bald"] == pytest.approx(0.0, abs=1e-5)


def test_dropout_only_sampling() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.InstanceNorm3d(4), torch.nn.Dropout(0.5))
    enable_dropout_only(net)
    assert net[2].training and not net[1].training and not net[0].training
    x = torch.randn(1, 1, 4, 4, 4)
    assert not torch.equal(net(x), net(x)), "dropout must sample different masks"


def test_tta_of_an_augmentation_invariant_network_is_zero() -> None:
    # A network that ignores its input (constant output) cannot disagree with itself.
    const = torch.nn.Conv3d(1, 3, 1)
    torch.nn.init.zeros_(const.weight)
    out = tta_window(const, TTA_AUGMENTS[:4])(torch.randn(1, 1, 6, 6, 6))
    assert out.shape == (1, 4, 6, 6, 6)
    mean, expected_entropy = out[0, :3], out[0, 3]
    assert torch.allclose(mean, torch.softmax(const.bias.detach(), 0).view(3, 1, 1, 1).expand_as(mean))
    s = uncertainty_from_outputs(torch.cat([mc_window(const, 2)(torch.zeros(1, 1, 6, 6, 6))[0], out[0]]), 3)
    assert s["tta"] == pytest.approx(0.0, abs=1e-6)
    assert expected_entropy.min() > 0


def test_tta_sees_disagreement_of_an_intensity_sensitive_network() -> None:
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[[[[0.0]]]], [[[[40.0]]]]]))
        net.bias.zero_()
    x = torch.full((1, 1, 4, 4, 4), 0.02)  # near the decision boundary: gain and offset flip it
    mc = mc_window(net, samples=2)(x)
    s = uncertainty_from_outputs(torch.cat([mc, tta_window(net, TTA_AUGMENTS)(x)], dim=1)[0], 2)
    assert s["tta"] > 0.05 and s["bald"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("augment", TTA_AUGMENTS, ids=lambda a: a.name)
def test_augment_inverse_restores_the_grid(augment) -> None:
    y = torch.arange(2 * 3 * 5 * 6 * 7, dtype=torch.float32).view(2, 3, 5, 6, 7)
    if augment.name.startswith("roll"):
        assert torch.equal(augment.inverse(augment.forward(y)), y)
    else:
        assert torch.equal(augment.inverse(y), y), "intensity changes leave the output grid alone"


def test_dropout_off_restores_modes() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.Dropout(0.5))
    enable_dropout_only(net)
    with dropout_off(net):
        assert not net[1].training
    assert net[1].training


def test_scorer_measures_on_a_unet(tmp_path) -> None:
    from radiology.registry import MODELS
    from radiology.uncertainty import MCDropoutScorer

    spec = MODELS["hippocampus"]
    network = spec.network()
    assert bottleneck(network) is not None
    scorer = MCDropoutScorer(spec, [], samples=2, tta_samples=2)
    scorer.use_network(network)
    m = scorer.score_tensor(torch.randn(1, 40, 50, 40))
    assert {"entropy", "bald", "tta", "foreground_fraction", "embedding"} <= set(m)
    assert len(m["embedding"]) == spec.channels[-1]
    assert all(0.0 <= m[k] <= 1.0 for k in ("entropy", "bald", "tta"))
    # The dropout passes differ (about 0.04 here); with dropout left off bald is about 4e-9.
    assert m["bald"] > 1e-3
    plain = MCDropoutScorer(spec, [], samples=2, tta_samples=0)
    plain.use_network(network)
    assert "tta" not in plain.score_tensor(torch.randn(1, 40, 50, 40))
    with pytest.raises(ValueError, match="tta_samples"):
        MCDropoutScorer(spec, [], tta_samples=len(TTA_AUGMENTS) + 1)


def test_settings_bound_matches_the_augmentations() -> None:
    from appcore.settings import MAX_TTA_SAMPLES

    assert len(TTA_AUGMENTS) == MAX_TTA_SAMPLES


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_numpy_dropout_drops_p_and_rescales(p: float) -> None:
    layer = torch.nn.Dropout(p).train()
    x = torch.ones(4, 8, 32, 32, 32)
    with numpy_dropout(layer, np.random.default_rng(0)):
        y = layer(x)
    scaled = 1 / (1 - p)
    assert torch.unique(y).tolist() == pytest.approx([0.0, scaled])
    assert float((y == 0).float().mean()) == pytest.approx(p, abs=0.003)
    assert float(y.mean()) == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps the mean


def test_numpy_dropout_masks_whole_channels_for_dropout3d() -> None:
    layer = torch.nn.Dropout3d(0.5).train()
    with numpy_dropout(layer, np.random.default_rng(1)):
        y = layer(torch.ones(2, 64, 3, 3, 3))
    per_channel = y.flatten(2)
    assert torch.all(per_channel == per_channel[..., :1])  # each channel all kept or all dropped
    assert 0 < int((per_channel[..., 0] == 0).sum()) < 128


def test_numpy_dropout_is_reproducible_and_restores_the_network() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.Dropout(0.3), torch.nn.Dropout(0.3))
    enable_dropout_only(net)
    x = torch.randn(2, 1, 6, 6, 6)
    outs = []
    for seed in (7, 7, 8):
        with numpy_dropout(net, np.random.default_rng(seed)):
            outs.append(net(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert all(m.training and not m._forward_hooks for m in net[1:])
    with pytest.raises(RuntimeError), numpy_dropout(net, np.random.default_rng(0)):
        raise RuntimeError("a failing pass")
    assert all(m.training and not m._forward_hooks for m in net[1:])
    with dropout_off(net), numpy_dropout(net, np.random.default_rng(0)):  # eval-mode layers stay off
        assert torch.equal(net(x), net[0](x))


def test_mc_window_with_numpy_masks_samples_different_passes() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 1), torch.nn.Dropout(0.5))
    enable_dropout_only(net)
    out = mc_window(net, samples=8, rng=np.random.default_rng(0))(torch.randn(1, 1, 4, 4, 4))
    mean, expected_entropy = out[:, :3], out[:, 3]
    predictive = -(mean * torch.log(mean)).sum(1)
    assert float((predictive - expected_entropy).mean()) > 0.01  # the passes disagree: BALD > 0
