"""Synthetic training images from label maps (the SynthMorph recipe), in PyTorch.

Everything works on network-grid tensors ``[B, C, n0, n1, n2]`` with normalised coordinates
(``0`` and ``1`` are the centres of the first and last voxel of an axis, channel ``c`` along
tensor axis ``c + 2``, as in :mod:`regpipe.networks`), so a pair costs a few tens of
milliseconds on the CPU.

Pieces, each random given a :class:`torch.Generator`:

:func:`random_shapes`
    A label map made from noise: ``K`` smooth random fields, the arg-max per voxel.
:func:`random_spatial_map`
    Coordinates of a random affine (rotation, scaling, shear, translation) followed by a
    smooth random displacement (noise at a coarse resolution, upsampled).
:func:`sample_labels`
    Nearest-neighbour sampling of a label volume at such coordinates.
:func:`synthesize`
    An image from a label map: a random mean intensity per label, noise inside labels,
    blur, a multiplicative bias field, a gamma and additive noise, scaled to ``[0, 1]``.

Example
-------
>>> g = torch.Generator().manual_seed(0)
>>> labels = random_shapes((32, 32, 32), n_labels=8, generator=g)
>>> coords = random_spatial_map((32, 32, 32), generator=g)
>>> image = synthesize(sample_labels(labels, coords), generator=g)
>>> image.shape, float(image.min()) >= 0.0, float(image.max()) <= 1.0
(torch.Size([1, 1, 32, 32, 32]), True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.losses import gaussian_blur
from regpipe.spaces import identity_grid

__all__ = [
    "DeformationRange",
    "IntensityRange",
    "apply_affine",
    "augment_intensity",
    "random_affine",
    "random_shapes",
    "random_spatial_map",
    "sample_image",
    "sample_labels",
    "synthesize",
]

Shape = Sequence[int]


@dataclass(frozen=True)
class DeformationRange:
    """Ranges of the random spatial maps (uniform draws in ``[-x, x]`` unless stated).

    Attributes
    ----------
    rotation_deg
        Rotation about each axis, degrees.
    scaling
        Log-uniform scaling per axis in ``[1 / (1 + s), 1 + s]``.
    shear
        Off-diagonal entries of the linear part.
    translation
        Shift as a fraction of the extent of each axis.
    warp
        Largest standard deviation of the smooth displacement, fraction of the extent.
    warp_resolution
        Control points per axis of the smooth displacement (random in this closed range).
    """

    rotation_deg: float = 10.0
    scaling: float = 0.1
    shear: float = 0.03
    translation: float = 0.04
    warp: float = 0.025
    warp_resolution: tuple[int, int] = (4, 10)

    def __post_init__(self) -> None:
        values = (self.rotation_deg, self.scaling, self.shear, self.translation, self.warp)
        if min(values) < 0:
            raise InputError(f"deformation ranges must be >= 0, got {self}")
        low, high = self.warp_resolution
        if not 2 <= low <= high:
            raise InputError(f"warp_resolution must satisfy 2 <= low <= high, got {low, high}")


@dataclass(frozen=True)
class IntensityRange:
    """Ranges of :func:`synthesize` and :func:`augment_intensity`.

    Attributes
    ----------
    label_noise
        Largest SD of the per-label texture noise (image units, means are in ``[0, 1]``).
    blur
        Largest Gaussian blur, voxels.
    bias
        Largest SD of the log bias field.
    gamma
        Log-uniform gamma in ``[exp(-g), exp(g)]``.
    noise
        Largest SD of the additive noise after normalisation.
    """

    label_noise: float = 0.05
    blur: float = 1.0
    bias: float = 0.3
    gamma: float = 0.25
    noise: float = 0.03


def _uniform(
    low: float, high: float, generator: torch.Generator, size: Shape = ()
) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(size), generator=generator)


def _smooth_noise(
    shape: Shape, resolution: int, generator: torch.Generator, channels: int = 1
) -> torch.Tensor:
    """Noise drawn on a ``resolution^3`` lattice, upsampled (trilinear) to ``shape``."""
    coarse = torch.randn((1, channels, resolution, resolution, resolution), generator=generator)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)


def random_shapes(
    shape: Shape, n_labels: int = 16, generator: torch.Generator | None = None, resolution: int = 6
) -> torch.Tensor:
    """A random label map ``[1, 1, *shape]`` (int64 labels ``0..n_labels-1``) made from noise.

    Each label owns a smooth noise field (``resolution`` control points per axis); every voxel
    takes the label of the largest field, which gives blob-like regions of varied size.
    """
    if n_labels < 2:
        raise InputError(f"n_labels must be >= 2, got {n_labels}")
    generator = generator or torch.Generator().manual_seed(0)
    fields = _smooth_noise(shape, resolution, generator, channels=n_labels)
    return fields.argmax(dim=1, keepdim=True)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    matrix = torch.eye(3)
    for axis, angle in enumerate(angles.tolist()):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rotation = torch.eye(3)
        rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
        matrix = rotation @ matrix
    return matrix


def random_affine(
    ranges: DeformationRange | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(matrix [3, 3], translation [3])`` drawn from the affine part of ``ranges``:
    rotation x scaling x shear, and a shift in units of each axis's extent."""
    ranges = ranges or DeformationRange()
    generator = generator or torch.Generator().manual_seed(0)
    angles = _uniform(-1, 1, generator, (3,)) * math.radians(ranges.rotation_deg)
    log_scale = _uniform(-1, 1, generator, (3,)) * math.log1p(ranges.scaling)
    shear = torch.eye(3) + _uniform(-1, 1, generator, (3, 3)) * ranges.shear * (1 - torch.eye(3))
    matrix = _rotation(angles) @ torch.diag(torch.exp(log_scale)) @ shear
    translation = _uniform(-1, 1, generator, (3,)) * ranges.translation
    return matrix, translation


def apply_affine(
    coordinates: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``c + A (x - c) + t`` for normalised coordinates ``[B, 3, ...]`` (``c`` = the centre)."""
    matrix, translation = affine
    mapped = torch.einsum("ij,bj...->bi...", matrix, coordinates - 0.5) + 0.5
    return mapped + translation.view(1, 3, *([1] * (coordinates.dim() - 2)))


def random_spatial_map(
    shape: Shape,
    ranges: DeformationRange | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random coordinates ``[1, 3, *shape]``: where each output voxel samples its source.

    The map is ``x -> c + A (x - c) + t + u(x)`` in normalised units, with ``c`` the centre,
    ``A`` rotation x scaling x shear, ``t`` a translation and ``u`` a smooth displacement
    (see :class:`DeformationRange`). Scaling is applied in units of each axis's extent, so
    squashed and isotropic grids both keep their relative proportions.
    """
    ranges = ranges or DeformationRange()
    generator = generator or torch.Generator().manual_seed(0)
    mapped = apply_affine(identity_grid(tuple(shape)), random_affine(ranges, generator))
    if ranges.warp > 0:
        low, high = ranges.warp_resolution
        resolution = int(torch.randint(low, high + 1, (1,), generator=generator))
        amplitude = float(_uniform(0, ranges.warp, generator))
        mapped = mapped + amplitude * _smooth_noise(shape, resolution, generator, channels=3)
    return mapped


def _grid_sample(
    volume: torch.Tensor, coordinates: torch.Tensor, mode: str, padding: str
) -> torch.Tensor:
    grid = (coordinates * 2.0 - 1.0).flip(1).permute(0, 2, 3, 4, 1)
    if grid.shape[0] != volume.shape[0]:
        grid = grid.expand(volume.shape[0], *grid.shape[1:])
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding, align_corners=True)


def sample_labels(labels: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour labels ``[B, 1, *coords_shape]`` (int64; 0 outside the volume)."""
    values = _grid_sample(labels.to(torch.float32), coordinates, "nearest", "zeros")
    return values.round().to(torch.int64)


def sample_image(image: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Trilinear sampling of an image (0 outside the volume)."""
    return _grid_sample(image.to(torch.float32), coordinates, "bilinear", "zeros")


def _normalise(image: torch.Tensor) -> torch.Tensor:
    low = image.amin(dim=(1, 2, 3, 4), keepdim=True)
    high = image.amax(dim=(1, 2, 3, 4), keepdim=True)
    return (image - low) / (high - low).clamp_min(1e-6)


def augment_intensity(
    image: torch.Tensor,
    ranges: IntensityRange | None = None,
    generator: torch.Generator | None = None,
    blur: bool = True,
) -> torch.Tensor:
    """Blur, bias field, gamma and noise on an image in ``[0, 1]``; returns ``[0, 1]``.

    The background (exact zeros before augmentation) stays zero, like a skull-stripped or
    masked scan after preprocessing.
    """
    ranges = ranges or IntensityRange()
    generator = generator or torch.Generator().manual_seed(0)
    support = image > 0
    shape = image.shape[2:]
    if blur and ranges.blur > 0:
        sigma = float(_uniform(0, ranges.blur, generator))
        if sigma > 0.2:
            image = gaussian_blur(image, sigma)
    if ranges.bias > 0:
        strength = float(_uniform(0, ranges.bias, generator))
        image = image * torch.exp(strength * _smooth_noise(shape, 4, generator))
    image = _normalise(image.clamp_min(0))
    if ranges.gamma > 0:
        gamma = math.exp(float(_uniform(-ranges.gamma, ranges.gamma, generator)))
        image = image.clamp_min(0) ** gamma
    if ranges.noise > 0:
        sd = float(_uniform(0, ranges.noise, generator))
        image = image + sd * torch.randn(image.shape, generator=generator)
    image = image.clamp(0, 1) * support
    return image


def synthesize(
    labels: torch.Tensor,
    ranges: IntensityRange | None = None,
    generator: torch.Generator | None = None,
    means: torch.Tensor | None = None,
    zero_labels: Sequence[int] = (0,),
) -> torch.Tensor:
    """An image ``[B, 1, *shape]`` in ``[0, 1]`` from an int64 label map ``[B, 1, *shape]``.

    Parameters
    ----------
    labels
        Label map; values index ``means``.
    means
        Mean intensity per label (``[n_labels]``); drawn uniformly in ``[0.05, 1]`` when
        ``None``. Pass the same tensor for two images to give them the same contrast.
    zero_labels
        Labels rendered as background (intensity 0), such as 0 or the non-brain labels of a
        head label map when skull-stripped images are wanted.
    """
    ranges = ranges or IntensityRange()
    generator = generator or torch.Generator().manual_seed(0)
    n_labels = int(labels.max()) + 1
    if means is None:
        means = _uniform(0.05, 1.0, generator, (n_labels,))
    elif means.numel() < n_labels:
        raise InputError(f"means has {means.numel()} entries, the labels need {n_labels}")
    means = means.clone()
    for label in zero_labels:
        if label < means.numel():
            means[label] = 0.0
    image = means[labels]
    if ranges.label_noise > 0:
        texture = float(_uniform(0, ranges.label_noise, generator))
        noise = texture * torch.randn(image.shape, generator=generator)
        image = (image + noise * (image > 0)).clamp_min(0)
    return augment_intensity(image, ranges, generator)
