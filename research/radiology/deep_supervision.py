"""Deep supervision for offline training of MONAI's ``UNet``, without changing the served network.

nnU-Net-style deep supervision adds a loss on the decoder's coarser levels. MONAI's ``UNet`` has no
such outputs, so ``DeepSupervision`` reads the decoder's feature maps with forward hooks (set for one
forward pass, then removed) and turns each into class logits with a 1x1x1 convolution of its own. The
heads exist only during training: the weights written afterwards are the UNet's own state dict, so
infer, scoring and server-side fine-tuning load them into the unchanged network.
"""

from __future__ import annotations

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn


def decoder_levels(unet: UNet) -> list[nn.Module]:
    """The up-path layers of ``unet``, finest first: the first one gives the network's output, the
    ``i``-th (``i >= 1``) upsamples to ``1 / 2**i`` of the input size with ``unet.channels[i - 1]``
    feature maps (for strides of 2)."""
    levels = []
    block = unet.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        levels.append(block[2])
        block = block[1].submodule
    if len(levels) != len(unet.channels) - 1:
        raise ValueError(f"expected {len(unet.channels) - 1} decoder levels in the UNet, found {len(levels)}")
    return levels


class DeepSupervision(nn.Module):
    """``unet``'s output followed by class logits from its next ``extra_levels`` decoder levels.

    ``forward`` returns a list, finest first, as ``monai.losses.DeepSupervisionLoss`` takes it (that
    loss resamples the label to each output's size). In eval mode it returns the UNet's output only.
    """

    def __init__(self, unet: UNet, *, extra_levels: int = 2) -> None:
        super().__init__()
        levels = decoder_levels(unet)
        if not 1 <= extra_levels < len(levels):
            raise ValueError(f"extra_levels must be between 1 and {len(levels) - 1}, got {extra_levels}")
        self.unet = unet
        self._levels = levels[1 : 1 + extra_levels]
        self.heads = nn.ModuleList(
            nn.Conv3d(unet.channels[i], unet.out_channels, kernel_size=1) for i in range(extra_levels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not self.training:
            return self.unet(x)
        features: list[torch.Tensor | None] = [None] * len(self._levels)

        def keep(index: int):
            def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
                features[index] = output

            return hook

        handles = [level.register_forward_hook(keep(i)) for i, level in enumerate(self._levels)]
        try:
            out = self.unet(x)
        finally:
            for handle in handles:
                handle.remove()
        return [out] + [head(f) for head, f in zip(self.heads, features, strict=True)]
