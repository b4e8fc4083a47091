"""The displacement-predicting U-Net of uniGradICON ("tallUNet2"), written for 3-D volumes.

A pre-activation residual U-Net: every convolution sees ``leaky_relu(x)`` (slope 0.01) and its
output is added to a resized copy of its input. The parameter names (``downConvs.N``,
``upConvs.N``, ``batchNorms.N``, ``lastConv``) are those of the official checkpoints, so a
uniGradICON state dict loads into :class:`UNet2` unchanged.

Example
-------
>>> import torch
>>> net = UNet2(down_channels=(8, 16), up_channels=(8, 16))
>>> a = b = torch.zeros(1, 1, 9, 9, 9)
>>> net(a, b).shape
torch.Size([1, 3, 9, 9, 9])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regpipe.errors import InputError

__all__ = ["UNet2", "min_unet_input_size"]

#: Slope of the leaky ReLU applied before every convolution.
LEAKY_SLOPE = 0.01
#: The network output is divided by this, so a fresh network predicts small displacements.
OUTPUT_DIVISOR = 10


def min_unet_input_size(levels: int) -> int:
    """Smallest spatial size (per axis) a :class:`UNet2` with ``levels`` levels accepts.

    Each level halves the size (rounding up); the average pooling of the last level needs at
    least 2 voxels, so the input must exceed ``2 ** (levels - 1)``.
    """
    return 2 ** (levels - 1) + 1


def _fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, or prepend zero channels up to it.

    Parameters
    ----------
    x
        Tensor ``[B, C, ...]``.
    channels
        Wanted channel count.

    Returns
    -------
    Tensor ``[B, channels, ...]``: ``x[:, :channels]`` when ``C >= channels``, otherwise ``x``
    placed in the *last* ``C`` channels after ``channels - C`` zero channels.
    """
    have = x.shape[1]
    if have >= channels:
        return x[:, :channels]
    spatial_pad = [0, 0] * (x.dim() - 2)
    return F.pad(x, [*spatial_pad, channels - have, 0])


class UNet2(nn.Module):
    """Residual U-Net predicting a 3-channel displacement field from two images.

    Parameters
    ----------
    down_channels
        Output channels of the encoder levels, finest first; uniGradICON uses
        ``(16, 32, 64, 256, 512)``.
    up_channels
        Output channels of the decoder levels, finest first (same length as
        ``down_channels``); uniGradICON uses ``(16, 32, 64, 128, 256)``.
    input_channels
        Channels of *each* image; the network input is their concatenation
        (``2 * input_channels`` channels).
    device
        Where to create the parameters (``"meta"`` builds a shape-only network).

    Notes
    -----
    ``forward(moving, fixed)`` takes two ``[B, input_channels, n0, n1, n2]`` tensors and returns
    ``[B, 3, n0, n1, n2]``: a displacement in normalised units (1 = the whole grid along that
    axis), channel ``c`` along tensor axis ``c + 2``. ``lastConv`` starts at zero, so an
    untrained network outputs zeros. Each axis must be at least
    :func:`min_unet_input_size` ``(len(down_channels))``.
    """

    def __init__(
        self,
        down_channels: Sequence[int] = (16, 32, 64, 256, 512),
        up_channels: Sequence[int] = (16, 32, 64, 128, 256),
        input_channels: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if len(down_channels) != len(up_channels) or not down_channels:
            raise InputError(
                "down_channels and up_channels must be non-empty and of equal length, got "
                f"{tuple(down_channels)} and {tuple(up_channels)}"
            )
        if input_channels < 1 or min(*down_channels, *up_channels) < 1:
            raise InputError("channel counts must be positive integers")
        self.levels = len(down_channels)
        encoder = (2 * input_channels, *down_channels)
        # Decoder level d sees the level above (up_channels[d + 1], none at the bottom)
        # concatenated with the skip of encoder output d.
        decoder_in = [
            down_channels[d] + (up_channels[d + 1] if d + 1 < self.levels else 0)
            for d in range(self.levels)
        ]
        self.downConvs = nn.ModuleList()
        self.upConvs = nn.ModuleList()
        self.batchNorms = nn.ModuleList(nn.BatchNorm3d(c, device=device) for c in up_channels)
        # Interleaved creation keeps PyTorch's default initialisation in the same RNG order as
        # the reference implementation (so equal seeds give equal initial weights).
        for d in range(self.levels):
            self.downConvs.append(
                nn.Conv3d(
                    encoder[d], encoder[d + 1], kernel_size=3, stride=2, padding=1, device=device
                )
            )
            self.upConvs.append(
                nn.ConvTranspose3d(
                    decoder_in[d],
                    up_channels[d],
                    kernel_size=4,
                    stride=2,
                    padding=1,
                    device=device,
                )
            )
        self.lastConv = nn.Conv3d(
            encoder[0] + up_channels[0], 3, kernel_size=3, padding=1, device=device
        )
        nn.init.zeros_(self.lastConv.weight)
        if self.lastConv.bias is not None:
            nn.init.zeros_(self.lastConv.bias)

    @property
    def min_input_size(self) -> int:
        """Smallest accepted spatial size along each axis."""
        return min_unet_input_size(self.levels)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Predict a displacement ``[B, 3, n0, n1, n2]`` (normalised units) for the pair."""
        x = torch.cat([moving, fixed], dim=1)
        skips: list[torch.Tensor] = []
        for conv in self.downConvs:
            skips.append(x)
            y = conv(F.leaky_relu(x, LEAKY_SLOPE))
            shortcut = F.avg_pool3d(x, kernel_size=2, ceil_mode=True)
            x = y + _fit_channels(shortcut, y.shape[1])
        for d in reversed(range(self.levels)):
            y = self.upConvs[d](F.leaky_relu(x, LEAKY_SLOPE))
            shortcut = F.interpolate(
                _fit_channels(x, y.shape[1]),
                scale_factor=2,
                mode="trilinear",
                align_corners=False,
            )
            x = self.batchNorms[d](y + shortcut)
            skip = skips[d]
            x = x[:, :, : skip.shape[2], : skip.shape[3], : skip.shape[4]]
            x = torch.cat([x, skip], dim=1)
        return self.lastConv(x) / OUTPUT_DIVISOR
