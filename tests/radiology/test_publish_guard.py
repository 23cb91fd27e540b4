"""A training run publishes only an epoch that validates better than the weights it started from."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from radiology.app import RadiologyApp
from radiology.train import SegmentationTrainer
from tests.apps import unwatched_app
from tests.conftest import HIPPO, requires_shared

pytestmark = [requires_shared, pytest.mark.slow]

SOURCE = "hippocampus_001"


def app_over_copies(root: Path, copies: int) -> RadiologyApp:
    """An app serving ``hippocampus`` over ``copies`` copies of one real case, each saved with its label.

    With five or more labels a run validates on the last one (``val_split`` 0.2), which is then the
    very image it trains on: fine-tuning on it can only help there.
    """
    studies = root / "studies"
    studies.mkdir(parents=True)
    ids = [f"case{i}" for i in range(copies)]
    for image_id in ids:
        shutil.copyfile(HIPPO / "imagesTr" / f"{SOURCE}.nii.gz", studies / f"{image_id}.nii.gz")
    settings = {
        "models": "hippocampus",
        "score_on_start": "false",
        "score_after_train": "false",
        "score_new_images": "false",
    }
    app = unwatched_app(root / "app", studies, settings)
    for image_id in ids:
        app.datastore().save_label(image_id, str(HIPPO / "labelsTr" / f"{SOURCE}.nii.gz"), "final", {})
    return app


def test_a_run_whose_epochs_all_validate_worse_keeps_the_served_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A learning rate that wrecks the network at the first step: every epoch validates worse.
    monkeypatch.setattr(
        SegmentationTrainer, "optimizer", lambda self, context: torch.optim.SGD(context.network.parameters(), lr=50.0)
    )
    app = app_over_copies(tmp_path, 6)
    # The last copy's file is then written over on another grid: its label is left out, and says why.
    moved = Path(app.datastore().get_image_uri("case5"))
    image = nib.load(moved)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-2], image.affine), moved)
    served = app.published_weights("hippocampus")
    with caplog.at_level(logging.INFO, logger="radiology.train"):
        result = app.train({"model": "hippocampus", "max_epochs": 2, "train_batch_size": 2, "device": "cpu"})
    assert result["eval"]["best_metric_epoch"] == 0, "the starting weights are epoch 0 and stayed the best"
    assert not served.exists(), "nothing is published: the shipped weights are still served"
    assert "served weights unchanged" in caplog.text
    last = app._trainers["hippocampus"].stats()["last_run"]
    assert last["published"] is False and last["best_val_dice"] == last["start_val_dice"] > 0.8
    assert (last["trained_on"], last["validated_on"], last["skipped_count"]) == (4, 1, 1), last
    assert list(last["skipped"]) == ["case5"] and "no longer lies on its image's grid" in last["skipped"]["case5"]
    assert result["eval"]["metrics"]["val_mean_dice"] < 0.5, "the last epoch validated far worse"
    r = app.infer({"model": "hippocampus", "image": "case0", "device": "cpu"})
    assert r["params"]["model_trained"] is True


def test_a_run_with_a_better_epoch_publishes_it(tmp_path: Path, seeded: None) -> None:
    app = app_over_copies(tmp_path, 5)
    served = app.published_weights("hippocampus")
    result = app.train({"model": "hippocampus", "max_epochs": 12, "train_batch_size": 4, "device": "cpu"})
    last = app._trainers["hippocampus"].stats()["last_run"]
    assert result["eval"]["best_metric_epoch"] >= 1
    assert last["published"] is True and last["best_val_dice"] > last["start_val_dice"]
    assert served.exists()


def test_with_nothing_to_validate_on_a_completed_run_publishes_as_before(tmp_path: Path) -> None:
    app = app_over_copies(tmp_path, 2)  # under 5 labels: no validation images
    result = app.train({"model": "hippocampus", "max_epochs": 1, "train_batch_size": 2, "device": "cpu"})
    assert not result.get("eval")
    assert app.published_weights("hippocampus").exists()
    last = app._trainers["hippocampus"].stats()["last_run"]
    assert {k: v for k, v in last.items() if k != "at"} == {
        "published": True,
        "start_val_dice": None,
        "trained_on": 2,
        "validated_on": 0,
        "skipped": {},
        "skipped_count": 0,
        "version": 1,
    }
    assert abs(last["at"] - time.time()) < 600, "when the run recorded its outcome"
    # The published weights are version 1, which says what it was trained on and started from.
    (record,) = [r for r in app.version_store("hippocampus").versions() if r["version"] == 1]
    assert record["served"] and record["source"] == "training" and record["parent"] == 0
    assert record["trained_images"] == ["case0", "case1"] and record["validated_images"] == []
    assert record["started_by"] == "anonymous"


def test_validation_labels_without_foreground_keep_the_served_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # MONAI scores every prediction 0 against an empty label: no epoch can beat what is served.
    app = app_over_copies(tmp_path, 5)
    empty = tmp_path / "empty.nii.gz"
    source = nib.load(HIPPO / "labelsTr" / f"{SOURCE}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(source.shape, np.uint8), source.affine), empty)
    for i in range(5):
        app.datastore().save_label(f"case{i}", str(empty), "final", {})
    with caplog.at_level(logging.INFO, logger="radiology.train"):
        app.train({"model": "hippocampus", "max_epochs": 1, "train_batch_size": 2, "device": "cpu"})
    assert not app.published_weights("hippocampus").exists()
    assert "No epoch beat the weights the run started from" in caplog.text
    last = app._trainers["hippocampus"].stats()["last_run"]
    assert last["published"] is False and last["start_val_dice"] == last["best_val_dice"] == 0.0
