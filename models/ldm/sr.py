"""Super-resolution module at the end of the 7T decoder, and the residual CNN it is built of.

As published (SCIENCE.md section 4): two convolutions around residual
blocks, trained with MSE, refining the decoded 7T RISH maps (the VQ-VAE's
coarse latent loses fine detail). The same :class:`ResidualCNN` (with its
own weights) is the "3D CNN" baseline that maps 3T RISH to 7T RISH directly
(:mod:`dmriflow.models.ldm.baselines`).
"""

from __future__ import annotations

import torch

#: Defaults: feature width and residual blocks.
SR_FEATURES = 16
SR_BLOCKS = 2


class ResBlock(torch.nn.Module):
    """conv3 - ReLU - conv3, plus the input."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(features, features, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(features, features, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class ResidualCNN(torch.nn.Module):
    """``x + conv_out(blocks(conv_in(x)))``: two convolutions around residual blocks.

    ``in_channels == out_channels`` (RISH orders in, RISH orders out); the
    global skip makes an untrained network (``conv_out`` zero-initialised)
    the identity, so it only learns the correction.
    """

    def __init__(self, channels: int = 3, features: int = SR_FEATURES, blocks: int = SR_BLOCKS):
        super().__init__()
        self.conv_in = torch.nn.Conv3d(channels, features, 3, padding=1)
        self.blocks = torch.nn.Sequential(*[ResBlock(features) for _ in range(blocks)])
        self.conv_out = torch.nn.Conv3d(features, channels, 3, padding=1)
        torch.nn.init.zeros_(self.conv_out.weight)
        torch.nn.init.zeros_(self.conv_out.bias)

    def forward(self, x):
        return x + self.conv_out(self.blocks(torch.relu(self.conv_in(x))))


def mse_loss(net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of ``net(x)`` against ``target`` (inside ``mask`` when given)."""
    err = (net(x) - target) ** 2
    if mask is None:
        return err.mean()
    m = mask.expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)
