"""Export a version of the nuclei network as a MONAI Bundle (model-zoo layout) that MONAI's runner runs.

    python -m pathology.export nuclei [--version N] [--app-dir apps/pathology] --out DIR
    cd DIR && python -m monai.bundle run --config_file configs/inference.json \\
        --meta_file configs/metadata.json --bundle_root DIR --dataset_dir IN --output_dir OUT

For every PNG tile in ``IN`` it writes ``OUT/<tile>_seg.png``, the 16-bit instance mask that
``POST /infer/nuclei?output=image`` answers for a tile of up to 1024 pixels a side (0 background,
one id per nucleus): the network on the whole tile padded at its end to the UNet's divisor, then
the marker watershed (``NucleiInstancesd``, ``pathology.postprocess``). Larger tiles and slides the
server cuts into overlapping tiles (``pathology.wsi``), which the bundle does not.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from appcore.bundle import export_command, inference_skeleton, write_bundle
from appcore.versions import VersionStore, store_beside
from pathology.postprocess import instances_from_maps
from pathology.spec import NUCLEI_LABELS, NUCLEUS, NucleiSpec

TRAINING_DATA = (
    "MICCAI 2015 CPM nuclei segmentation training tiles (TCGA H&E), 8 tiles; licence not stated by the "
    "source: for research use, not for redistribution"
)


class NucleiInstancesd(MapTransform):
    """The network's two logit maps of a tile padded at its end (2, H', W') to its instance mask
    (1, W, H): MONAI's PIL orientation, as ``LoadImaged`` read the tile and ``SaveImaged`` writes it.

    The maps are cut to the tile's size (``spatial_shape`` in the image's metadata, as loaded:
    width, height) before the watershed, as the server does.
    """

    def __init__(
        self, keys: Any, *, fg_threshold: float, seed_threshold: float, min_area: int, image_key: str = "image"
    ) -> None:
        super().__init__(keys)
        self.fg_threshold, self.seed_threshold, self.min_area = fg_threshold, seed_threshold, min_area
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        width, height = (int(v) for v in d[self.image_key].meta["spatial_shape"][:2])
        for key in self.key_iterator(d):
            maps = torch.sigmoid(torch.as_tensor(d[key]).float()).cpu().numpy()[:, :height, :width]
            mask = instances_from_maps(
                maps[0],
                maps[1],
                fg_threshold=self.fg_threshold,
                seed_threshold=self.seed_threshold,
                min_area=self.min_area,
            )
            out = torch.from_numpy(np.ascontiguousarray(mask.T[None]).astype(np.int32))
            d[key] = MetaTensor(out, meta=dict(d[self.image_key].meta))
        return d


def inference_config(spec: NucleiSpec) -> dict[str, Any]:
    """The ``inference.json``; ids as the model zoo's and MONAI Label's ``monaibundle`` app's."""
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Transposed", "keys": "image", "indices": [0, 2, 1]},  # (3, W, H) as read -> (3, H, W)
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "float32", "track_meta": True},
        {"_target_": "Lambdad", "keys": "image", "func": "$normalise"},
        {"_target_": "DivisiblePadd", "keys": "image", "k": spec.divisor, "method": "end", "mode": "reflect"},
    ]
    return inference_skeleton(
        imports=["$from pathology.data import normalise"],
        pattern="*.png",
        network_def={"_target_": "UNet", **spec.unet_args()},
        preprocessing=preprocessing,
        inferer={"_target_": "SimpleInferer"},
        postprocessing=[
            {
                "_target_": "pathology.export.NucleiInstancesd",
                "keys": "pred",
                "fg_threshold": spec.fg_threshold,
                "seed_threshold": spec.seed_threshold,
                "min_area": spec.min_area,
            },
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_ext": ".png",
                "output_dtype": "$numpy.uint16",
                "scale": None,
                "resample": False,
                "separate_folder": False,
                "writer": "PILWriter",
            },
        ],
    )


def metadata(spec: NucleiSpec) -> dict[str, Any]:
    return {
        "name": "nuclei",
        "task": "Nuclei instance segmentation on H&E tiles",
        "description": "2D UNet (foreground and normalised distance to the border) and a marker watershed; "
        "exported from the active-learning labeling server",
        "authors": "the labeling server's annotators and its developers",
        "copyright": "see data_licence",
        "data_source": TRAINING_DATA,
        "training_data": TRAINING_DATA,
        "data_type": "png",
        "image_classes": "RGB H&E tile, uint8, full resolution",
        "label_classes": "instance mask: 0 background, 1..N one id per nucleus",
        "pred_classes": "channel 0 foreground logit, channel 1 logit of the normalised distance to the border",
        "intended_use": "research and annotation support; not for clinical decisions",
        "modality": "SM",
        "spacing_mm": None,
        "intensity": {"type": "rgb_to_minus1_1", "formula": "value / 127.5 - 1"},
        "labels": [{"name": label.name, "id": label.id, "color": label.hex_color} for label in NUCLEI_LABELS],
        "postprocessing": {
            "fg_threshold": spec.fg_threshold,
            "seed_threshold": spec.seed_threshold,
            "min_area_px": spec.min_area,
        },
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "SM",
                    "num_channels": 3,
                    "spatial_shape": [spec.patch, spec.patch],
                    "dtype": "float32",
                    "value_range": [-1, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "R", "1": "G", "2": "B"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": [spec.patch, spec.patch],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "background", str(NUCLEUS.id): NUCLEUS.name},
                }
            },
        },
    }


README = """# nuclei, version {version}

Exported from the labeling server (`pathology.export`). Run it with MONAI's runner, in an
environment where this project's packages are installed (the config names a few of its classes):

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --bundle_root . --dataset_dir IN --output_dir OUT

It writes `OUT/<tile>_seg.png` (16-bit instance mask) for every PNG tile in `IN`. `models/model.ts`
is the network in TorchScript (input 1 x 3 x H x W in [-1, 1], sides multiples of {divisor}; output
two logit maps).
"""


def export_bundle(spec: NucleiSpec, store: VersionStore, version: int, out: Path) -> Path:
    """Write ``version`` of the nuclei weights (from ``store``) as a bundle in ``out``."""
    return write_bundle(
        out,
        store=store,
        number=version,
        network=spec.network(),
        inference=inference_config(spec),
        metadata=metadata(spec),
        readme=README.format(version=version, divisor=spec.divisor),
    )


def main(argv: list[str] | None = None) -> int:
    from pathology.registry import MODELS

    def open_store(model: str, app_dir: Path) -> VersionStore:
        return store_beside(app_dir / "model" / "nuclei.pt", model, MODELS[model].spec.shipped_weights_path)

    def export(model: str, store: VersionStore, version: int, out: Path) -> Path:
        return export_bundle(MODELS[model].spec, store, version, out)

    return export_command(
        argv, description=__doc__, models=MODELS, app_dir=Path("apps/pathology"), open_store=open_store, export=export
    )


if __name__ == "__main__":
    sys.exit(main())
