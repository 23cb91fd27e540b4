"""The pre-processing of a model, written once and shared by infer, training, validation and scoring."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.data import get_track_meta
from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import convert_to_dst_type, convert_to_tensor

from radiology.spec import CTWindow, ModelSpec, ZScore


def class_index(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The index of the highest score along ``dim`` (kept, length 1): ``argmax`` by another route.

    On the CPU torch's ``argmax`` over a channel dimension is an order of magnitude slower than
    ``max`` (28 against 0.9 ms for 3x48x64x48, 615 against 67 ms for a 10-class CT volume, torch
    2.13, 2 threads: ``python -m benchmarks.training_precision --step-only``); ``max`` returns the
    same indices, the first among equal scores as ``argmax``.
    """
    return scores.max(dim, keepdim=True).indices


class ClassIndexd(MapTransform):
    """Channel-first class scores to a ``[1, ...]`` float32 label map, metadata kept: MONAI's
    ``AsDiscreted(argmax=True)`` through ``class_index``."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            # As AsDiscrete: a plain tensor becomes a MetaTensor, which Invertd can then take back.
            scores = convert_to_tensor(d[key], track_meta=get_track_meta())
            d[key], *_ = convert_to_dst_type(class_index(scores), scores, dtype=torch.float32)
        return d


class FiniteValuesd(MapTransform):
    """Non-finite voxels (NaN or infinite, as outside a brain mask in processed MR) set to the image's
    finite minimum, read as background. Without this one NaN makes every normalised voxel NaN and
    the prediction silently empty.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if bool(torch.isfinite(img.sum())):  # a sum is finite only if every voxel is: the common case
                continue
            finite = torch.isfinite(img)
            out = img.clone()
            out[~finite] = img[finite].min() if bool(finite.any()) else 0.0
            d[key] = out
        return d


def intensity_transform(spec: ModelSpec, key: str = "image") -> MapTransform:
    """The intensity step of ``spec`` (a CT window or a z-score)."""
    if isinstance(spec.intensity, CTWindow):
        return ScaleIntensityRanged(
            keys=key, a_min=spec.intensity.low, a_max=spec.intensity.high, b_min=0.0, b_max=1.0, clip=True
        )
    if isinstance(spec.intensity, ZScore):
        return NormalizeIntensityd(keys=key, nonzero=spec.intensity.nonzero)
    raise TypeError(f"Unsupported intensity setting {spec.intensity!r}")


def preprocess(spec: ModelSpec, *, with_label: bool, load: bool = True) -> list[MapTransform]:
    """Load, reorient to RAS, resample to the model's spacing and normalise intensities.

    Args:
        spec: the model.
        with_label: also load and resample ``"label"`` (nearest neighbour).
        load: start with ``LoadImaged``; ``False`` when the caller already holds arrays.
    """
    keys: Sequence[str] = ("image", "label") if with_label else ("image",)
    modes: Sequence[str] = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps: list[MapTransform] = []
    if load:
        steps.append(LoadImaged(keys=keys, image_only=True))
    steps += [
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys, dtype="float32", track_meta=True),
        FiniteValuesd(keys="image"),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=spec.spacing, mode=modes, dtype=torch.float32),
        intensity_transform(spec),
    ]
    return steps


def augment(spec: ModelSpec) -> list[MapTransform]:
    """Training-only steps: pad to the patch size, sample patches around each class, mild augmentation.

    Mirroring happens only along ``spec.flip_axes``: several models here have labels whose meaning
    depends on side or direction (left kidney, anterior hippocampus).
    """
    keys = ("image", "label")
    return [
        SpatialPadd(keys=keys, spatial_size=spec.roi_size),
        # Patches centred on each class (background included) equally often, so small organs are
        # seen as often as the liver; classes absent from a volume are skipped.
        RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=spec.roi_size,
            num_classes=spec.num_classes,
            num_samples=spec.samples_per_image,
            allow_smaller=True,
            warn=False,
        ),
        RandAffined(
            keys=keys,
            prob=0.25,
            rotate_range=(0.15, 0.15, 0.15),
            scale_range=(0.1, 0.1, 0.1),
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
        *(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in spec.flip_axes),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]


def training_transforms(spec: ModelSpec) -> list[MapTransform]:
    return preprocess(spec, with_label=True) + augment(spec)


def validation_transforms(spec: ModelSpec) -> list[MapTransform]:
    return preprocess(spec, with_label=True)
