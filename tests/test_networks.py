from __future__ import annotations

import dataclasses

import pytest
import torch

from radiology.networks import ProbabilityEnsemble, ensemble_state_dict
from radiology.registry import MODELS


def test_ensemble_of_identical_members_equals_the_member() -> None:
    spec = MODELS["hippocampus"]
    member = spec.member_network().eval()
    ensemble = dataclasses.replace(spec, members=3).network().eval()
    ensemble.load_state_dict(ensemble_state_dict([member.state_dict()] * 3))
    x = torch.randn(1, 1, *spec.roi_size)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x).softmax(1), member(x).softmax(1), atol=1e-5, rtol=1e-4)


def test_ensemble_averages_probabilities() -> None:
    a, b = torch.nn.Conv3d(1, 2, 1), torch.nn.Conv3d(1, 2, 1)
    x = torch.randn(2, 1, 3, 3, 3)
    expected = (a(x).softmax(1) + b(x).softmax(1)) / 2
    torch.testing.assert_close(ProbabilityEnsemble([a, b])(x).softmax(1), expected)


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_members(n: int) -> None:
    with pytest.raises(ValueError, match="at least two members"):
        ProbabilityEnsemble([torch.nn.Identity()] * n)
    with pytest.raises(ValueError, match="members must be at least 1"):
        dataclasses.replace(MODELS["hippocampus"], members=0)
