"""organs_ct learns from one real CT: its organs, and the spleen of a CT it never saw."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.utils import set_determinism

from appcore.app import request_files
from radiology.registry import MODELS
from research.radiology.label_mapping import load_class_map, remap_by_name
from tests.apps import make_app
from tests.conftest import SPLEEN, TOTALSEG, dice, requires_shared

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
    # Measured on this machine (seed 0, 250 epochs; 2026-12-07): liver 0.957, spleen 0.945, kidneys
    # 0.879 and 0.853, stomach 0.866, gallbladder 0.695, aorta 0.619, pancreas 0.600 (an earlier
    # code version: liver 0.93, spleen 0.93, stomach 0.81, kidneys 0.73 and 0.71, the rest under
    # 0.5). Margins of about 0.1 below the lower of the two runs allow for other CPUs, where the
    # seeded run is not bit-for-bit the same; a regression that halves what one CT teaches fails.
    assert scores["liver"] > 0.85, scores
    assert scores["spleen"] > 0.8, scores
    assert sum(d > 0.5 for d in scores.values()) >= 5, scores

    # The same weights on a CT they never saw (MSD spleen_2: another scanner, contrast-enhanced,
    # labelled by other people): what one labelled CT teaches the server carries over, measured.
    unseen = SPLEEN / "imagesTr" / "spleen_2.nii.gz"
    with request_files({str(unseen)}):
        other = app.infer({"model": "organs_ct", "image": str(unseen), "device": "cpu"})
    spleen_pred = np.asarray(nib.load(other["file"]).dataobj) == labels.by_name("spleen").id
    spleen_truth = np.asarray(nib.load(SPLEEN / "labelsTr" / "spleen_2.nii.gz").dataobj) > 0
    unseen_dice = dice(spleen_pred, spleen_truth)
    # Measured 0.705 (2026-12-07). One unseen case from another scanner varies more between runs
    # than the trained CT does: margin 0.15. Untrained, the answer is empty (Dice 0).
    assert unseen_dice > 0.55, f"spleen Dice on the unseen spleen_2: {unseen_dice:.3f}"
