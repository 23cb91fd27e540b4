"""Export a version of a radiology model as a MONAI Bundle (model-zoo layout) that MONAI's runner runs.

    python -m radiology.export hippocampus [--version N] [--app-dir apps/radiology] --out DIR
    cd DIR && python -m monai.bundle run --config_file configs/inference.json \\
        --meta_file configs/metadata.json --bundle_root DIR --dataset_dir IN --output_dir OUT

``inference.json`` runs the server's own pre-processing (``radiology.transforms.preprocess``: RAS,
the model's spacing, its intensity handling), network, sliding window (``ModelWindowInferer``) and
inversion onto the input's grid, and writes ``<image>_seg.nii.gz`` per input image. Its custom
pieces are this package's classes by ``_target_``, so the bundle runs where this project is
installed; ``models/model.ts`` (TorchScript) needs only torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from appcore.bundle import export_command, inference_skeleton, write_bundle
from appcore.versions import VersionStore, store_beside
from radiology.spec import CTWindow, ModelSpec


def _intensity(spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config of ``radiology.transforms.intensity_transform`` and its description for the metadata."""
    if isinstance(spec.intensity, CTWindow):
        low, high = spec.intensity.low, spec.intensity.high
        config = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high}
        config.update({"b_min": 0.0, "b_max": 1.0, "clip": True})
        return config, {"type": "ct_window", "low_hu": low, "high_hu": high, "scaled_to": [0.0, 1.0]}
    config = {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": spec.intensity.nonzero}
    return config, {"type": "z_score_per_image", "nonzero": spec.intensity.nonzero}


def network_config(spec: ModelSpec) -> dict[str, Any]:
    """``spec.network()`` as a config: one UNet, or ``MeanOfMembers`` of ``members`` of them."""
    unet = {"_target_": "UNet", **spec.unet_args()}
    if spec.members == 1:
        return unet
    return {"_target_": "radiology.ensemble.MeanOfMembers", "members": [dict(unet) for _ in range(spec.members)]}


def inference_config(spec: ModelSpec) -> dict[str, Any]:
    """The ``inference.json`` of ``spec``; its ids are those of the model zoo and of MONAI Label's
    ``monaibundle`` app (``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``)."""
    intensity, _ = _intensity(spec)
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "float32", "track_meta": True},
        {"_target_": "radiology.transforms.FiniteValuesd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(spec.spacing), "mode": "bilinear"},
        intensity,
    ]
    return inference_skeleton(
        imports=["$import radiology"],
        pattern="*.nii*",
        network_def=network_config(spec),
        preprocessing=preprocessing,
        inferer={
            "_target_": "radiology.infer.ModelWindowInferer",
            "roi_size": list(spec.roi_size),
            "max_scale": spec.max_window_scale,
            "multiple": spec.size_multiple,
            "sw_batch_size": 1,
        },
        postprocessing=[
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "radiology.inverse.InvertClassIndexd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_key": "image",
            },
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_dtype": "$numpy.uint8",
                "resample": False,
                "separate_folder": False,
            },
        ],
    )


def metadata(spec: ModelSpec) -> dict[str, Any]:
    """The model's part of ``metadata.json`` (model-zoo keys, plus labels, spacing and intensity)."""
    _, intensity = _intensity(spec)
    labels = [
        {"name": label.name, "id": label.id, "color": label.hex_color, "snomed": label.snomed} for label in spec.labels
    ]
    channel_def = {"0": "background", **{str(label.id): label.name for label in spec.labels}}
    return {
        "name": spec.name,
        "task": spec.description,
        "description": f"{spec.description}; exported from the active-learning labeling server",
        "authors": "the labeling server's annotators and its developers",
        "copyright": "see data_licence",
        "data_source": spec.training_data or "labels saved on the server",
        "training_data": spec.training_data,
        "data_type": "nibabel",
        "image_classes": f"one channel {spec.modality} intensity image",
        "label_classes": "; ".join(f"{label.id} {label.name}" for label in spec.labels) + "; 0 background",
        "pred_classes": "; ".join(f"{label.id} {label.name}" for label in spec.labels) + "; 0 background",
        "intended_use": "research and annotation support; not for clinical decisions",
        "modality": spec.modality,
        "spacing_mm": list(spec.spacing),
        "orientation": "RAS",
        "intensity": intensity,
        "labels": labels,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if spec.modality == "CT" else "magnitude",
                    "modality": spec.modality,
                    "num_channels": 1,
                    "spatial_shape": list(spec.roi_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": spec.num_classes,
                    "spatial_shape": list(spec.roi_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": channel_def,
                }
            },
        },
    }


README = """# {name}, version {version}

Exported from the labeling server (`radiology.export`). Run it with MONAI's runner, in an
environment where this project's packages are installed (the config names a few of its classes):

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --bundle_root . --dataset_dir IN --output_dir OUT

It writes `OUT/<image>_seg.nii.gz` for every `.nii`/`.nii.gz` image in `IN`, on the image's own
voxel grid, as the server's `/infer/{name}` answers. `models/model.ts` is the network in TorchScript
(input: pre-processed image, 1 x 1 x D x H x W; output: class scores). Labels, spacing, intensity
handling, the version history and the training data's licence are in `configs/metadata.json`.
"""


def export_bundle(spec: ModelSpec, store: VersionStore, version: int, out: Path) -> Path:
    """Write ``version`` of ``spec``'s weights (from ``store``) as a bundle in ``out``."""
    return write_bundle(
        out,
        store=store,
        number=version,
        network=spec.network(),
        inference=inference_config(spec),
        metadata=metadata(spec),
        readme=README.format(name=spec.name, version=version),
    )


def main(argv: list[str] | None = None) -> int:
    from radiology.registry import MODELS

    def open_store(model: str, app_dir: Path) -> VersionStore:
        spec = MODELS[model]
        return store_beside(app_dir / "model" / f"{spec.name}.pt", spec.name, spec.shipped_weights_path)

    def export(model: str, store: VersionStore, version: int, out: Path) -> Path:
        return export_bundle(MODELS[model], store, version, out)

    return export_command(
        argv, description=__doc__, models=MODELS, app_dir=Path("apps/radiology"), open_store=open_store, export=export
    )


if __name__ == "__main__":
    sys.exit(main())
