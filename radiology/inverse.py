"""A class-index map taken back from the model's grid to the image's own, by nearest-neighbour indexing."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.utils import to_norm_affine
from monai.transforms import Invertd, MapTransform
from monai.utils import MetaKeys, TraceKeys

logger = logging.getLogger(__name__)

# Off-axis entries of a voxel-to-voxel map below this, relative to the axis' own scale, count as
# zero: the pre-processing's maps have exact zeros there, up to float64 rounding.
AXIS_TOL = 1e-6
# What MONAI's resampling takes for "no change" (``monai.transforms.spatial.functional.AFFINE_TOL``).
AFFINE_TOL = 1e-3


def axis_map(xform: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """A voxel-to-voxel ``xform`` (4 x 4, from grid A to grid B) read as per-axis maps where it is
    axis-aligned: ``(axes, scale, shift)``, axis ``a`` of A running along axis ``axes[a]`` of B, its
    index ``i`` landing at ``scale[a] * i + shift[a]``. ``None`` where it rotates or shears the axes.
    """
    rot = np.asarray(xform, np.float64)[:3, :3]
    axes = [int(np.argmax(np.abs(rot[:, a]))) for a in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    scale = np.array([rot[axes[a], a] for a in range(3)])
    off_axis = np.abs(rot).sum(axis=0) - np.abs(scale)
    if np.any(scale == 0) or np.any(off_axis > AXIS_TOL * np.abs(scale)):
        return None
    shift = np.array([xform[axes[a], 3] for a in range(3)], np.float64)
    return axes, scale, shift


def resample_lines(
    src_affine: np.ndarray, src_size: Sequence[int], dst_affine: np.ndarray, dst_size: Sequence[int]
) -> tuple[list[int], list[np.ndarray]] | None:
    """Which voxel of the grid (``src_affine``, ``src_size``) MONAI's nearest-neighbour resampling to
    the grid (``dst_affine``, ``dst_size``) reads, per axis: ``(axes, lines)``, ``lines[b][k]``
    being the index along source axis ``axes[b]`` that destination index ``k`` of axis ``b`` reads.
    ``None`` where the map is not axis-aligned.

    Computed as ``monai.transforms.spatial.functional.spatial_resample`` does (the float32
    normalised affine, ``affine_grid``, ``grid_sample`` with ``border`` padding), on one line of
    voxels per axis instead of the whole grid: a voxel centre exactly between two source voxels (a
    1.5 mm image on a 1 mm grid) then goes where ``Invertd`` sends it.
    """
    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    found = axis_map(xform)
    if found is None:
        return None
    axes = found[0]
    if np.allclose(xform, np.eye(4), atol=AFFINE_TOL) and list(src_size) == list(dst_size):
        return axes, [np.arange(int(n)) for n in dst_size]  # MONAI leaves such an image as it is
    theta = to_norm_affine(
        torch.as_tensor(xform, dtype=torch.float32)[None], list(src_size), list(dst_size), align_corners=False
    )
    rev = [2, 1, 0]  # grid_sample's coordinates run x, y, z: the last axis first
    theta[:, :3] = theta[:, rev]
    theta[:, :, :3] = theta[:, :, rev]
    lines = []
    for b in range(3):
        p = axes[b]
        thin = [int(dst_size[b]) if k == b else 1 for k in range(3)]
        grid = torch.nn.functional.affine_grid(theta[:, :3], [1, 1, *thin], align_corners=False)
        ramp = torch.arange(int(src_size[p]), dtype=torch.float32).reshape(
            [1, 1] + [-1 if k == p else 1 for k in range(3)]
        )
        picked = torch.nn.functional.grid_sample(ramp, grid, mode="nearest", padding_mode="border", align_corners=False)
        lines.append(picked.reshape(-1).numpy().astype(np.intp))
    return axes, lines


def invert_class_index(labels: np.ndarray, image: MetaTensor) -> np.ndarray | None:
    """``labels`` (a 3D class-index map on the grid of the pre-processed ``image``) on the grid the
    image was read on, uint8, as ``Invertd(nearest_interp=True)`` would answer it; ``None`` where
    the recorded pre-processing is not one this can replay (anything but reorientation and an
    axis-aligned resampling), or the metadata is missing.

    Each output axis reads one 1D array of indices (``np.ix_``), so the only full-size array made is
    the answer, one byte a voxel: ``Invertd`` builds a float32 sampling grid of three coordinates a
    voxel and a float32 output (16 bytes a voxel of the image).
    """
    meta = image.meta
    if MetaKeys.ORIGINAL_AFFINE not in meta or MetaKeys.SPATIAL_SHAPE not in meta:
        return None
    ops = list(image.applied_operations)
    names = [op.get(TraceKeys.CLASS_NAME) for op in ops]
    if names not in (["Orientation", "SpatialResample"], ["SpatialResample"], ["Orientation"], []):
        return None
    source_affine = np.asarray(meta[MetaKeys.ORIGINAL_AFFINE], np.float64)
    source_shape = [int(s) for s in np.asarray(meta[MetaKeys.SPATIAL_SHAPE]).ravel()]
    if len(source_shape) != 3 or labels.ndim != 3:
        return None
    model_affine = np.asarray(image.affine, np.float64)
    if names and names[-1] == "SpatialResample":
        info = ops[-1][TraceKeys.EXTRA_INFO]
        oriented_affine = np.asarray(info["src_affine"], np.float64)
        oriented_size = [int(s) for s in ops[-1][TraceKeys.ORIG_SIZE]]
        if info.get("padding_mode") != "border" or info.get("align_corners") not in (False, TraceKeys.NONE):
            return None
        resampled = resample_lines(model_affine, labels.shape, oriented_affine, oriented_size)
    else:
        oriented_affine, oriented_size = model_affine, list(labels.shape)
        resampled = ([0, 1, 2], [np.arange(n) for n in labels.shape])
    # The reorientation only permutes and flips axes: whole voxel indices, no rounding to replay.
    oriented = axis_map(np.linalg.solve(oriented_affine, source_affine))
    if resampled is None or oriented is None:
        return None
    to_model, lines = resampled
    axes, scale, shift = oriented
    model_axes, index = [], []
    for a in range(3):
        b = axes[a]
        k = np.rint(scale[a] * np.arange(source_shape[a]) + shift[a]).astype(np.intp)
        if k.size and (k.min() < 0 or k.max() >= oriented_size[b]):
            return None
        model_axes.append(to_model[b])
        index.append(lines[b][k])
    return labels.transpose(model_axes)[np.ix_(*index)]


class InvertClassIndexd(MapTransform):
    """The class-index map under ``keys`` (``[1, ...]`` on the pre-processed grid) taken back to the
    grid ``orig_key``'s image was read on: what MONAI's ``Invertd(nearest_interp=True)`` answers for
    the pre-processing's reorientation and resampling, computed by separable indexing into uint8
    (``invert_class_index``), the output's metadata as ``Invertd`` leaves it.

    ``radiology.transforms.preprocess`` only permutes and flips axes (``Orientationd``) and rescales
    each one (``Spacingd`` keeps the directions of the voxel axes), so this always applies to it.
    A pre-processing that rotates the axes (``Spacingd(diagonal=True)`` on an oblique image, an
    affine augmentation) or records other spatial steps falls back to ``Invertd``, logged.

    Args:
        keys: the class-index maps to take back.
        transform: the pre-processing, for the fallback.
        orig_key: the pre-processed image whose metadata records its steps and original grid.
    """

    def __init__(self, keys: Any, transform: Any, *, orig_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.orig_key = orig_key
        self.fallback = Invertd(
            keys=keys,
            transform=transform,
            orig_keys=orig_key,
            nearest_interp=True,
            allow_missing_keys=allow_missing_keys,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.orig_key)
        for key in self.key_iterator(d):
            pred = d[key]
            out = None
            if (
                isinstance(image, MetaTensor)
                and pred.ndim == 4
                and pred.shape[0] == 1
                and pred.shape[1:] == image.shape[1:]
            ):
                labels = torch.as_tensor(pred).detach().cpu().numpy()[0]
                if labels.size and (labels.min() < 0 or labels.max() > 255):
                    raise ValueError(
                        f"Class indices under {key!r} run from {labels.min()} to {labels.max()}: "
                        "a uint8 label holds 0-255"
                    )
                out = invert_class_index(labels.astype(np.uint8), image)
            if out is None:
                logger.info("Inverting %r with Invertd: its pre-processing is not a reorientation and resampling", key)
                d = self.fallback(d)
                d[key] = d[key].round().to(torch.uint8)  # as the indexing answers it
                continue
            meta = dict(pred.meta) if isinstance(pred, MetaTensor) else {}
            meta[MetaKeys.AFFINE] = torch.as_tensor(np.asarray(image.meta[MetaKeys.ORIGINAL_AFFINE], np.float64))
            meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(out.shape)
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(out))[None], meta=meta)
        return d
