"""Network building blocks beyond MONAI's own."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ProbabilityEnsemble(torch.nn.Module):
    """Averages the class probabilities of independently trained members.

    ``forward`` returns ``log(mean_i softmax(member_i(x)))``: valid logits (their softmax is the
    mean probability), so losses, argmax and Monte Carlo dropout treat the ensemble like one network.

    Args:
        members: networks with identical input and output shapes.
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least two members, got {len(members)}")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-7))


def ensemble_state_dict(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The state dict of a ``ProbabilityEnsemble`` from its members' state dicts."""
    return {f"members.{i}.{k}": v for i, s in enumerate(states) for k, v in s.items()}
