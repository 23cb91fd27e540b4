"""The server trainer: its forward pass on the CPU (``radiology.train.CpuForward``), the argmax by ``max``, which
labelled images it trains and validates on, and which checkpoints it publishes."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer
from monai.transforms import AsDiscrete

import appcore.precision as precision
from appcore.weights import load_state_dict
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
    """The datastore calls the trainer makes, over ``datalist``; ``infos`` are the labels' saved
    parameters by image id (the file name without ``.nii.gz``)."""

    def __init__(self, datalist: list[dict[str, str]], infos: dict[str, dict] | None = None) -> None:
        self._datalist = datalist
        self._ids = {Path(c["image"]).name.removesuffix(".nii.gz"): c["image"] for c in datalist}
        self._infos = infos or {}

    def datalist(self) -> list[dict[str, str]]:
        return self._datalist

    def get_labeled_images(self) -> list[str]:
        return list(self._ids)

    def get_image_uri(self, image_id: str) -> str:
        return self._ids[image_id]

    def get_label_info(self, image_id: str, tag: str) -> dict:
        assert tag == "final"
        return self._infos.get(image_id, {})


def test_training_skips_a_labelled_image_infer_would_refuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = phantom_cases(tmp_path, 1)[0]
    metres = np.diag([1000.0, 1000.0, 1000.0, 1.0])  # a voxel size in metres: 36 km along x
    bad_image = write_nifti(tmp_path / "metres.nii.gz", np.ones((36, 50, 36), np.float32), metres)
    bad_label = write_nifti(tmp_path / "metres_label.nii.gz", np.ones((36, 50, 36), np.uint8), metres)
    cases = [{"image": str(good.image), "label": str(good.label)}, {"image": str(bad_image), "label": str(bad_label)}]
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "served.pt"))
    assert trainer.pre_process({}, _Cases(cases)) == cases[:1]  # type: ignore[arg-type]
    assert "Training hippocampus skips metres: The image is 36 x 50 x 36 voxels of 1000 x 1000 x 1000 mm" in caplog.text
    with pytest.raises(
        ValueError, match=r"No 'final' label to train 'hippocampus' on \(skipped metres: reasons in the log above\)"
    ):
        trainer.pre_process({}, _Cases(cases[1:]))  # type: ignore[arg-type]


def _volume(path: Path, values: np.ndarray) -> str:
    return str(write_nifti(path, values))


MR_LIKE = "mr"  # magnitude MR: nothing below 0
CT_LIKE = "ct"  # Hounsfield units with air at -1000
SOFT = "soft"  # values from -100 up: rules out neither modality


@pytest.mark.parametrize(
    ("model", "served", "image", "label_ids", "info", "why"),
    [
        # Values first, then the saved model, then the viewer's segment names, then the modality the
        # image's values rule out.
        ("organs_ct", "hippocampus", MR_LIKE, (1, 2), {}, r"the image is no CT \(nothing below 0\)"),
        ("hippocampus", "organs_ct", MR_LIKE, (1, 2), {}, None),
        ("hippocampus", "organs_ct", CT_LIKE, (1,), {}, r"the image is no MR \(voxels below -500\)"),
        ("organs_ct", "hippocampus", CT_LIKE, (1,), {}, None),
        ("organs_ct", "hippocampus", SOFT, (1, 2), {}, None),  # nothing rules CT out: both may claim it
        ("organs_ct", "hippocampus", MR_LIKE, (1, 2), {"model": "organs_ct"}, None),  # the saver said so
        ("hippocampus", "organs_ct", MR_LIKE, (1, 2), {"model": "organs_ct"}, "it was saved for model 'organs_ct'"),
        # Named for a model whose values it does not hold (info changed after the save): not its data.
        ("hippocampus", "organs_ct", MR_LIKE, (1, 3), {"model": "hippocampus"}, r"values \[3\], which are not"),
        (
            "organs_ct",
            "hippocampus",
            SOFT,
            (1, 2),
            {"label_info": [{"name": "Anterior", "idx": 1}, {"name": "posterior", "idx": 2}]},
            r"its segments \['anterior', 'posterior'\] are hippocampus's labels",
        ),
        ("hippocampus", "organs_ct", SOFT, (1, 2), {"label_info": [{"name": "anterior", "idx": 1}]}, None),
        ("hippocampus", "organs_ct", MR_LIKE, (1, 2), {"label_info": [{"name": "spleen", "idx": 1}]}, "organs_ct's"),
        ("hippocampus", "organs_ct", MR_LIKE, (1, 5), {}, r"values \[5\], which are not hippocampus's labels \[1, 2\]"),
        # A segment no model has (value 3, which only organs_ct holds): the MR image still rules CT out.
        (
            "organs_ct",
            "hippocampus",
            MR_LIKE,
            (1, 2, 3),
            {"label_info": [{"name": "anterior"}, {"name": "posterior"}, {"name": "Segment_3"}]},
            r"the image is no CT",
        ),
        # Served alone too, a model does not train on an image of a modality its values rule out.
        ("organs_ct", None, MR_LIKE, (1, 2), {}, r"the image is no CT"),
        ("hippocampus", None, CT_LIKE, (1,), {}, r"the image is no MR"),
        ("hippocampus", None, SOFT, (1, 2), {}, None),
    ],
)
def test_which_saved_labels_a_model_trains_on(
    tmp_path: Path, caplog, model: str, served: str | None, image: str, label_ids: tuple, info: dict, why: str | None
) -> None:
    from radiology.registry import MODELS

    shape = (36, 50, 36)
    label = np.zeros(shape, np.uint8)
    for i, value in enumerate(label_ids):
        label[10 + 6 * i : 14 + 6 * i, 20:30, 10:20] = value
    low = {MR_LIKE: 0.0, CT_LIKE: -1000.0, SOFT: -100.0}[image]
    voxels = np.where(label > 0, 60.0, low + 20.0).astype(np.float32)
    voxels[0, 0, 0] = low
    cases = [{"image": _volume(tmp_path / "case.nii.gz", voxels), "label": _volume(tmp_path / "lab.nii.gz", label)}]
    neighbours = [MODELS[served]] if served else []
    trainer = SegmentationTrainer(MODELS[model], str(tmp_path / "run"), str(tmp_path / "s.pt"), neighbours=neighbours)
    store = _Cases(cases, {"case": info})
    if why is None:
        assert trainer.pre_process({}, store) == cases  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match=rf"No 'final' label to train '{model}' on \(skipped case: reasons"):
            trainer.pre_process({}, store)  # type: ignore[arg-type]
        assert re.search(rf"Training {model} skips case: .*{why}", caplog.text), caplog.text
        assert re.search(rf"skipped case: .*{why}", trainer.no_training_data(store) or ""), "the 409's reason"


@pytest.mark.parametrize(
    ("label_shape", "shift_mm", "why"),
    [
        ((36, 50, 35), 0.0, r"shape \(36, 50, 35\) against \(36, 50, 36\)"),
        ((36, 50, 36), 2.0, "the same shape, but other voxel-to-world affines"),
        ((36, 50, 36), 1e-4, None),  # within the tolerance a save is checked with
    ],
)
def test_a_label_whose_image_was_written_over_on_another_grid_is_skipped(
    tmp_path: Path, caplog, label_shape: tuple, shift_mm: float, why: str | None
) -> None:
    # Saving checks the grid; an image file written over in the studies folder afterwards can break it,
    # and such a pair would end the whole run (MONAI's transforms meet two shapes).
    image = np.full((36, 50, 36), 20.0, np.float32)
    image[10:20, 20:30, 10:20] = 60.0
    label = np.zeros(label_shape, np.uint8)
    label[10:20, 20:30, 10:20] = 1
    moved = np.eye(4)
    moved[0, 3] = shift_mm
    cases = [
        {
            "image": _volume(tmp_path / "case.nii.gz", image),
            "label": str(write_nifti(tmp_path / "l.nii.gz", label, moved)),
        }
    ]
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "s.pt"))
    if why is None:
        assert trainer.pre_process({}, _Cases(cases)) == cases  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match=r"No 'final' label to train 'hippocampus' on \(skipped case"):
            trainer.pre_process({}, _Cases(cases))  # type: ignore[arg-type]
        assert re.search(rf"skips case: it no longer lies on its image's grid \({why}\)", caplog.text), caplog.text


@pytest.mark.parametrize(
    ("n", "split", "validating"),
    [
        (4, 0.2, []),  # under 5 labels nothing validates
        (5, 0.2, ["c4"]),
        (10, 0.2, ["c8", "c9"]),
        (10, 0.0, []),
        (9, 0.5, ["c5", "c6", "c7", "c8"]),
    ],
)
def test_the_last_labelled_images_by_id_validate(tmp_path: Path, n: int, split: float, validating: list[str]) -> None:
    datalist = [{"image": f"/studies/c{i}.nii.gz", "label": f"/labels/c{i}.nii.gz"} for i in range(n)]
    context = SimpleNamespace(datalist=datalist[::-1], request={"val_split": split})  # saved in any order
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "served.pt"))
    train, val = trainer.partition_datalist(context)  # type: ignore[arg-type]
    assert [Path(d["image"]).name.split(".")[0] for d in val] == validating
    assert sorted(d["image"] for d in train + val) == sorted(d["image"] for d in datalist)


@pytest.mark.parametrize(("poison", "published"), [(None, True), (float("nan"), False), (float("inf"), False)])
def test_a_best_checkpoint_with_non_finite_weights_is_not_published(tmp_path: Path, poison, published: bool) -> None:
    served = tmp_path / "served.pt"
    served.write_bytes(b"the weights served now")
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(served))
    run = tmp_path / "run" / "train_01"
    run.mkdir(parents=True)
    state = HIPPOCAMPUS.network().state_dict()
    if poison is not None:
        next(v for v in state.values() if v.is_floating_point()).view(-1)[3] = poison
    torch.save(state, run / "model.pt")
    assert trainer._publish_best(SimpleNamespace(output_dir=str(run)), {}) is published  # type: ignore[arg-type]
    if published:
        assert load_state_dict(served).keys() == state.keys()
    else:
        assert served.read_bytes() == b"the weights served now"


def test_the_409_check_stops_at_the_first_label_the_model_trains_on(tmp_path: Path, monkeypatch) -> None:
    """It runs in the request: one label of the model is enough, the others are not read."""
    import radiology.train

    cases = [{"image": str(c.image), "label": str(c.label)} for c in phantom_cases(tmp_path, 3)]
    checked = []
    judge = radiology.train.not_training_data
    monkeypatch.setattr(radiology.train, "not_training_data", lambda *a: checked.append(a[3]) or judge(*a))
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "s.pt"))
    assert trainer.no_training_data(_Cases(cases)) is None  # type: ignore[arg-type]
    assert checked == [cases[0]["label"]]
    assert trainer.pre_process({}, _Cases(cases)) == cases  # type: ignore[arg-type]
    assert len(checked) == 4


def test_a_failed_run_is_recorded_as_the_last_run(tmp_path: Path, monkeypatch) -> None:
    """/info's train_stats shows the last run's outcome; a run that raised used to leave the one before."""
    from monailabel.tasks.train.basic_train import BasicTrainTask

    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "s.pt"))
    trainer._record({"published": True, "best_val_dice": 0.9})  # an earlier, completed run

    def fails(*args, **kwargs):
        raise RuntimeError("index 3 is out of bounds for dimension 1 with size 3")

    monkeypatch.setattr(BasicTrainTask, "train", fails)
    with pytest.raises(RuntimeError, match="index 3"):
        trainer.train(0, 1, {"name": "train_01"}, [])
    assert {k: v for k, v in trainer.stats()["last_run"].items() if k != "at"} == {
        "published": False,
        "failed": "RuntimeError: index 3 is out of bounds for dimension 1 with size 3",
    }


def test_a_stop_after_the_run_recorded_its_outcome_keeps_it(tmp_path: Path) -> None:
    # DELETE /train/ while the training process rescores after publishing: the run's last_run stays.
    trainer = SegmentationTrainer(HIPPOCAMPUS, str(tmp_path / "run"), str(tmp_path / "s.pt"))
    started = time.time() - 5
    trainer._record({"published": True})
    trainer.record_stopped("stopped by DELETE /train/", unless_recorded_since=started)
    assert trainer.stats()["last_run"]["published"] is True
    trainer.record_stopped("stopped by DELETE /train/", unless_recorded_since=time.time() + 5)  # a later run
    assert trainer.stats()["last_run"]["stopped"] == "stopped by DELETE /train/"
