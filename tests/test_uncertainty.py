from __future__ import annotations

import math

import pytest
import torch

from radiology.uncertainty import enable_dropout_only, mc_window, uncertainty_from_outputs


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
