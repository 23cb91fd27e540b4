"""Does the per-volume inference window change what a trained organs_ct finds? ``--help``.

Trains ``organs_ct`` through the app on one real CT (``totalseg_ct/example_ct_sm``, seeded, as
``tests/test_organs_ct_learns.py`` does), then infers that CT with the training patch as window
(``max_window_scale`` 1) and with the per-volume window (the default), and prints Dice per organ for
both, plus the share of voxels on which the two labels agree. A check that serving is unchanged in
effect, not an accuracy claim (the CT it scores is the one it trained on).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.utils import set_determinism

from radiology.app import RadiologyApp
from radiology.infer import SegmentationInfer
from radiology.label_mapping import load_class_map, remap_by_name
from radiology.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--epochs", type=int, default=250)
    args = parser.parse_args(argv)
    totalseg = args.shared / "totalseg_ct"
    spec = MODELS["organs_ct"]
    root = Path(tempfile.mkdtemp(prefix="window-check-"))
    studies = root / "studies"
    studies.mkdir()
    image = studies / "example_ct_sm.nii.gz"
    shutil.copyfile(totalseg / "example_ct_sm.nii.gz", image)
    seg = nib.load(totalseg / "example_seg.nii.gz")
    truth = remap_by_name(np.asarray(seg.dataobj), load_class_map(totalseg / "class_map.json"), spec.labels)
    label = root / "label.nii.gz"
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), seg.affine), label)

    conf = {"models": "organs_ct", "score_on_start": "false", "score_after_train": "false"}
    app = RadiologyApp(str(root / "app"), str(studies), conf)
    app.datastore().save_label("example_ct_sm", str(label), "final", {"model": "organs_ct"})
    set_determinism(seed=0)
    app.train({"model": "organs_ct", "max_epochs": args.epochs, "train_batch_size": 4, "device": "cpu"})
    weights = app.published_weights("organs_ct")

    preds = {}
    for scale in (1.0, spec.max_window_scale):
        task = SegmentationInfer(dataclasses.replace(spec, max_window_scale=scale), [str(weights)])
        out, _ = task({"image": str(image), "device": "cpu"})
        preds[scale] = np.asarray(nib.load(out).dataobj)
        Path(out).unlink()
        scores = {lab.name: round(dice(preds[scale] == lab.id, truth == lab.id), 3) for lab in spec.labels}
        print(f"max_window_scale {scale}: Dice {scores}")
    a, b = preds.values()
    print(f"voxels with the same label: {float((a == b).mean()):.4f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
