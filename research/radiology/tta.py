"""Test-time augmentation by small rotations and zooms, undone on the class probabilities.

Each pass resamples the pre-processed image with one fixed affine (``F.affine_grid``, built in voxel
units about the centre like ``research.radiology.batch_augment.random_affine``), segments it, and resamples
the probabilities back with the inverse affine; the passes' probabilities are averaged. Mirroring
is left out on purpose: a network trained without it segments mirrored anatomy badly (RESULTS,
"left-right mirroring at test time"), while rotations and zooms of this size lie well inside the
training augmentation of the hippocampus recipe (up to 0.5 rad and 0.75-1.3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def voxel_affine(shape: Sequence[int], matrix: torch.Tensor) -> torch.Tensor:
    """``[3, 4]`` ``affine_grid`` matrix applying the 3 x 3 voxel-space ``matrix`` (rows and columns in
    ``shape``'s axis order) about the volume's centre.

    ``affine_grid`` orders its normalised coordinates last axis first and scales each axis to
    [-1, 1]; the matrix is reordered and conjugated by the half-sizes so that a rotation does not
    shear a non-cubic volume.
    """
    if matrix.shape != (3, 3) or len(shape) != 3:
        raise ValueError(f"need a 3 x 3 matrix and a 3D shape, got {tuple(matrix.shape)} and {tuple(shape)}")
    reverse = torch.tensor([2, 1, 0])
    m = matrix.double()[reverse][:, reverse]
    half = torch.tensor([s / 2.0 for s in reversed(tuple(shape))], dtype=torch.float64)
    theta = m * half[None, :] / half[:, None]
    return torch.cat([theta, torch.zeros(3, 1, dtype=torch.float64)], dim=1).float()


def rotation(axis: int, angle: float) -> torch.Tensor:
    """3 x 3 rotation by ``angle`` radians about voxel axis ``axis``."""
    c, s = torch.cos(torch.tensor(angle, dtype=torch.float64)), torch.sin(torch.tensor(angle, dtype=torch.float64))
    i, j = [a for a in range(3) if a != axis]
    r = torch.eye(3, dtype=torch.float64)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def tta_matrices(rotate: float, zooms: Sequence[float]) -> list[torch.Tensor]:
    """The identity, a rotation of ``+-rotate`` about each axis, and each isotropic zoom in ``zooms``."""
    out = [torch.eye(3, dtype=torch.float64)]
    out += [rotation(axis, sign * rotate) for axis in range(3) for sign in (-1.0, 1.0) if rotate]
    out += [torch.eye(3, dtype=torch.float64) * z for z in zooms]
    return out


class AffineTTA:
    """Mean class probabilities of ``inferer`` over the passes of ``tta_matrices(rotate, zooms)``.

    Args:
        inferer: ``inferer(image, network) -> logits`` on a ``[1, C, X, Y, Z]`` image (a sliding window).
        rotate: radians of the rotations about each axis (0: none).
        zooms: isotropic zoom factors (a factor above 1 samples a larger region: anatomy looks smaller).
        matrices: 3 x 3 voxel-space matrices to use instead of those of ``rotate`` and ``zooms``.
    """

    def __init__(
        self,
        inferer: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor],
        *,
        rotate: float = 0.15,
        zooms: Sequence[float] = (0.9, 1.1),
        matrices: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.inferer = inferer
        self.matrices = list(matrices) if matrices is not None else tta_matrices(rotate, zooms)

    def __len__(self) -> int:
        return len(self.matrices)

    def __call__(self, image: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        if image.ndim != 5 or image.shape[0] != 1:
            raise ValueError(f"need a [1, C, X, Y, Z] image, got {tuple(image.shape)}")
        shape = tuple(image.shape[2:])
        total = None
        for matrix in self.matrices:
            if torch.equal(matrix, torch.eye(3, dtype=torch.float64)):
                probs = torch.softmax(self.inferer(image, network).float(), 1)
            else:
                forward = voxel_affine(shape, matrix).to(image.device)[None]
                backward = voxel_affine(shape, torch.linalg.inv(matrix)).to(image.device)[None]
                grid = F.affine_grid(forward, list(image.shape), align_corners=False)
                moved = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                probs = torch.softmax(self.inferer(moved.to(image.dtype), network).float(), 1)
                grid = F.affine_grid(backward, list(probs.shape), align_corners=False)
                probs = F.grid_sample(probs, grid, mode="bilinear", padding_mode="border", align_corners=False)
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(self.matrices)
