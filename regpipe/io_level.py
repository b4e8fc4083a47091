"""One resolution level of the fast instance optimisation, and the local NCC it maximises.

:class:`Level` holds the fixed and the (pre-warped) moving image of one level on the cropped
box, with the fixed image's local statistics computed once; :class:`WarpedLNCC` is the LNCC of
the moving image warped by a displacement, with an analytic backward pass (the derivative of
LNCC with respect to the warped image times the image gradient), which on a CPU is smoother
and much cheaper than autograd through the interpolation. :func:`lncc` evaluates the same
measure on two volumes. The box sums are separable shifted additions (:func:`box_mean`).
:mod:`regpipe.fast_io` runs the optimisation over these levels.

Example
-------
>>> import torch
>>> generator = torch.Generator().manual_seed(0)
>>> a, b = torch.rand(2, 1, 1, 12, 12, 12, generator=generator)
>>> lncc(a, a, window=5) > 0.99, lncc(a, b, window=5) < 0.5
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from regpipe.spaces import sampling_identity

if TYPE_CHECKING:
    from regpipe.fast_io import FastIOSettings

__all__ = [
    "Level",
    "WarpedLNCC",
    "box_mean",
    "central_difference",
    "downsample",
    "level_size",
    "lncc",
    "window_voxels",
]


@dataclass
class Level:
    """Images of one resolution level on the cropped box."""

    shape: tuple[int, ...]
    spacing: torch.Tensor  # [3] mm per level voxel along (d0, d1, d2)
    fixed: torch.Tensor  # [1, 1, ...]
    moving: torch.Tensor  # [1, 1, ...]
    fixed_gradient: torch.Tensor | None  # [1, 3, ...] per level voxel, when ESM is used
    identity: torch.Tensor  # [1, ..., 3] grid_sample coordinates of the level's voxels
    to_normalised: torch.Tensor  # [3] factor from level-index displacement to grid_sample units
    fixed_mean: torch.Tensor
    fixed_var: torch.Tensor  # local variance of fixed plus eps
    weight: torch.Tensor | None  # LNCC averaging weights (mask, sum 1), None for a plain mean
    window: int
    moving_eps: float

    @classmethod
    def build(
        cls,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        mask: torch.Tensor | None,
        crop_shape: tuple[int, ...],
        spacing: torch.Tensor,
        scale: float,
        settings: FastIOSettings,
    ) -> Level:
        shape = level_size(crop_shape, scale)
        extent = (torch.tensor(crop_shape, dtype=torch.float32) - 1).clamp(min=1)
        level_spacing = (extent * spacing.cpu() / (torch.tensor(shape) - 1).clamp(min=1)).to(
            fixed.device
        )
        fixed_l = downsample(fixed, shape, scale)
        moving_l = downsample(moving, shape, scale)
        weight = None
        if mask is not None:
            weight = F.interpolate(mask, size=shape, mode="trilinear", align_corners=True)
            weight = weight / weight.sum().clamp(min=1e-6)
        window = window_voxels(settings.window_mm, level_spacing)
        stats = box_mean(torch.cat([fixed_l, fixed_l * fixed_l], dim=1), window)
        fixed_mean = stats[:, :1]
        fixed_var = (stats[:, 1:] - fixed_mean * fixed_mean).clamp(min=0) + settings.eps
        sizes = torch.tensor(shape, dtype=torch.float32, device=fixed.device)
        return cls(
            shape=shape,
            spacing=level_spacing,
            fixed=fixed_l,
            moving=moving_l.contiguous(),
            fixed_gradient=central_difference(fixed_l) if settings.esm else None,
            identity=sampling_identity(shape, fixed.device),
            to_normalised=2.0 / (sizes - 1).clamp(min=1),
            fixed_mean=fixed_mean,
            fixed_var=fixed_var,
            weight=weight,
            window=window,
            moving_eps=settings.moving_eps,
        )

    def warp(self, w: torch.Tensor) -> torch.Tensor:
        """Moving image sampled at ``identity + w`` (``w``: ``[1, 3, ...]`` level-index units)."""
        offset = (w * self.to_normalised.view(1, 3, 1, 1, 1)).permute(0, 2, 3, 4, 1).flip(-1)
        return F.grid_sample(
            self.moving, self.identity + offset, mode="bilinear", padding_mode="border",
            align_corners=True,
        )

    def similarity(self, warped: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """LNCC of ``warped`` with the fixed image and the local statistics its gradient needs.

        ``cc = cov^2 / ((var_f + eps) (var_m + moving_eps))`` per window, averaged over the
        level's voxels (or weighted by the mask).
        """
        stats = box_mean(torch.cat([warped, warped * warped, warped * self.fixed], 1), self.window)
        mean, square, cross = stats[:, :1], stats[:, 1:2], stats[:, 2:]
        covariance = cross - self.fixed_mean * mean
        variance = (square - mean * mean).clamp_(min=0).add_(self.moving_eps)
        cc = covariance * covariance / (self.fixed_var * variance)
        if self.weight is None:
            value = cc.mean()
        else:
            value = (cc * self.weight).sum()
        return value, (mean, covariance, variance)

    def similarity_gradient(
        self, warped: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
        variance: torch.Tensor,
    ) -> torch.Tensor:
        """Derivative of :meth:`similarity`'s value with respect to every warped voxel.

        With ``a = 2 w cov / (var_f' var_m')`` and ``b = a cov / var_m'`` per window (``w`` the
        window's averaging weight) and ``K`` the (symmetric) box filter, it is
        ``F K(a) - K(a mean_f) - M K(b) + K(b mean_m)``.
        """
        a = 2.0 * covariance / (self.fixed_var * variance)
        a = a * (1.0 / warped.numel()) if self.weight is None else a * self.weight
        b = a * covariance / variance
        terms = box_mean(torch.cat([a, a * self.fixed_mean, b, b * mean], 1), self.window)
        return self.fixed * terms[:, :1] - terms[:, 1:2] - warped * terms[:, 2:3] + terms[:, 3:]


class WarpedLNCC(torch.autograd.Function):
    """LNCC between the fixed image and the moving image warped by ``w`` (level-index units).

    The backward pass is analytic: the derivative of LNCC with respect to the warped image
    (:meth:`Level.similarity_gradient`) times the image gradient, taken as the central
    differences of the warped image on the level grid, averaged with the fixed image's when
    ``esm`` is set (efficient second-order minimisation), instead of differentiating the
    trilinear interpolation: smoother, and much cheaper than autograd on CPU.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, level: Level) -> torch.Tensor:
        warped = level.warp(w)
        value, stats = level.similarity(warped)
        ctx.level = level
        ctx.save_for_backward(warped, *stats)
        return value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        warped, mean, covariance, variance = ctx.saved_tensors
        level: Level = ctx.level
        d_warped = level.similarity_gradient(warped, mean, covariance, variance)
        gradient = central_difference(warped)
        if level.fixed_gradient is not None:
            gradient = gradient.add_(level.fixed_gradient).mul_(0.5)
        return gradient.mul_(d_warped * grad_output), None


def box_mean(volume: torch.Tensor, window: int) -> torch.Tensor:
    """Separable box average (``window`` odd, zero padding) of every channel of ``[1, C, ...]``.

    Shifted in-place additions of narrowed views: on CPU several times faster than grouped
    convolutions or cumulative sums for the window sizes used here.
    """
    half = window // 2
    out = volume
    for dim in range(2, 5):
        n = out.shape[dim]
        source = out
        out = source.clone()
        for shift in range(1, min(half, n - 1) + 1):
            out.narrow(dim, shift, n - shift).add_(source.narrow(dim, 0, n - shift))
            out.narrow(dim, 0, n - shift).add_(source.narrow(dim, shift, n - shift))
    return out * (1.0 / window**3)


def central_difference(volume: torch.Tensor) -> torch.Tensor:
    """Central differences (one-sided at the edges) of ``[1, 1, ...]`` -> ``[1, 3, ...]`` per
    voxel."""
    out = torch.empty((1, 3, *volume.shape[2:]), dtype=volume.dtype, device=volume.device)
    for axis in range(3):
        dim = axis + 2
        n = volume.shape[dim]
        target = out[:, axis : axis + 1]
        if n < 2:
            target.zero_()
            continue
        if n > 2:
            target.narrow(dim, 1, n - 2).copy_(
                (volume.narrow(dim, 2, n - 2) - volume.narrow(dim, 0, n - 2)) * 0.5
            )
        target.narrow(dim, 0, 1).copy_(volume.narrow(dim, 1, 1) - volume.narrow(dim, 0, 1))
        target.narrow(dim, n - 1, 1).copy_(
            volume.narrow(dim, n - 1, 1) - volume.narrow(dim, n - 2, 1)
        )
    return out


def lncc(
    a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5,
    mask: torch.Tensor | None = None,
) -> float:
    """Local normalised cross-correlation (mean local squared correlation) of two volumes.

    Parameters
    ----------
    a, b
        ``[1, 1, n0, n1, n2]`` images (intensities in [0, 1]).
    window
        Box window width in voxels (odd).
    eps
        Variance floor added to both local variances.
    mask
        Optional ``[1, 1, ...]`` region; the mean is taken over its nonzero voxels.

    Returns
    -------
    float
        In [0, 1]; 1 means perfectly correlated everywhere.
    """
    window = int(window) | 1
    with torch.no_grad():
        a = a.float()
        b = b.float()
        stats = box_mean(torch.cat([a, b, a * a, b * b, a * b], 1), window)
        ma, mb, aa, bb, ab = stats.unbind(1)
        cov = ab - ma * mb
        var_a = (aa - ma * ma).clamp(min=0) + eps
        var_b = (bb - mb * mb).clamp(min=0) + eps
        cc = cov * cov / (var_a * var_b)
        if mask is None:
            return float(cc.mean())
        weight = (mask[:, 0] != 0).float()
        return float((cc * weight).sum() / weight.sum().clamp(min=1))


def level_size(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """Grid size spanning the same box as ``shape`` with ``factor`` times the spacing."""
    return tuple(max(round((n - 1) / factor) + 1, 2) for n in shape)


def window_voxels(window_mm: float, spacing: torch.Tensor, minimum: int = 3) -> int:
    """Odd window width (voxels, >= ``minimum``) closest to ``window_mm`` at the mean spacing."""
    voxels = window_mm / float(spacing.mean())
    return max(minimum, 2 * math.floor((voxels - 1) / 2 + 0.5) + 1)


def downsample(volume: torch.Tensor, shape: tuple[int, ...], factor: float) -> torch.Tensor:
    """Gaussian anti-aliasing (sigma = factor / 2 voxels) then trilinear resampling to
    ``shape``."""
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume
    sigma = factor / 2.0
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = volume
    for axis in range(3):
        size = [1, 1, 1]
        size[axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = radius
        pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(1, 1, *size))
    return F.interpolate(out, size=shape, mode="trilinear", align_corners=True)
