"""The click contract of the interactive (``deepedit``-type) radiology models, shared by every click engine.

Clicks arrive as MONAI Label's DeepEdit clients send them: per label name, a list of voxel indices
``[i, j, k]`` of the image as sent (its own array order), every click of the session in each
request. A :class:`ClickEngine` turns an image and its clicks into a label volume of the same grid.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Voxel = tuple[int, int, int]
Clicks = dict[str, list[Voxel]]
"""Label name (one of the model's label names, or ``"background"``) -> voxel indices of the image."""


class ClickEngine(Protocol):
    """Segments an image from clicks; one per model (a click-conditioned network, or a graph method)."""

    def segment(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        clicks: Clicks,
        proposal: np.ndarray | None,
    ) -> np.ndarray:
        """Label volume (integer ids of the model's labels, 0 background) on ``image``'s grid.

        Args:
            image: the image's voxels as loaded from the file (float32, the file's array order).
            affine: its voxel-to-world (RAS, mm) matrix.
            clicks: every click of the session, already checked (inside the image, known labels).
            proposal: the automatic model's label on the same grid, when there is one.
        """
        ...
