"""organs_ct starts untrained; after brief training on one real CT it finds that CT's organs."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.utils import set_determinism

from radiology.label_mapping import load_class_map, remap_by_name
from radiology.registry import MODELS
from tests.apps import make_app
from tests.conftest import TOTALSEG, dice, requires_shared

pytestmark = [requires_shared, pytest.mark.slow]

EPOCHS = int(os.environ.get("ORGANS_CT_TEST_EPOCHS", "250"))


def test_training_on_one_real_ct_makes_predictions_overlap_its_labels(tmp_path: Path, seeded: None) -> None:
    app = make_app(tmp_path, "organs_ct", labelled=1)  # example_ct_sm with TotalSegmentator labels
    untrained = app.infer({"model": "organs_ct", "image": "example_ct_sm", "device": "cpu"})
    assert untrained["params"]["model_trained"] is False
    assert not np.asarray(nib.load(untrained["file"]).dataobj).any(), "untrained answers an empty label"

    # Seeded: 150 unseeded epochs passed twice and once left the spleen at 0 (liver 0.68). Seeded
    # again here, where the figures below were measured (the fixture unseeds after the test).
    set_determinism(seed=0)
    app.train({"model": "organs_ct", "max_epochs": EPOCHS, "train_batch_size": 4, "device": "cpu"})
    result = app.infer({"model": "organs_ct", "image": "example_ct_sm", "device": "cpu"})
    pred = np.asarray(nib.load(result["file"]).dataobj)

    truth_img = nib.load(TOTALSEG / "example_seg.nii.gz")
    truth = remap_by_name(
        np.asarray(truth_img.dataobj), load_class_map(TOTALSEG / "class_map.json"), MODELS["organs_ct"].labels
    )
    labels = MODELS["organs_ct"].labels
    scores = {lab.name: dice(pred == lab.id, truth == lab.id) for lab in labels if (truth == lab.id).any()}
    print("Dice after", EPOCHS, "epochs:", {k: round(v, 3) for k, v in scores.items()})
    # Measured on this machine (seed 0, 250 epochs, about 345 s): liver 0.93, spleen 0.93, stomach
    # 0.81, kidneys 0.73 and 0.71, pancreas 0.48, gallbladder 0.09, aorta 0.02. Margins allow for
    # other CPUs, where the seeded run is not bit-for-bit the same.
    assert scores["liver"] > 0.7, scores
    assert scores["spleen"] > 0.4, scores
    assert sum(d > 0.2 for d in scores.values()) >= 3, scores
