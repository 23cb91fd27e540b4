"""One contract test per registered model: listed, infers on the right grid, trains, serves the result.

Each model runs it twice: on a phantom built from its ``ModelSpec`` (its modality's intensities, its
spacing and ROI, a blob per label; always runs), and on two real cases (``tests/apps.py``; the
slow tier, where ``../shared/data`` is present).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from appcore.weights import load_state_dict
from radiology.app import RadiologyApp
from radiology.registry import MODELS
from radiology.spec import ModelSpec
from tests.apps import CASES, make_app, unwatched_app
from tests.conftest import requires_shared


def phantom(spec: ModelSpec, seed: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """An image and its label for ``spec``: one ROI at its spacing, on an oblique LPS grid, with a
    blob per label in intensities of its modality (CT: Hounsfield units as int16, MR: positive)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(r) for r in spec.roi_size)
    label = np.zeros(shape, np.uint8)
    ids = list(spec.labels.ids)
    for i, label_id in enumerate(ids):  # blobs side by side along the first axis, inside the volume
        lo = [s // 4 for s in shape]
        hi = [3 * s // 4 for s in shape]
        width = max(2, (hi[0] - lo[0]) // len(ids))
        label[lo[0] + i * width : lo[0] + (i + 1) * width, lo[1] : hi[1], lo[2] : hi[2]] = label_id
    if spec.modality == "CT":
        body = np.full(shape, 40.0)
        body[:2], body[-2:] = -1000.0, -1000.0  # air at two sides
        image = (body + 30.0 * label + rng.normal(0, 15, shape)).astype(np.int16)
    else:
        image = (100.0 + 80.0 * label + rng.normal(0, 10, shape)).astype(np.float32)
    affine = np.diag([-spec.spacing[0], -spec.spacing[1], spec.spacing[2], 1.0])
    affine[:3, 3] = (12.0, -7.0, 3.0)
    return nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_contract_on_a_phantom(tmp_path: Path, model: str) -> None:
    spec = MODELS[model]
    studies, incoming = tmp_path / "studies", tmp_path / "incoming"
    studies.mkdir()
    incoming.mkdir()
    for i in range(2):
        image, label = phantom(spec, i)
        nib.save(image, studies / f"phantom_{i}.nii.gz")
        nib.save(label, incoming / f"phantom_{i}.nii.gz")
    conf = {"models": model, "score_on_start": "false", "score_after_train": "false", "score_new_images": "false"}
    app = unwatched_app(tmp_path / "app", studies, conf, RadiologyApp)
    app.datastore().save_label("phantom_0", str(incoming / "phantom_0.nii.gz"), "final", {"model": model})
    _check_contract(app, spec, model, "phantom_1", nib.load(studies / "phantom_1.nii.gz"))


@requires_shared
@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_contract(tmp_path: Path, model: str) -> None:
    assert model in CASES, f"add two real cases for {model!r} to tests/apps.py"
    app = make_app(tmp_path, model, labelled=2)
    image_id = CASES[model][1][0].name.split(".")[0]
    _check_contract(app, MODELS[model], model, image_id, nib.load(CASES[model][1][0]))


def _check_contract(app: RadiologyApp, spec: ModelSpec, model: str, image_id: str, source: nib.Nifti1Image) -> None:
    """Listed in /info; infer answers on ``source``'s grid (datastore image ``image_id``); one tiny
    training epoch publishes weights, and the next infer serves exactly them."""
    info = app.info()
    assert model in info["models"] and model in info["trainers"]
    assert info["models"][model]["labels"] == spec.labels.name_to_id()
    assert set(info["strategies"]) >= {"random", "epistemic"} and "epistemic" in info["scoring"]

    first = app.infer({"model": model, "image": image_id, "device": "cpu"})
    out = nib.load(first["file"])
    assert out.shape == source.shape[:3]
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= spec.labels.allowed_values
    shipped = spec.shipped_weights_path is not None
    assert first["params"]["model_trained"] is shipped

    served = app.published_weights(model)
    assert not served.exists()
    stats = app.train({"model": model, "max_epochs": 1, "train_batch_size": 2, "device": "cpu"})
    assert stats["epoch"] == 1
    assert served.exists(), "a completed run publishes its weights"

    second = app.infer({"model": model, "image": image_id, "device": "cpu"})
    assert second["params"]["model_trained"] is True
    network = app._infers[model]._get_network("cpu", None)
    published = load_state_dict(served)
    for key, value in network.state_dict().items():
        assert torch.equal(value.cpu(), published[key]), f"infer does not serve the new weights ({key})"
