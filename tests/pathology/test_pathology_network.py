"""The shipped nuclei network on its own, on the CPU and, where there is one, on CUDA.

Nothing here imports MONAI Label, so these tests also run under a bare CUDA Python with MONAI
(the lent GPU machine: ``benchmarks/gpu_session.sh pathology``, kept at commit 1fb81a5). The app's contract is in
``tests/pathology/test_pathology_contract.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pathology.weights
from pathology.data import HELD_OUT, cpm_tiles
from pathology.predict import predict_instances
from pathology.spec import NUCLEI
from pathology.weights import load_network
from research.pathology.metrics import aji, dice
from tests.conftest import SHARED

CPM = SHARED / "pathology" / "nuclei_cpm15"
requires_pathology = pytest.mark.skipif(not (CPM / "images").exists(), reason=f"real tiles {CPM} are absent")

# Measured on this held-out tile with the shipped weights (model card): Dice 0.894, AJI 0.677.
CONTRACT_TILE, MIN_DICE, MIN_AJI = "image04", 0.87, 0.65


def test_shipped_weights_are_small_and_load() -> None:
    path = NUCLEI.shipped_weights_path
    assert path.exists(), (
        "pathology/weights/nuclei.pt is missing: train it with python -m research.pathology.offline train"
    )
    assert path.stat().st_size <= 25 * 2**20
    load_network(NUCLEI, path)


@requires_pathology
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is checked where there is one")
def test_on_cuda_the_served_network_segments_as_on_the_cpu() -> None:
    tile = cpm_tiles(CPM, (CONTRACT_TILE,))[0]
    cpu = predict_instances(load_network(NUCLEI, NUCLEI.shipped_weights_path), NUCLEI, tile.image)
    network = load_network(NUCLEI, NUCLEI.shipped_weights_path, pathology.weights.serving_device())
    assert next(network.parameters()).is_cuda
    gpu = predict_instances(network, NUCLEI, tile.image)  # float16 autocast
    assert dice(gpu, tile.mask) >= MIN_DICE and dice(gpu > 0, cpu > 0) >= 0.98


@requires_pathology
def test_shipped_weights_on_a_held_out_tile() -> None:
    assert CONTRACT_TILE in HELD_OUT
    tile = cpm_tiles(CPM, (CONTRACT_TILE,))[0]
    pred = predict_instances(load_network(NUCLEI, NUCLEI.shipped_weights_path), NUCLEI, tile.image)
    assert pred.shape == tile.mask.shape
    assert dice(pred, tile.mask) >= MIN_DICE
    assert aji(pred, tile.mask) >= MIN_AJI


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: its training unchecked"),
        ),
    ],
)
@requires_pathology
def test_a_few_training_steps_from_the_shipped_weights(device: str) -> None:
    from pathology.training import Example, train_steps

    tile = cpm_tiles(CPM, (CONTRACT_TILE,))[0]
    network = load_network(NUCLEI, NUCLEI.shipped_weights_path, device)
    example = Example.of(tile.image, tile.mask)
    losses = train_steps(network, NUCLEI, [example], steps=3, batch_size=2, lr=1e-5, seed=0, device=device)
    assert len(losses) == 3 and all(np.isfinite(losses)) and max(losses) < 2.0, losses
    assert all(p.device.type == device for p in network.parameters())
