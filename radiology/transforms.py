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


class CompactDtyped(MapTransform):
    """Voxels kept in the file's dtype where it is compact: integers of up to 16 bits (CT in int16,
    MR in uint8 or int16) and float16/float32; any other dtype (int32, float64, ...) as float32.

    ``preprocess`` casts to float32 once the image is reoriented, before it is resampled, so every
    later step sees what it saw when the image was decoded as float32 (int16 and uint8 values are
    exact in float32); the decoding and the reorientation (a flip of an LPS CT copies the volume),
    though, take 2 bytes a voxel of an int16 CT instead of 4.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.dtype not in COMPACT_DTYPES:
                d[key] = img.to(torch.float32)
        return d


COMPACT_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.float16, torch.float32})


class FiniteValuesd(MapTransform):
    """Non-finite voxels (NaN or infinite, as outside a brain mask in processed MR) set to the image's
    finite minimum, read as background. Without this one NaN makes every normalised voxel NaN and
    the prediction silently empty.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not img.is_floating_point():  # integers are finite, and their sum would be int64: 8 bytes a voxel
                continue
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
        # In the file's dtype (``CompactDtyped``): float32 from the resampling on.
        steps.append(LoadImaged(keys=keys, image_only=True, dtype=None))
    steps += [
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys, track_meta=True),
        CompactDtyped(keys=keys),
        FiniteValuesd(keys="image"),
        Orientationd(keys=keys, axcodes="RAS"),
        # float32 here rather than inside Spacingd, which would hold the file-dtype copy beside it
        EnsureTyped(keys=keys, dtype="float32", track_meta=True),
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
