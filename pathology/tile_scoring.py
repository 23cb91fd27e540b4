"""Image-level uncertainty of nuclei tiles: the scoring pass behind the pathology app's
``random``, ``epistemic``, ``bald``, ``tta`` and ``diversity`` strategies on a folder of tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from appcore.weights import NewestWeights, load_state_dict
from pathology.activelearning import MC_DROPOUT, MC_PASSES, box_measures, scoring_copy
from pathology.spec import NucleiSpec
from pathology.wsi import SlideSource, open_source

# Largest tile (pixels) scored as one image; a larger image is a slide whose patches the ``wsi_*``
# strategies rank (a tile that large is measured in its four corner windows anyway).
MAX_TILE_PIXELS = 8192 * 8192


class TileScorer(NewestWeights):
    """Every measure the image-level strategies rank by, for one tile, in one pass (``strategies.scoring.Scorer``).

    A tile is measured as a slide patch is (``pathology.activelearning.box_measures``): in up to four
    probe windows at its corners (the whole tile when it is at most 256 pixels a side), glass windows
    left out: the foreground entropy with the mean bottleneck features (``embedding``, for
    ``diversity``), BALD over ``passes`` Monte Carlo passes with dropout injected at the bottleneck,
    and the disagreement of the foreground between flipped copies. A whole-slide image, or a tile
    over ``MAX_TILE_PIXELS``, cannot be scored (``ValueError``: scoring lists it as unusable, and no
    image-level strategy hands it out; the ``wsi_*`` strategies pick its patches).

    Args:
        spec: the network's settings.
        weight_paths: candidate weight files, oldest first; the last one that exists is scored with.
        passes: Monte Carlo dropout passes for ``bald`` (``--conf mc_samples``).
        dropout: the injected dropout probability.
    """

    def __init__(
        self,
        spec: NucleiSpec,
        weight_paths: list[str | Path],
        *,
        passes: int = MC_PASSES,
        dropout: float = MC_DROPOUT,
    ) -> None:
        if passes < 1:
            raise ValueError(f"passes must be at least 1 (with 1, bald is 0: nothing to disagree with), got {passes}")
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"dropout must be in (0, 1), got {dropout}")
        self.spec, self.passes, self.dropout = spec, passes, dropout
        self.weight_paths = [Path(p) for p in weight_paths]
        self._networks: dict[str, torch.nn.Module] | None = None

    def use_network(self, network: torch.nn.Module) -> None:
        """Score with private copies of ``network`` (already holding its weights)."""
        plain = scoring_copy(network)
        self._networks = {"entropy": plain, "bald": scoring_copy(network, dropout=self.dropout), "tta": plain}

    def networks(self) -> dict[str, torch.nn.Module]:
        if self._networks is None:
            network = self.spec.network()
            path = self.weights()
            if path is not None:
                network.load_state_dict(load_state_dict(path))
            self.use_network(network)
        assert self._networks is not None
        return self._networks

    def score(self, image_path: str) -> dict[str, Any]:
        source = open_source(image_path)  # a 422 (skipped with its reason) when nothing reads it
        if isinstance(source, SlideSource):
            source.close()
            raise ValueError("a whole-slide image: the wsi_* strategies pick its patches")
        width, height = source.dimensions
        if width * height > MAX_TILE_PIXELS:
            raise ValueError(f"{width} x {height} pixels is over a tile's {MAX_TILE_PIXELS} (store it as a slide)")
        measures = box_measures(source, (0, 0, width, height), self.networks(), self.spec, passes=self.passes)
        return {
            k: (np.asarray(v, dtype=np.float64).tolist() if k == "embedding" else float(v)) for k, v in measures.items()
        }
