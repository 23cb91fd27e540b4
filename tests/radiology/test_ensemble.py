"""Several networks served as one (``radiology.ensemble``): the averaging, the weights file, and
how scoring shares its passes out among the members."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from appcore.weights import load_state_dict, save_weights_atomically
from radiology.ensemble import MeanOfMembers, members_in, spread_over_members
from radiology.hippocampus import HIPPOCAMPUS
from radiology.uncertainty import TTA_AUGMENTS, mc_window, tta_window
from research.radiology import combine as ensemble
from research.radiology.combine import combine

SMALL = dataclasses.replace(HIPPOCAMPUS, channels=(4, 8, 16, 32), members=1)


class Fixed(torch.nn.Module):
    """Returns given logits whatever the input (one row per input row), and counts its calls."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.logits.view(shape).expand(x.shape[0], -1, *x.shape[2:]).clone()


class Tag(torch.nn.Module):
    """Returns its input plus a member number: shows which member computed which output rows."""

    def __init__(self, number: float) -> None:
        super().__init__()
        self.number = number

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.number


def test_the_output_is_the_log_of_the_members_mean_probability() -> None:
    a, b = [2.0, 0.0, -1.0], [-1.0, 3.0, 0.0]
    out = MeanOfMembers([Fixed(a), Fixed(b)])(torch.zeros(1, 1, 5))
    want = (torch.softmax(torch.tensor(a), 0) + torch.softmax(torch.tensor(b), 0)) / 2
    assert torch.allclose(torch.softmax(out[0, :, 0], 0), want, atol=1e-6)
    assert torch.allclose(out[0, :, 0].exp(), want, atol=1e-6)  # already normalised: log-probabilities
    # Averaging probabilities, not logits: the mean of the logits would pick class 0 (0.5 vs 1.5/2).
    assert int(out[0, :, 0].argmax()) == 1


def test_a_class_no_member_gives_any_probability_stays_finite() -> None:
    out = MeanOfMembers([Fixed([0.0, -1e4]), Fixed([0.0, -1e4])])(torch.zeros(1, 1, 2))
    assert torch.isfinite(out).all() and int(out[0, :, 0].argmax()) == 0


def test_an_ensemble_needs_two_members() -> None:
    with pytest.raises(ValueError, match="at least two members"):
        MeanOfMembers([Fixed([0.0, 1.0])])


@pytest.mark.parametrize(
    ("chunks", "members", "rows_per_member"),
    [
        (8, 4, [2, 2, 2, 2]),  # the scorer's 8 Monte Carlo samples over the hippocampus' 4 members
        (4, 4, [1, 1, 1, 1]),  # its 4 test-time passes
        (3, 4, [1, 1, 1, 0]),  # fewer chunks than members: the last member is not run
        (5, 2, [3, 2]),
    ],
)
def test_chunks_are_shared_out_in_turn_and_come_back_in_order(
    chunks: int, members: int, rows_per_member: list[int]
) -> None:
    tags = [Tag(100.0 * (j + 1)) for j in range(members)]
    counted = [Fixed([0.0]) for _ in range(members)]
    inputs = [torch.full((1, 1, 2), float(i)) for i in range(chunks)]
    out = spread_over_members(MeanOfMembers(tags), inputs)
    # Chunk i comes back at position i, computed by member i % k.
    assert [float(out[i, 0, 0]) for i in range(chunks)] == [i + 100.0 * (i % members + 1) for i in range(chunks)]
    for m in counted:
        m.rows.clear()
    spread_over_members(MeanOfMembers(counted), inputs)
    assert [sum(m.rows) for m in counted] == rows_per_member
    assert all(len(m.rows) <= 1 for m in counted), "each member runs its chunks as one batch"


def test_a_plain_network_sees_every_chunk_in_one_batch() -> None:
    net = Fixed([0.0, 1.0])
    out = spread_over_members(net, [torch.zeros(2, 1, 3)] * 3)
    assert net.rows == [6] and out.shape == (6, 2, 3)


def test_scoring_passes_cost_the_same_with_four_members_and_use_every_one() -> None:
    members = [Fixed([float(j), 0.0, 0.0]) for j in range(4)]
    network = MeanOfMembers(members)
    x = torch.zeros(1, 1, 4, 4, 4)
    mc = mc_window(network, samples=8)(x)
    assert [m.rows for m in members] == [[2], [2], [2], [2]]
    for m in members:
        m.rows.clear()
    features: list[torch.Tensor] = []
    tta_window(network, TTA_AUGMENTS[:4], features)(x)
    assert [m.rows for m in members] == [[1], [1], [1], [1]]
    # The members disagree, so the samples do: the mutual information (BALD) is above zero.
    mean, expected_entropy = mc[0, :3], mc[0, 3]
    predictive = -(mean * mean.log()).sum(0)
    assert float((predictive - expected_entropy).min()) > 1e-3


def test_the_embedding_comes_from_member_zero_on_the_plain_input() -> None:
    torch.manual_seed(0)
    nets = [SMALL.unet().eval() for _ in range(2)]
    x = torch.randn(1, 1, 16, 16, 16)
    alone: list[torch.Tensor] = []
    tta_window(nets[0], TTA_AUGMENTS[:1], alone)(x)
    together: list[torch.Tensor] = []
    tta_window(MeanOfMembers(nets), TTA_AUGMENTS[:4], together)(x)
    assert len(together) == 1 and torch.allclose(together[0], alone[0], atol=1e-5)
    other: list[torch.Tensor] = []
    tta_window(nets[1], TTA_AUGMENTS[:1], other)(x)
    assert not torch.allclose(together[0], other[0], atol=1e-3)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["model.0.conv.weight", "model.1.bias"], 1),
        (["members.0.a", "members.1.a", "members.2.a"], 3),
        (["members.0.a", "members.2.a"], "numbered \\[0, 2\\]"),
        (["members.0.a", "members.1.a", "model.0.a"], "mixes"),
    ],
)
def test_members_in_a_state_dict(keys: list[str], expected: int | str) -> None:
    state = dict.fromkeys(keys, torch.zeros(1))
    if isinstance(expected, int):
        assert members_in(state) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            members_in(state)


def test_combine_checks_its_members_and_can_halve_the_size() -> None:
    a, b = SMALL.unet().state_dict(), SMALL.unet().state_dict()
    both = combine([a, b], float16=True)
    assert members_in(both) == 2 and all(v.dtype == torch.float16 for v in both.values() if v.is_floating_point())
    assert torch.equal(both["members.1." + next(iter(b))], next(iter(b.values())).half())
    with pytest.raises(ValueError, match="at least two"):
        combine([a])
    with pytest.raises(ValueError, match="itself an ensemble"):
        combine([a, both])
    narrower = dataclasses.replace(SMALL, channels=(4, 8, 16), strides=(2, 2)).unet().state_dict()
    with pytest.raises(ValueError, match="not the same network"):
        combine([a, narrower])


def test_float16_weights_load_into_the_float32_network_and_predict_alike() -> None:
    torch.manual_seed(1)
    spec = dataclasses.replace(SMALL, members=2)
    nets = [spec.unet().eval() for _ in range(2)]
    served = spec.network().eval()
    served.load_state_dict(combine([n.state_dict() for n in nets], float16=True))
    assert all(p.dtype == torch.float32 for p in served.parameters())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        want, got = MeanOfMembers(nets)(x), served(x)
    assert float((got - want).abs().max()) < 1e-2
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.99


def test_the_command_writes_what_the_model_loads_and_refuses_other_networks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(2):
        save_weights_atomically(HIPPOCAMPUS.unet().state_dict(), tmp_path / f"m{i}.pt")
        save_weights_atomically(SMALL.unet().state_dict(), tmp_path / f"small{i}.pt")
    out = tmp_path / "e.pt"
    m0, m1, small0, small1 = (str(tmp_path / f"{n}.pt") for n in ("m0", "m1", "small0", "small1"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for members, message in [
        ([small0, small1], "cannot combine these weights for hippocampus: Error(s) in loading state_dict"),
        ([m0], "an ensemble needs at least two members"),
        ([m0, str(tmp_path / "absent.pt")], "No such file or directory"),
        ([m0, str(garbage)], "cannot combine these weights for hippocampus"),
    ]:
        with pytest.raises(SystemExit):
            ensemble.main(["hippocampus", *members, "--out", str(out)])
        assert message in capsys.readouterr().err
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["garbage.pt", "m0.pt", "m1.pt", "small0.pt", "small1.pt"]
        ), "nothing written, not even a temporary file"
    with pytest.raises(SystemExit):
        ensemble.main(["hippocampus", m0, m1, "--out", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err
    ensemble.main(["hippocampus", m0, m1, "--out", str(out), "--float16"])
    assert "note: hippocampus serves 4 network(s)" in capsys.readouterr().out  # two: for experiments only
    dataclasses.replace(HIPPOCAMPUS, members=2).network().load_state_dict(load_state_dict(out), strict=True)
    one = (tmp_path / "m0.pt").stat().st_size
    assert 0.9 * one < out.stat().st_size < 1.1 * one  # two members in half precision: the size of one


def test_the_shipped_hippocampus_model_is_four_members_in_float16() -> None:
    state = load_state_dict(HIPPOCAMPUS.shipped_weights_path)
    assert HIPPOCAMPUS.members == members_in(state) == 4
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    HIPPOCAMPUS.network().load_state_dict(state, strict=True)
    # Four different networks, not one copied four times.
    key = next(k for k in state if k.startswith("members.0."))
    firsts = [state[key.replace("members.0.", f"members.{i}.", 1)] for i in range(4)]
    assert all(not torch.equal(firsts[0], f) for f in firsts[1:])
    assert np.isclose(
        sum(v.numel() for v in state.values()) / 4, sum(p.numel() for p in HIPPOCAMPUS.unet().state_dict().values())
    )
