"""Exported MONAI Bundles: run by MONAI's own runner, they answer what the server answers."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from appcore.errors import RequestError
from appcore.versions import store_beside
from appcore.weights import save_weights_atomically
from pathology.export import main as pathology_main
from radiology import export as radiology_export
from radiology.infer import SegmentationInfer
from radiology.registry import MODELS
from research.radiology.splits import msd_cases, split_cases
from tests.conftest import HIPPO, SHARED, requires_shared, write_nifti
from tests.servers import monailabel_server

TILE = SHARED / "pathology" / "nuclei_cpm15" / "images" / "image04.png"  # a held-out tile, 623 x 493
AGREEMENT = 0.999  # the share of voxels (pixels) where the bundle's answer must equal the server's


def run_bundle(bundle: Path, inputs: Path, out: Path) -> None:
    """MONAI's runner, exactly as a user runs an exported bundle (in the bundle's folder)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    command += ["--meta_file", "configs/metadata.json", "--bundle_root", str(bundle)]
    command += ["--dataset_dir", str(inputs), "--output_dir", str(out)]
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a == b).mean())


def unzip(content: bytes, into: Path) -> None:
    zipfile.ZipFile(io.BytesIO(content)).extractall(into)


@requires_shared
def test_hippocampus_bundle_answers_as_the_server(tmp_path: Path) -> None:
    cases = split_cases(msd_cases(HIPPO))["test"][:2]  # held-out cases
    studies, inputs = tmp_path / "studies", tmp_path / "in"
    studies.mkdir()
    inputs.mkdir()
    for case in cases:
        shutil.copyfile(case.image, studies / case.image.name)
        shutil.copyfile(case.image, inputs / case.image.name)
    conf = {"models": "hippocampus", "score_on_start": "false"}  # cpu_bf16 as served by default
    answers = {}
    with monailabel_server(tmp_path, str(studies), conf) as server:
        for case in cases:
            r = server.http.post("/infer/hippocampus", params={"image": case.id, "output": "image"})
            assert r.status_code == 200, r.text
            (tmp_path / f"{case.id}_server.nii.gz").write_bytes(r.content)
            answers[case.id] = np.asarray(nib.load(tmp_path / f"{case.id}_server.nii.gz").dataobj)
        r = server.http.get("/model/hippocampus", params={"format": "bundle"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
    unzip(r.content, tmp_path / "export")
    bundle, out = tmp_path / "export" / "hippocampus", tmp_path / "out"
    run_bundle(bundle, inputs, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c.id}_seg.nii.gz" for c in cases)
    for case in cases:
        written = nib.load(out / f"{case.id}_seg.nii.gz")
        assert np.allclose(written.affine, nib.load(case.image).affine, atol=1e-4)
        share = agreement(np.asarray(written.dataobj), answers[case.id])
        print(f"bundle vs server, hippocampus {case.id}: {share:.6f} of voxels equal")
        assert share >= AGREEMENT


@pytest.mark.skipif(not TILE.exists(), reason=f"real pathology tile {TILE} is absent")
def test_nuclei_bundle_answers_as_the_server(tmp_path: Path) -> None:
    studies, inputs = tmp_path / "studies", tmp_path / "in"
    studies.mkdir()
    inputs.mkdir()
    shutil.copyfile(TILE, studies / TILE.name)
    shutil.copyfile(TILE, inputs / TILE.name)
    with monailabel_server(tmp_path, str(studies), {"score_on_start": "false"}, app="pathology") as server:
        r = server.http.post("/infer/nuclei", params={"image": TILE.stem, "output": "image"})
        assert r.status_code == 200, r.text
        answer = np.asarray(Image.open(io.BytesIO(r.content)))
        r = server.http.get("/model/nuclei", params={"format": "bundle"})
        assert r.status_code == 200, r.text
    unzip(r.content, tmp_path / "export")
    out = tmp_path / "out"
    run_bundle(tmp_path / "export" / "nuclei", inputs, out)
    written = np.asarray(Image.open(out / f"{TILE.stem}_seg.png"))
    assert written.dtype == np.uint16 and answer.max() > 50, "a 16-bit instance mask with the tile's nuclei"
    share = agreement(written, answer)  # instance ids too, not only the foreground
    print(f"bundle vs server, nuclei {TILE.name}: {share:.6f} of pixels equal ({int(answer.max())} nuclei)")
    assert share >= AGREEMENT


def _ct_phantom(path: Path) -> Path:
    """A CT-like volume in Hounsfield units, LPS-oriented and anisotropic (the grid is inverted on output)."""
    rng = np.random.default_rng(1)
    data = rng.normal(-800, 30, (70, 60, 24)).astype(np.float32)
    data[15:50, 10:45, 4:20] = rng.normal(60, 20, (35, 35, 16))
    return write_nifti(path, data, np.diag([-1.6, -1.6, 4.0, 1.0]))


def test_organs_ct_version_exports_and_runs(tmp_path: Path) -> None:
    # organs_ct ships no weights: a version published on the server (here seeded weights, as an
    # upload makes one) is exported; mechanics only, on a phantom.
    spec = MODELS["organs_ct"]
    torch.manual_seed(0)
    state = spec.network().state_dict()
    store = store_beside(tmp_path / "app" / "model" / "organs_ct.pt", "organs_ct", None)
    record = store.publish(lambda p: save_weights_atomically(state, p), {"source": "upload", "started_by": "carol"})
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = _ct_phantom(inputs / "ct.nii.gz")
    argv = ["organs_ct", "--version", str(record["version"]), "--app-dir", str(tmp_path / "app")]
    assert radiology_export.main([*argv, "--out", str(tmp_path / "bundle")]) == 0
    run_bundle(tmp_path / "bundle", inputs, tmp_path / "out")
    written = np.asarray(nib.load(tmp_path / "out" / "ct_seg.nii.gz").dataobj)
    served, _ = SegmentationInfer(spec, [str(store.published)], cpu_bf16=False)({"image": str(image), "device": "cpu"})
    assert agreement(written, np.asarray(nib.load(served).dataobj)) >= AGREEMENT

    metadata = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert [(label["name"], label["id"]) for label in metadata["labels"]] == [(lb.name, lb.id) for lb in spec.labels]
    assert metadata["spacing_mm"] == [2.0, 2.0, 3.0] and metadata["modality"] == "CT"
    assert metadata["intensity"] == {"type": "ct_window", "low_hu": -175.0, "high_hu": 250.0, "scaled_to": [0.0, 1.0]}
    assert [(r["version"], r["started_by"]) for r in metadata["version_history"]] == [(1, "carol")]
    assert metadata["data_licence"] == [
        "uploaded or found weights: unknown training data and licence (ask who uploaded them)"
    ]

    # The TorchScript network computes what the network does.
    scripted = torch.jit.load(str(tmp_path / "bundle" / "models" / "model.ts"))
    network = spec.network()
    network.load_state_dict(state)
    x = torch.randn(1, 1, 64, 64, 48)
    with torch.no_grad():
        assert torch.allclose(scripted.eval()(x), network.eval()(x), atol=1e-5)


def test_ensemble_torchscript_averages_the_members(tmp_path: Path) -> None:
    spec = MODELS["hippocampus"]
    assert spec.members == 4 and spec.shipped_weights_path is not None
    store = store_beside(tmp_path / "model" / "hippocampus.pt", "hippocampus", spec.shipped_weights_path)
    radiology_export.export_bundle(spec, store, 0, tmp_path / "bundle")
    metadata = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert metadata["version_history"][0]["source"] == "shipped"
    assert metadata["data_licence"] == [f"shipped weights: {spec.training_data}"]
    config = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    assert config["network_def"]["_target_"] == "radiology.ensemble.MeanOfMembers"
    assert len(config["network_def"]["members"]) == 4
    scripted = torch.jit.load(str(tmp_path / "bundle" / "models" / "model.ts")).eval()
    network = spec.network()
    network.load_state_dict(torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 48, 64, 48)
    with torch.no_grad():
        assert torch.allclose(scripted(x), network.float().eval()(x), atol=1e-5)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--version", "3"], "has no version 3: unknown; versions with weights: \\[0\\]"),
        (["--out", "EXISTING"], "is not empty; give a new or empty folder"),
    ],
)
@pytest.mark.parametrize("package", ["radiology", "pathology"])
def test_export_command_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str, package: str
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "file").write_text("kept")
    args = [str(existing) if a == "EXISTING" else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "new")]
    with pytest.raises(SystemExit) as caught:
        model, main = ("hippocampus", radiology_export.main) if package == "radiology" else ("nuclei", pathology_main)
        main([model, "--app-dir", str(tmp_path / "app"), *args, *out])
    assert caught.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert (existing / "file").read_text() == "kept"


def test_write_bundle_refuses_removed_weights(tmp_path: Path) -> None:
    spec = MODELS["organs_ct"]
    store = store_beside(tmp_path / "model" / "organs_ct.pt", "organs_ct", None, keep=1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = spec.network().state_dict()
        store.publish(lambda p, s=state: save_weights_atomically(s, p), {"source": "upload"})
    with pytest.raises(RequestError, match="has no version 1: its weights were removed"):
        radiology_export.export_bundle(spec, store, 1, tmp_path / "bundle")


@requires_shared
def test_bundle_loads_in_monai_labels_bundle_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MONAI Label's ``monaibundle`` sample app serves a bundle through ``BundleInferTask``. Its module
    # imports torchvision (for drawing functions a segmentation never calls), which the CPU build of
    # torch here lacks: a stand-in module lets it import.
    for name in ("torchvision", "torchvision.utils"):
        stub = types.ModuleType(name)
        stub.make_grid = stub.save_image = stub.utils = None  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, stub)
    from monailabel.tasks.infer.bundle import BundleInferTask

    spec = MODELS["hippocampus"]
    store = store_beside(tmp_path / "model" / "hippocampus.pt", "hippocampus", spec.shipped_weights_path)
    bundle = radiology_export.export_bundle(spec, store, 0, tmp_path / "bundle")
    task = BundleInferTask(str(bundle), {})
    assert task.is_valid() and task.labels == {"anterior": 1, "posterior": 2}
    image = split_cases(msd_cases(HIPPO))["test"][0].image
    answer, _ = task({"image": str(image), "device": "cpu"})
    served, _ = SegmentationInfer(spec, [str(spec.shipped_weights_path)], cpu_bf16=False)(
        {"image": str(image), "device": "cpu"}
    )
    assert agreement(np.asarray(nib.load(answer).dataobj), np.asarray(nib.load(served).dataobj)) >= AGREEMENT


@pytest.mark.skipif(not TILE.exists(), reason=f"real pathology tile {TILE} is absent")
def test_nuclei_bundle_loads_in_monai_labels_bundle_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("torchvision", "torchvision.utils"):  # as above
        stub = types.ModuleType(name)
        stub.make_grid = stub.save_image = stub.utils = None  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, stub)
    from monailabel.tasks.infer.bundle import BundleInferTask

    from pathology import export as pathology_export
    from pathology.infer import NucleiInfer
    from pathology.registry import MODELS as PATHOLOGY

    spec = PATHOLOGY["nuclei"].spec
    store = store_beside(tmp_path / "model" / "nuclei.pt", "nuclei", spec.shipped_weights_path)
    task = BundleInferTask(str(pathology_export.export_bundle(spec, store, 0, tmp_path / "bundle")), {})
    assert task.is_valid() and task.labels == {"nucleus": 1} and task.dimension == 2
    # MONAI Label writes with ITK, whose PNG writer takes no 32-bit ids: the mask comes as NIfTI,
    # (1, width, height) as MONAI reads a PNG.
    answer, _ = task({"image": str(TILE), "device": "cpu", "result_extension": ".nii.gz"})
    served, _ = NucleiInfer(spec, [str(spec.shipped_weights_path)], name="nuclei")({"image": str(TILE)})
    mask = np.asarray(nib.load(answer).dataobj)[0].T
    assert agreement(mask, np.asarray(Image.open(served))) >= AGREEMENT
