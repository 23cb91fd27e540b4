"""The one training recipe: the loss, optimiser and validation window server and offline training share.

The server's fine-tuning (``radiology.train``) and the offline training that made the shipped
weights (``research.radiology.offline``) take them from here, so that a change to the recipe
reaches both; the offline trainer's variants (nnU-Net's SGD, deep supervision) wrap these.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss

from radiology.spec import ModelSpec

WEIGHT_DECAY = 1e-5  # AdamW's, in every training of a radiology network
WINDOW_OVERLAP = 0.25  # of the validation's sliding windows, as at inference
WINDOW_MODE = "gaussian"  # how overlapping windows are blended: centre voxels count most


def loss() -> torch.nn.Module:
    """Dice + cross-entropy on the logits against the class-index label."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW at learning rate ``lr`` (the server's: ``ModelSpec.learning_rate``), over parameters or groups."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)


def validation_window(spec: ModelSpec, sw_batch_size: int) -> SlidingWindowInferer:
    """The sliding window a validation runs ``spec``'s network through: its ROI, blended as at inference.

    ``sw_batch_size`` (windows per forward pass) changes speed and memory, not the result.
    """
    return SlidingWindowInferer(
        roi_size=spec.roi_size, sw_batch_size=sw_batch_size, overlap=WINDOW_OVERLAP, mode=WINDOW_MODE
    )
