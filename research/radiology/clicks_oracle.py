"""What a perfect click could do: the wrong regions a click lands in, and the Dice if each were fixed whole.

``python -m research.radiology.clicks_oracle hippocampus --data ../shared/data/hippocampus_mr --split val
--automatic work/auto_trainonly.pt --automatic-channels 16,32,64,128``

For each case, from the automatic label: the standard annotator (``research.radiology.annotator``)
clicks the centre of the largest 6-connected wrong region, and the oracle sets that whole region
to its reference class; after 0, 1, 3, 5 and 10 such clicks the mean foreground Dice is reported.
For the first click it also reports the region (voxels, its thickness: twice its largest depth
from the edge, and its extent) and the automatic network's probability of the clicked class
inside it: what a click engine would have to infer from one click and the networks. The gap
between this curve and a click engine's (``research.radiology.clicks_evaluate``) is how much of a
wrong region the engine fails to find. Model grid and image grid are the same for the hippocampus
crops (RAS, 1 mm); the script refuses a case where they are not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import MetaKeys
from scipy import ndimage

from radiology.clicknet import ClickNet
from radiology.registry import MODELS
from research.radiology.annotator import SIX_CONNECTED, mean_foreground_dice, standard_click
from research.radiology.splits import msd_cases, split_cases

REPORTED = (0, 1, 3, 5, 10)


def largest_wrong_region(pred: np.ndarray, truth: np.ndarray, classes: int) -> tuple[int, np.ndarray] | None:
    """The class and mask of the region the standard annotator clicks (``None`` if nothing is wrong)."""
    click = standard_click(pred, truth, classes)
    if click is None:
        return None
    t, voxel = click
    regions, _ = ndimage.label((truth == t) & (pred != t), structure=SIX_CONNECTED)
    return t, regions == regions[voxel]


def check_same_grid(case: str, model_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
    """Refuse a case whose model grid is not its image's (the oracle compares them voxel by voxel)."""
    if tuple(model_shape) != tuple(image_shape):
        raise ValueError(
            f"{case}: model grid {tuple(model_shape)} is not the image's {tuple(image_shape)}; "
            "this script needs images already in RAS at the model's spacing"
        )


def automatic_probabilities(engine: ClickNet, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The automatic network's class probabilities on the model grid (the engine's own pre-processing
    and sliding window; research code reading the engine's internals)."""
    meta = {
        MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
        MetaKeys.ORIGINAL_AFFINE: affine,
        MetaKeys.SPATIAL_SHAPE: np.asarray(image.shape),
    }
    model_image = engine._pre({"image": MetaTensor(torch.as_tensor(image), affine=affine, meta=meta)})["image"]
    with torch.inference_mode():
        scores = engine._scores(engine.automatic_network(), model_image.as_tensor()[None])
    return torch.exp(scores).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--data", type=Path, required=True, help="MSD-layout folder")
    parser.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    parser.add_argument("--automatic", type=Path, help="the automatic model's weights (default: shipped)")
    parser.add_argument("--automatic-channels", help="their channels if not the model's, e.g. 16,32,64,128")
    parser.add_argument("--clicks", type=int, default=max(REPORTED))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    automatic = args.automatic or spec.shipped_weights_path
    if automatic is None:
        parser.error(f"{args.model} ships no automatic weights: pass --automatic")
    channels = None if args.automatic_channels is None else [int(c) for c in args.automatic_channels.split(",")]
    # The click network is not run here; the engine only lends its pre-processing and automatic network.
    engine = ClickNet(
        spec, weights=Path("unused"), automatic_weights=[automatic], automatic_channels=channels, cpu_bf16=False
    )
    cases = msd_cases(args.data)
    cases = cases if args.split == "all" else split_cases(cases)[args.split]
    classes = spec.num_classes
    curves, first = [], []
    for case in cases:
        image = nib.load(case.image)
        array = np.asarray(image.dataobj, dtype=np.float32)
        truth = np.rint(np.asarray(nib.load(case.label).dataobj)).astype(np.int64)
        probabilities = automatic_probabilities(engine, array, image.affine)
        check_same_grid(case.id, probabilities.shape[1:], truth.shape)
        pred = probabilities.argmax(0)
        curve = [mean_foreground_dice(pred, truth, classes)]
        for k in range(args.clicks):
            found = largest_wrong_region(pred, truth, classes)
            if found is not None:
                t, region = found
                if k == 0:
                    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
                    extent = np.ptp(np.argwhere(region), axis=0) + 1
                    first.append(
                        {
                            "case": case.id,
                            "class": t,
                            "voxels": int(region.sum()),
                            "thickness": round(2 * float(depth.max()), 1),
                            "extent": [int(e) for e in extent],
                            "probability_of_clicked_class_median": round(float(np.median(probabilities[t][region])), 3),
                        }
                    )
                pred = pred.copy()
                pred[region] = t
            curve.append(mean_foreground_dice(pred, truth, classes))
        curves.append(curve)
    mean = np.asarray(curves).mean(0)
    summary = {
        "cases": len(cases),
        "oracle_mean_dice_after_clicks": {str(k): round(float(mean[k]), 4) for k in REPORTED if k < len(mean)},
        "first_region_median": {
            key: round(float(np.median([f[key] for f in first])), 4)
            for key in ("voxels", "thickness", "probability_of_clicked_class_median")
        },
        "first_region_background_clicks": sum(f["class"] == 0 for f in first),
        "first_regions": first,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
