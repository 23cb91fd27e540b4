"""Deep supervision in offline training: extra decoder outputs while training, a plain UNet after."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from radiology.registry import MODELS
from research.radiology.batch_augment import BatchAugment
from research.radiology.deep_supervision import DeepSupervision, decoder_levels
from research.radiology.offline import main as offline_main
from research.radiology.offline import train_batched
from tests.conftest import phantom_cases, phantom_msd_folder

SPEC = dataclasses.replace(MODELS["hippocampus"], members=1)  # offline training: one UNet per run


def _input() -> torch.Tensor:
    return torch.randn(2, 1, *SPEC.roi_size, generator=torch.Generator().manual_seed(0))


def test_training_outputs_are_finest_first_one_per_level() -> None:
    net = DeepSupervision(SPEC.network(), extra_levels=2).train()
    outputs = net(_input())
    roi = SPEC.roi_size
    assert [tuple(o.shape) for o in outputs] == [
        (2, SPEC.num_classes, *roi),
        (2, SPEC.num_classes, *(r // 2 for r in roi)),
        (2, SPEC.num_classes, *(r // 4 for r in roi)),
    ]


def test_the_first_output_is_the_unets_own_and_eval_gives_only_that() -> None:
    unet = SPEC.network()
    net = DeepSupervision(unet, extra_levels=2)
    x = _input()
    net.train()
    torch.manual_seed(1)  # the same dropout masks for both passes
    supervised = net(x)[0]
    torch.manual_seed(1)
    assert torch.equal(supervised, unet(x))
    net.eval()
    plain = net(x)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, unet.eval()(x))


def test_no_hook_is_left_on_the_unet() -> None:
    unet = SPEC.network()
    net = DeepSupervision(unet, extra_levels=2).train()
    net(_input())
    assert all(not level._forward_hooks for level in decoder_levels(unet))


def test_every_head_learns_from_the_loss() -> None:
    net = DeepSupervision(SPEC.network(), extra_levels=2).train()
    label = torch.zeros(2, 1, *SPEC.roi_size)
    label[:, :, 10:30, 20:40, 10:30] = 1.0
    label[:, :, 30:40, 20:40, 10:30] = 2.0
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(net(_input()), label)
    loss.backward()
    for head in net.heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_a_network_without_the_unet_layout_is_refused() -> None:
    unet = SPEC.network()
    unet.model = torch.nn.Identity()
    with pytest.raises(ValueError, match="expected 3 decoder levels in the UNet, found 0"):
        DeepSupervision(unet)


@pytest.mark.parametrize("extra_levels", [0, 3])
def test_levels_beyond_the_decoder_are_refused(extra_levels: int) -> None:
    with pytest.raises(ValueError, match="extra_levels must be between 1 and 2"):
        DeepSupervision(SPEC.network(), extra_levels=extra_levels)


def test_trained_weights_load_into_the_plain_served_network(tmp_path: Path) -> None:
    cases = phantom_cases(tmp_path, 3)
    out = tmp_path / "ds.pt"
    history = train_batched(
        SPEC,
        cases[:2],
        cases[2:],
        out=out,
        steps=2,
        minutes=None,
        batch_size=2,
        lr=1e-3,
        seed=0,
        val_every=2,
        augment=BatchAugment(),
        deep_supervision=2,
    )
    assert history["deep_supervision"] == 2
    for path in (out, out.with_suffix(".last.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        assert not any(key.startswith("heads") for key in state)
        SPEC.network().load_state_dict(state, strict=True)


def test_the_command_line_passes_it_on_and_keeps_it_to_batched_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        offline_main(
            ["hippocampus", "--data", str(tmp_path), "--out", str(tmp_path / "w.pt")] + ["--deep-supervision", "2"]
        )
    assert exit_info.value.code == 2
    assert "--deep-supervision apply to --batched training only" in capsys.readouterr().err

    data = phantom_msd_folder(tmp_path, 12)
    out = tmp_path / "cli.pt"
    offline_main(
        ["hippocampus", "--data", str(data), "--out", str(out), "--batched", "--steps", "1", "--val-every", "1"]
        + ["--batch-size", "2", "--threads", "2", "--deep-supervision", "2"]
    )
    assert json.loads(out.with_suffix(".history.json").read_text())["deep_supervision"] == 2
