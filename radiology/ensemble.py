"""Several networks served as one: their class probabilities averaged.

``MeanOfMembers`` returns the logarithm of the members' mean softmax, so everything that treats a
network's output as logits keeps working: the argmax is the argmax of the averaged probabilities,
``softmax`` of the output gives them back exactly (training's Dice + cross-entropy loss then acts on
the averaged prediction), and the weights are one state dict (``members.<i>.<UNet key>``).

Separately trained networks are combined into the file a model serves offline
(``python -m research.radiology.combine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from appcore.weights import MEMBER_KEY, member_numbers

_TINY = 1e-12  # keeps log() finite where every member gives a class probability 0


class MeanOfMembers(torch.nn.Module):
    """Networks with the same classes, averaged in probability; the output is log-probabilities."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        self.members = torch.nn.ModuleList(members)
        self.tiny = _TINY  # an attribute, not the global: TorchScript (a bundle's model.ts) compiles it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities: list[torch.Tensor] = []
        for member in self.members:  # a loop, not a comprehension over the ModuleList: TorchScript
            probabilities.append(torch.softmax(member(x).float(), dim=1))
        return torch.stack(probabilities).mean(0).clamp_min(self.tiny).log()


def members_of(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The networks inside ``network``: its members for an ensemble, else ``[network]``."""
    return list(network.members) if isinstance(network, MeanOfMembers) else [network]


def spread_over_members(network: torch.nn.Module, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The outputs for ``chunks`` concatenated in their order, chunk ``i`` through member ``i % k``.

    A plain network sees all chunks as one batch. An ensemble's members each see their own chunks as
    one batch, member 0 first with chunk 0 at the front, so ``k`` members cost no more passes than
    one network: Monte Carlo and test-time samples are shared out among them instead of multiplied.
    """
    members = members_of(network)
    if len(members) == 1:
        return network(torch.cat(list(chunks), dim=0))
    outputs: list[torch.Tensor | None] = [None] * len(chunks)
    for j, member in enumerate(members):
        mine = list(range(j, len(chunks), len(members)))
        if not mine:
            continue
        out = member(torch.cat([chunks[i] for i in mine], dim=0))
        for i, part in zip(mine, out.split([chunks[i].shape[0] for i in mine], dim=0), strict=True):
            outputs[i] = part
    return torch.cat(outputs, dim=0)  # type: ignore[arg-type]


def members_in(state: dict[str, Any]) -> int:
    """How many members a state dict holds: 1 for a plain network's keys."""
    found = member_numbers(state)
    if not found:
        return 1
    if found != set(range(len(found))):
        raise ValueError(f"ensemble members are numbered {sorted(found)}, expected 0 to {len(found) - 1}")
    if any(not MEMBER_KEY.match(key) for key in state):
        raise ValueError("the state dict mixes ensemble member keys with plain network keys")
    return len(found)
