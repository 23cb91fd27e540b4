"""bfloat16 on CPUs that compute it natively: when it is used, and that it changes neither labels nor rankings."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import appcore.precision as precision
from radiology.hippocampus import HIPPOCAMPUS
from radiology.infer import SegmentationInfer
from radiology.uncertainty import MCDropoutScorer
from research.radiology.offline import dice_per_class
from research.radiology.splits import msd_cases, split_cases
from tests.apps import make_app
from tests.conftest import HIPPO, requires_shared

requires_native_bf16 = pytest.mark.skipif(
    not precision.cpu_has_native_bf16(), reason="this CPU has no native bfloat16 (AMX or AVX512-BF16)"
)


@pytest.mark.parametrize(
    ("cpu_bf16", "native", "dtype"),
    [
        (True, True, torch.bfloat16),
        (True, False, torch.float32),  # emulated bfloat16 would be slower than float32
        (False, True, torch.float32),  # --conf cpu_bf16 false
        (False, False, torch.float32),
    ],
)
def test_cpu_autocast_follows_flag_and_hardware(monkeypatch, cpu_bf16: bool, native: bool, dtype) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    conv = torch.nn.Conv3d(1, 2, 3)
    with torch.no_grad(), precision.autocast("cpu", cpu_bf16=cpu_bf16):
        out = conv(torch.ones(1, 1, 4, 4, 4))
    assert out.dtype == dtype


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda", 0)])
def test_cuda_always_gets_float16_autocast(device) -> None:
    ctx = precision.autocast(device, cpu_bf16=False)
    assert isinstance(ctx, torch.autocast)
    assert (ctx.device, ctx.fast_dtype) == ("cuda", torch.float16)


@pytest.mark.parametrize(
    ("cpu_bf16", "native", "dtype"),
    [(True, True, torch.bfloat16), (True, False, torch.float32), (False, True, torch.float32)],
)
def test_training_autocast_on_the_cpu_follows_flag_and_hardware(monkeypatch, cpu_bf16, native, dtype) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with precision.training_autocast("cpu", cpu_bf16=cpu_bf16):
        out = torch.nn.Conv3d(1, 2, 3)(torch.ones(1, 1, 4, 4, 4))
    assert out.dtype == dtype


def test_training_autocast_on_cuda_is_bfloat16_needing_no_scaler() -> None:
    ctx = precision.training_autocast("cuda", cpu_bf16=False)
    assert isinstance(ctx, torch.autocast)
    assert (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16)


def test_native_probe_agrees_with_the_cpu_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(cpuinfo.read_text().split())
    expected = torch.backends.mkldnn.is_available() and bool(flags & {"amx_tile", "avx512_bf16"})
    assert precision.cpu_has_native_bf16() is expected


@requires_shared
def test_conf_cpu_bf16_reaches_infer_and_scoring(tmp_path: Path) -> None:
    on = make_app(tmp_path / "on", "hippocampus", labelled=0)
    off = make_app(tmp_path / "off", "hippocampus", labelled=0, conf={"cpu_bf16": "false"})
    for app, flag in ((on, True), (off, False)):
        assert app._infers["hippocampus"]._cpu_bf16 is flag
        assert app._scoring_methods["epistemic"]._make_scorer().cpu_bf16 is flag


@requires_shared
@requires_native_bf16
def test_bf16_infer_gives_the_float32_labels_on_real_cases() -> None:
    cases = split_cases(msd_cases(HIPPO))["test"][:3]
    tasks = [SegmentationInfer(HIPPOCAMPUS, [str(HIPPOCAMPUS.shipped_weights_path)], cpu_bf16=f) for f in (False, True)]
    for case in cases:
        truth = np.rint(np.asarray(nib.load(case.label).dataobj)).astype(np.int64)
        preds = []
        for task in tasks:
            out, _ = task({"image": str(case.image), "device": "cpu", "logging": "WARNING"})
            preds.append(np.asarray(nib.load(out).dataobj))
            Path(out).unlink(missing_ok=True)
        f32, bf16 = preds
        foreground = (f32 > 0) | (bf16 > 0)
        # Voxels that change class are a sliver of the boundary, not a different segmentation.
        assert np.mean(f32[foreground] == bf16[foreground]) >= 0.99, case.id
        d32, d16 = (np.mean(list(dice_per_class(p, truth, HIPPOCAMPUS.labels.ids).values())) for p in preds)
        assert abs(d32 - d16) < 0.005, (case.id, d32, d16)


@requires_shared
@requires_native_bf16
def test_bf16_scores_match_float32_under_the_same_dropout_masks() -> None:
    image = str(split_cases(msd_cases(HIPPO))["test"][0].image)
    weights = [str(HIPPOCAMPUS.shipped_weights_path)]
    scores = []
    for flag in (False, True):
        torch.manual_seed(0)  # the same dropout masks in both precisions
        scores.append(MCDropoutScorer(HIPPOCAMPUS, weights, samples=8, tta_samples=4, cpu_bf16=flag).score(image))
    f32, bf16 = scores
    assert f32["bald"] > 1e-3  # about 0.03: the passes really sample dropout (about 2e-8 with it off)
    for measure in ("entropy", "bald", "tta"):
        # Other masks move bald by about 20%; the same masks in bfloat16 by under 1%.
        assert bf16[measure] == pytest.approx(f32[measure], rel=0.03), measure
    assert all(isinstance(v, float) for v in bf16["embedding"])
    assert np.corrcoef(f32["embedding"], bf16["embedding"])[0, 1] > 0.99
