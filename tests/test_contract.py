"""One contract test per registered model: listed, infers on the right grid, trains, serves the result."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from appcore.weights import load_state_dict
from radiology.registry import MODELS
from tests.apps import CASES, make_app
from tests.conftest import requires_shared

pytestmark = [requires_shared, pytest.mark.slow]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_contract(tmp_path: Path, model: str) -> None:
    assert model in CASES, f"add two real cases for {model!r} to tests/apps.py"
    app = make_app(tmp_path, model, labelled=2)
    spec = MODELS[model]

    info = app.info()
    assert model in info["models"] and model in info["trainers"]
    assert info["models"][model]["labels"] == spec.labels.name_to_id()
    assert set(info["strategies"]) >= {"random", "epistemic"} and "epistemic" in info["scoring"]

    image_id = CASES[model][1][0].name.split(".")[0]
    source = nib.load(CASES[model][1][0])
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
