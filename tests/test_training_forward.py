"""The server trainer's forward pass on the CPU (``radiology.train.CpuForward``) and the argmax by ``max``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer
from monai.transforms import AsDiscrete

import appcore.precision as precision
from radiology.hippocampus import HIPPOCAMPUS
from radiology.train import CpuForward, SegmentationTrainer
from radiology.transforms import ClassIndexd, class_index
from tests.apps import make_app
from tests.conftest import phantom_cases, requires_shared, write_nifti


def _ties(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.zeros(shape)
    x[1:, ::2] = 1.0  # channels 1 and 2 tie at the top on every other row; channel 0 wins elsewhere
    return x


@pytest.mark.parametrize(
    ("scores", "dim"),
    [
        (torch.randn(3, 9, 10, 11), 0),
        (torch.randn(2, 10, 7, 8, 9), 1),
        (torch.randn(4, 6, 5, 4).bfloat16().float(), 0),  # coarse values: many near-ties
        (_ties((3, 6, 5, 4)), 0),  # exact ties: the first index, as argmax
        (torch.zeros(3, 4, 4, 4), 0),  # an untrained network's constant output
    ],
)
def test_class_index_is_argmax(scores: torch.Tensor, dim: int) -> None:
    assert torch.equal(class_index(scores, dim), torch.argmax(scores, dim, keepdim=True))


def test_class_index_d_matches_asdiscrete_and_keeps_the_metadata() -> None:
    affine = torch.diag(torch.tensor([0.8, 0.8, 5.0, 1.0]))
    scores = MetaTensor(torch.randn(3, 6, 7, 8), affine=affine)
    scores.applied_operations.append({"class": "Spacingd"})
    out = ClassIndexd(keys="pred")({"pred": scores})["pred"]
    expected = AsDiscrete(argmax=True)(scores)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.shape == (1, 6, 7, 8)
    assert torch.equal(out.as_tensor(), expected.as_tensor())
    assert torch.equal(out.affine, affine)
    assert out.applied_operations == [{"class": "Spacingd"}]  # Invertd needs them to return to the grid
    # A plain tensor (an untrained model's empty answer) becomes a MetaTensor as with AsDiscrete.
    plain = ClassIndexd(keys="pred")({"pred": torch.zeros(3, 4, 5, 6)})["pred"]
    assert isinstance(plain, MetaTensor) and plain.shape == (1, 4, 5, 6) and not plain.any()


class _Probe(torch.nn.Module):
    """Records the autocast state and the mode of its dropout layer during forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)
        self.seen: list[tuple[bool, torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), self.drop.training))
        return self.drop(self.conv(x))


@pytest.mark.parametrize(
    ("cpu_bf16", "native", "autocast", "dtype"),
    [(True, True, True, torch.bfloat16), (True, False, False, torch.float32), (False, True, False, torch.float32)],
)
def test_cpu_forward_autocasts_as_the_flag_and_hardware_say(monkeypatch, cpu_bf16, native, autocast, dtype) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    net = _Probe()
    out = CpuForward(SimpleInferer(), cpu_bf16=cpu_bf16)(torch.ones(2, 1, 4, 4, 4), net)
    assert net.seen[0][0] is autocast
    if autocast:
        assert net.seen[0][1] == dtype
    assert out.dtype == torch.float32  # the loss and metrics always get float32


def test_cpu_forward_draws_dropout_masks_from_its_rng_and_backpropagates() -> None:
    net = _Probe().train()
    x = torch.ones(2, 1, 6, 6, 6)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        net.zero_grad()
        out = CpuForward(SimpleInferer(), cpu_bf16=False, rng=np.random.default_rng(seed))(x, net)
        out.sum().backward()
        return out.detach(), net.conv.weight.grad.clone()

    (a, grad_a), (b, _), (c, _) = run(1), run(1), run(2)
    assert net.seen[-1][2] is False  # the layer ran in eval mode, the hook masked instead
    assert net.drop.training and not net.drop._forward_hooks  # restored after the call
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped = (a == 0).float().mean().item()
    assert 0.35 < dropped < 0.65  # p = 0.5
    kept = a[a != 0]
    assert torch.allclose(kept, 2 * net.conv(x).detach()[a != 0], atol=1e-5)  # inverted dropout scaling
    assert torch.isfinite(grad_a).all() and grad_a.abs().sum() > 0


def test_cpu_forward_leaves_other_devices_to_the_engine() -> None:
    # The meta device stands in for CUDA here: MONAI's own amp covers it, so nothing is changed.
    net = _Probe().to("meta").train()
    calls = []

    def inner(inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        calls.append(inputs.device.type)
        return network(inputs)

    out = CpuForward(inner, cpu_bf16=True, rng=np.random.default_rng(0))(torch.ones(1, 1, 4, 4, 4, device="meta"), net)
    assert calls == ["meta"] and out.device.type == "meta"
    assert net.seen == [(torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), True)]


@pytest.mark.parametrize("flag", [True, False])
def test_trainer_runs_its_training_and_validation_passes_through_cpu_forward(tmp_path: Path, flag: bool) -> None:
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "served.pt"), cpu_bf16=flag)
    training, validation = trainer.train_inferer(None), trainer.val_inferer(None)
    assert isinstance(training, CpuForward) and isinstance(validation, CpuForward)
    assert training.cpu_bf16 is flag and validation.cpu_bf16 is flag
    assert training.rng is not None and validation.rng is None  # no dropout masks in eval mode


def test_trainer_masks_follow_torch_seed(tmp_path: Path) -> None:
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "served.pt"))
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)  # set_determinism seeds torch: a seeded run repeats its masks
        draws.append(trainer.train_inferer(None).rng.integers(0, 2**32, 4).tolist())
    assert draws[0] == draws[1] != draws[2]


@requires_shared
def test_conf_cpu_bf16_reaches_the_trainer(tmp_path: Path) -> None:
    for conf, flag in (({}, True), ({"cpu_bf16": "false"}, False)):
        app = make_app(tmp_path / str(flag), "hippocampus", labelled=0, conf=conf)
        assert app._trainers["hippocampus"].cpu_bf16 is flag


class _Cases:
    def __init__(self, datalist: list[dict[str, str]]) -> None:
        self._datalist = datalist

    def datalist(self) -> list[dict[str, str]]:
        return self._datalist


def test_training_skips_a_labelled_image_infer_would_refuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = phantom_cases(tmp_path, 1)[0]
    metres = np.diag([1000.0, 1000.0, 1000.0, 1.0])  # a voxel size in metres: 36 km along x
    bad_image = write_nifti(tmp_path / "metres.nii.gz", np.ones((36, 50, 36), np.float32), metres)
    bad_label = write_nifti(tmp_path / "metres_label.nii.gz", np.ones((36, 50, 36), np.uint8), metres)
    cases = [{"image": str(good.image), "label": str(good.label)}, {"image": str(bad_image), "label": str(bad_label)}]
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "served.pt"))
    assert trainer.pre_process({}, _Cases(cases)) == cases[:1]  # type: ignore[arg-type]
    assert "Training skips metres.nii.gz: The image is 36 x 50 x 36 voxels of 1000 x 1000 x 1000 mm" in caplog.text
    with pytest.raises(ValueError, match="No 'final' labels"):
        trainer.pre_process({}, _Cases(cases[1:]))  # type: ignore[arg-type]
