"""Helpers that build a radiology app in-process on a temporary copy of real studies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
from monailabel.config import settings as ml_settings
from monailabel.interfaces.app import MONAILabelApp

from radiology.app import RadiologyApp
from radiology.registry import MODELS
from research.radiology.label_mapping import load_class_map, remap_by_name
from tests.conftest import HIPPO, SPLEEN, TOTALSEG

A = TypeVar("A", bound=MONAILabelApp)

# Two real labelled volumes per model: (image, label, how to map label values onto the model's ids).
CASES = {
    "hippocampus": [
        (HIPPO / "imagesTr" / "hippocampus_001.nii.gz", HIPPO / "labelsTr" / "hippocampus_001.nii.gz", None),
        (HIPPO / "imagesTr" / "hippocampus_003.nii.gz", HIPPO / "labelsTr" / "hippocampus_003.nii.gz", None),
    ],
    "organs_ct": [
        (TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "example_seg.nii.gz", TOTALSEG / "class_map.json"),
        (SPLEEN / "imagesTr" / "spleen_2.nii.gz", SPLEEN / "labelsTr" / "spleen_2.nii.gz", None),
    ],
}


def model_label(model: str, label: Path, class_map: Path | None, dest: Path) -> Path:
    """The case's label with values in ``model``'s ids, written next to ``dest``."""
    img = nib.load(label)
    data = np.rint(np.asarray(img.dataobj)).astype(np.int64)
    if class_map is not None:
        data = remap_by_name(data, load_class_map(class_map), MODELS[model].labels)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), img.affine), dest)
    return dest


def unwatched_app(
    app_dir: Path | str,
    studies: Path | str,
    conf: dict[str, str],
    app_class: type[A] = RadiologyApp,  # type: ignore[assignment]
) -> A:
    """An app (``RadiologyApp`` unless ``app_class`` says otherwise) without MONAI Label's folder
    watcher: tests refresh the datastore themselves, and a watcher thread refreshing at the same
    moment races them (and outlives the temporary folder, holding one of the user's inotify
    instances, of which there are 128 by default)."""
    watching, ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD, False
    try:
        return app_class(str(app_dir), str(studies), conf)
    finally:
        ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = watching


def make_app(root: Path, model: str, *, labelled: int, conf: dict[str, str] | None = None) -> RadiologyApp:
    """An app serving ``model`` over the two real cases of CASES, the first ``labelled`` of them labelled."""
    studies, app_dir, tmp = root / "studies", root / "app", root / "incoming"
    for d in (studies, app_dir, tmp):
        d.mkdir(parents=True, exist_ok=True)
    ids = []
    for image, _, _ in CASES[model]:
        shutil.copyfile(image, studies / image.name)
        ids.append(image.name.split(".")[0])
    settings = {"models": model, "score_on_start": "false", "score_after_train": "false", "score_new_images": "false"}
    app = unwatched_app(app_dir, studies, {**settings, **(conf or {})})
    for image_id, (_, label, class_map) in list(zip(ids, CASES[model], strict=True))[:labelled]:
        converted = model_label(model, label, class_map, tmp / f"{image_id}.nii.gz")
        app.datastore().save_label(image_id, str(converted), "final", {"model": model})
    return app
