"""Affine pre-alignment: fixed -> moving world (RAS+ mm) matrices.

Two registrations with one signature and one result, an
:class:`~regpipe.transforms.AffineTransform` mapping **fixed** points to **moving** points
(pull-back), ready to be composed into a deformable transform:

* :func:`affine_register`, our own, in PyTorch. Both images are normalised (robust percentile
  range, then rank-equalised foreground, so that two T1w images or two CTs relate linearly),
  box-filtered to about 6, 3 and 1.5 mm, and aligned coarse to fine by maximising the global
  (optionally masked) normalised cross-correlation with Levenberg-Marquardt (Gauss-Newton)
  steps. Parameters are well conditioned: translation in mm, and rotation, log-scales and
  shears as the displacement (mm) they cause at the object's radius, all about the fixed
  image's centre of mass; the start aligns the intensity centres of mass. On a 1 mm brain pair
  it takes about 1-1.5 s of one CPU core and beats ANTs' ``Affine`` on landmark error
  (``benchmarks/affine_benchmark.py``).
* :func:`regpipe.ants_affine.ants_affine_register`, ANTs' ``antsRegistration`` through antspyx
  (about 20-50 s), with the same inputs checked by :func:`check_image`, :func:`check_mask` and
  :func:`check_levels`.

Example
-------
>>> transform = affine_register(fixed, fixed_geometry, moving, moving_geometry)  # doctest: +SKIP
>>> moving_points = transform.map_points(fixed_points)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from tqdm.auto import tqdm

from regpipe.errors import InputError, ResourceError
from regpipe.spaces import (
    Geometry,
    to_network_tensor,
)
from regpipe.transforms import AffineTransform

LOGGER = logging.getLogger("regpipe")

Init = Literal["com", "geometry", "identity"]

#: Grid spacings (mm) of the resolution levels, coarsest first.
DEFAULT_LEVELS: tuple[float, ...] = (6.0, 3.0, 1.5)
#: Most similarity evaluations (Levenberg-Marquardt steps) per level.
DEFAULT_ITERATIONS: tuple[int, ...] = (30, 20, 10)
#: Degrees of freedom accepted: rigid, similarity, rigid + 3 scales, full affine.
SUPPORTED_DOF: tuple[int, ...] = (6, 7, 9, 12)

#: Most fixed-image points one level samples (a fixed, seeded subset beyond that).
_MAX_POINTS = 60_000
#: Intensity percentiles (%) mapped to 0 and 1 by the normalisation.
_PERCENTILES = (0.5, 99.5)
#: Spacing (mm) of the coarse copy giving centres of mass, radius and foreground box.
_COARSE = 4.0
#: Normalised intensity below which a voxel does not count for the centre of mass / bounding box.
_FOREGROUND = 0.05
#: A level ends when no parameter would move more than this fraction of its spacing (mm).
_TOLERANCE = 0.02
#: A level also ends after this many rejected steps in a row (float32 noise at the optimum).
_MAX_REJECTED = 3


@dataclass(frozen=True)
class _Level:
    """One resolution level: fixed samples and the box-filtered moving image."""

    points: torch.Tensor  # [N, 3] fixed RAS+ mm relative to the fixed centre of mass
    fixed_values: torch.Tensor  # [N] float64
    fixed_weights: torch.Tensor  # [N] float64, in [0, 1]
    moving: torch.Tensor  # [1, 5, k, j, i]: intensity, weight, gradient along i, j, k (per voxel)
    gradient_to_world: torch.Tensor  # [3, 3]: row gradient per voxel @ this = per RAS+ mm
    world_to_moving: torch.Tensor  # [4, 4] float64: RAS+ mm -> grid_sample coordinates
    spacing: float  # mm


def affine_register(
    fixed: NDArray[np.generic],
    fixed_geometry: Geometry,
    moving: NDArray[np.generic],
    moving_geometry: Geometry,
    *,
    fixed_mask: NDArray[np.generic] | None = None,
    moving_mask: NDArray[np.generic] | None = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    iterations: Sequence[int] = DEFAULT_ITERATIONS,
    dof: int = 12,
    init: Init = "com",
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> AffineTransform:
    """Affine registration: the RAS+ mm matrix mapping fixed points to moving points.

    Parameters
    ----------
    fixed, moving
        3-D intensity arrays ``[i, j, k]`` (any real dtype; NaN counts as background). Their
        ranges need not match: each is mapped to ``[0, 1]`` by its 0.5th and 99.5th
        percentiles, then its foreground is rank-equalised.
    fixed_geometry, moving_geometry
        Their voxel grids in RAS+ mm (any orientation, oblique or anisotropic).
    fixed_mask, moving_mask
        Optional arrays on the same grids; only nonzero voxels count, in the similarity and
        in the centre of mass.
    levels
        Resolution levels, coarsest first: approximate spacings in mm. Each image is
        box-filtered by ``floor(level / voxel size)`` voxels along each axis, so a level
        finer than the voxels uses the image as it is.
    iterations
        Most Levenberg-Marquardt steps at each level (same length as ``levels``); a level
        usually converges in 3-10.
    dof
        6 (rigid), 7 (rigid + one scale), 9 (rigid + three scales) or 12 (full affine).
    init
        ``"com"`` aligns intensity centres of mass, ``"geometry"`` the centres of the image
        grids, ``"identity"`` starts from the identity.
    progress
        Show a tqdm progress bar (one tick per step).
    device
        Torch device for the optimisation.

    Returns
    -------
    AffineTransform
        ``T(x) = M x`` mapping fixed-space RAS+ mm points to moving-space RAS+ mm points.
        Deterministic for given inputs (fixed random point subsets).

    Raises
    ------
    InputError
        On an empty or constant image, an empty mask, mismatched shapes or invalid options.
    ResourceError
        When a CUDA device is requested but none is available.
    """
    levels, iterations = _check_options(levels, iterations, dof, init)
    torch_device = _torch_device(device)
    fixed_data = check_image(fixed, fixed_geometry, "fixed")
    moving_data = check_image(moving, moving_geometry, "moving")
    fixed_weight = check_mask(fixed_mask, fixed_geometry, "fixed_mask")
    moving_weight = check_mask(moving_mask, moving_geometry, "moving_mask")

    fixed_image = _Image.build(fixed_data, fixed_geometry, fixed_weight, torch_device)
    moving_image = _Image.build(moving_data, moving_geometry, moving_weight, torch_device)
    fixed_centre = fixed_image.centre_of_mass()
    moving_centre = _initial_moving_centre(init, fixed_centre, fixed_image, moving_image)
    radius = fixed_image.radius(fixed_centre)

    params = torch.zeros(dof, dtype=torch.float64, device=torch_device)  # see _linear
    centre = torch.as_tensor(moving_centre, dtype=torch.float64, device=torch_device)
    with tqdm(total=sum(iterations), desc="affine", unit="step", disable=not progress) as bar:
        for index, (spacing, steps) in enumerate(zip(levels, iterations, strict=True)):
            level = _build_level(fixed_image, moving_image, spacing, fixed_centre)
            params = _optimise(level, _Start(params, centre, radius), steps, bar)
            if index == 0 and init == "com":
                params, moving_centre = _other_starts(level, params, moving_centre,
                                                      fixed_centre, fixed_image, moving_image,
                                                      radius, steps)
                centre = torch.as_tensor(moving_centre, dtype=torch.float64,
                                         device=torch_device)
    linear = _linear(params[3:].cpu(), radius).numpy()
    return _to_transform(linear, params[:3].cpu().numpy(), fixed_centre, moving_centre)


#: Another start replaces the centre-of-mass start's result at the coarsest level when its NCC
#: is higher by more than this (or when only it has plausible scales): a moving image that
#: covers only part of the fixed one, a slab, puts its centre of mass far from the matching
#: point, where the optimiser squashes it onto what it overlaps. On whole images the starts
#: reach the same optimum (within 0.001 on the development pairs) and nothing changes.
RESTART_MARGIN = 0.01
#: Singular values of a plausible linear part (fixed -> moving scales): beyond these, a
#: start's result is a squashed or stretched fit of a partial overlap.
PLAUSIBLE_SCALE = (0.5, 2.0)


def _plausible(params: torch.Tensor, radius: float) -> bool:
    scales = torch.linalg.svdvals(_linear(params[3:].cpu(), radius))
    return bool(scales.min() >= PLAUSIBLE_SCALE[0] and scales.max() <= PLAUSIBLE_SCALE[1])


def _other_starts(level: _Level, params: torch.Tensor, moving_centre: NDArray[np.float64],
                  fixed_centre: NDArray[np.float64], fixed: _Image, moving: _Image,
                  radius: float, steps: int) -> tuple[torch.Tensor, NDArray[np.float64]]:
    """``(params, moving centre)`` after the coarsest level: the centre-of-mass start's
    (given) unless the identity (header) or grid-centre start, each optimised at the same
    level, does better: plausible scales where it has none, else an NCC higher by more than
    :data:`RESTART_MARGIN`."""
    def score(found: torch.Tensor, centre: NDArray[np.float64]) -> tuple[bool, float]:
        ncc = _evaluate(level, found, _tensor(centre, found), radius).ncc
        return _plausible(found, radius) and math.isfinite(ncc), ncc

    first = score(params, moving_centre)
    best = (first, params, moving_centre)
    with tqdm(disable=True) as quiet:
        for init in ("identity", "geometry"):
            centre = _initial_moving_centre(init, fixed_centre, fixed, moving)
            found = _optimise(level, _Start(torch.zeros_like(params), _tensor(centre, params),
                                            radius), steps, quiet)
            (plausible, ncc), ((was_plausible, was_ncc), _, _) = score(found, centre), best
            if (plausible and not was_plausible) or (
                    plausible == was_plausible and ncc > was_ncc + RESTART_MARGIN):
                best = ((plausible, ncc), found, centre)
    if best[2] is not moving_centre:
        LOGGER.info("affine: the centre-of-mass start reached NCC %.3f at the coarsest level%s, "
                    "another start %.3f: continuing from that one", first[1],
                    "" if first[0] else " with implausible scales", best[0][1])
    if not best[0][0]:  # whichever start won
        LOGGER.warning("affine: its scales are implausible (beyond %g-%g) from every start: "
                       "check that the images show the same anatomy, or use ANTs' affine "
                       "or none", *PLAUSIBLE_SCALE)
    return best[1], best[2]


def _tensor(centre: NDArray[np.float64], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(centre, dtype=torch.float64, device=like.device)


# --------------------------------------------------------------------------- input checks
# (shared with regpipe.ants_affine)


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    spacings = tuple(float(s) for s in levels)
    if not spacings or min(spacings) <= 0 or not all(map(math.isfinite, spacings)):
        raise InputError(f"levels must be positive grid spacings in mm, got {spacings}")
    return spacings


def _check_options(
    levels: Sequence[float], iterations: Sequence[int], dof: int, init: str
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    levels = check_levels(levels)
    iterations = tuple(int(n) for n in iterations)
    if len(iterations) != len(levels) or min(iterations) < 0:
        raise InputError(
            f"iterations {iterations} must give one non-negative count per level {levels}"
        )
    if dof not in SUPPORTED_DOF:
        raise InputError(f"dof must be one of {SUPPORTED_DOF}, got {dof}")
    if init not in ("com", "geometry", "identity"):
        raise InputError(f"init must be 'com', 'geometry' or 'identity', got {init!r}")
    return levels, iterations


def _torch_device(device: str | torch.device) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise InputError(f"unknown device {device!r}") from error
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ResourceError(f"device {device!r} requested but CUDA is not available")
    return torch_device


def check_image(data: NDArray[np.generic], geometry: Geometry, name: str) -> NDArray[np.float32]:
    """Validated float32 copy of a 3-D image (NaN and infinities become 0)."""
    array = _as_volume(data, geometry, name)
    values = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if float(values.max()) <= float(values.min()):
        raise InputError(f"the {name} image is constant: nothing to register")
    return values


def check_mask(
    mask: NDArray[np.generic] | None, geometry: Geometry, name: str
) -> NDArray[np.float32] | None:
    if mask is None:
        return None
    array = (np.nan_to_num(_as_volume(mask, geometry, name)) != 0).astype(np.float32)
    if not array.any():
        raise InputError(f"{name} is empty: no voxel would count")
    return array


def _as_volume(data: NDArray[np.generic], geometry: Geometry, name: str) -> NDArray[np.generic]:
    array = np.asarray(data)
    if array.size == 0:
        raise InputError(f"the {name} image is empty")
    if array.ndim > 3 and all(n == 1 for n in array.shape[3:]):
        array = array.reshape(array.shape[:3])
    if array.shape != geometry.shape:
        raise InputError(f"{name} has shape {array.shape}, its geometry {geometry.shape}")
    if min(array.shape) < 2:
        raise InputError(f"{name} needs at least 2 voxels along each axis, got {array.shape}")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise InputError(f"{name} must hold numbers, got dtype {array.dtype}")
    return array


# --------------------------------------------------------------------------- image pyramid


@dataclass(frozen=True, eq=False)
class _Image:
    """An image on its own voxel grid: normalised intensity and mask weight, network order."""

    volume: torch.Tensor  # [1, 2, k, j, i]: intensity in [0, 1], mask weight
    geometry: Geometry
    _pooled: dict[tuple[int, ...], tuple[torch.Tensor, Geometry]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def build(
        cls,
        data: NDArray[np.float32],
        geometry: Geometry,
        mask: NDArray[np.float32] | None,
        device: torch.device,
    ) -> _Image:
        """Map intensities to ``[0, 1]``: robust (percentile) range, then :func:`_equalise`."""
        low, high = _robust_range(data if mask is None else data[mask > 0])
        intensity = to_network_tensor(data, device)
        weight = torch.ones_like(intensity) if mask is None else to_network_tensor(mask, device)
        intensity = _equalise(((intensity - low) / (high - low)).clamp_(0.0, 1.0), weight)
        return cls(torch.cat([intensity, weight], dim=1), geometry)

    def pooled(self, spacing: float) -> tuple[torch.Tensor, Geometry]:
        """Box-filtered copy averaging ``floor(spacing / voxel size)`` voxels per axis."""
        factors = np.floor(spacing / self.geometry.spacing + 1e-6).astype(int)
        factors = np.clip(factors, 1, np.asarray(self.geometry.shape) // 2)  # keep 2 voxels
        key = tuple(int(f) for f in factors)
        if key not in self._pooled:
            self._pooled[key] = _box_filter(self.volume, self.geometry, factors)
        return self._pooled[key]

    @cached_property
    def foreground(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RAS+ mm points ``[M, 3]`` and weights ``[M]`` of the foreground of a coarse copy.

        The weight is the intensity above a low threshold, times the mask.
        """
        volume, geometry = self.pooled(_COARSE)
        weight = ((volume[0, 0] - _FOREGROUND).clamp(min=0) * volume[0, 1]).flatten()
        inside = torch.nonzero(weight > 0).flatten()
        if inside.numel() == 0:
            raise InputError("no foreground: every voxel is below the low intensity percentile")
        return _voxel_points(geometry, volume.shape[2:], inside).double(), weight[inside].double()

    def centre_of_mass(self) -> NDArray[np.float64]:
        """RAS+ mm intensity centre of mass of the (masked) foreground."""
        points, weight = self.foreground
        return ((weight[:, None] * points).sum(0) / weight.sum()).cpu().numpy()

    def radius(self, centre: NDArray[np.float64]) -> float:
        """RMS distance (mm, at least 10) of the foreground from ``centre``: rotations' lever
        arm."""
        points, weight = self.foreground
        squared = ((points - torch.as_tensor(centre, device=points.device)) ** 2).sum(-1)
        return max(float(torch.sqrt((weight * squared).sum() / weight.sum())), 10.0)

    def box(self, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest RAS+ mm corners of the foreground, widened by ``margin`` mm."""
        points, _ = self.foreground
        return points.min(0).values - margin, points.max(0).values + margin


def _robust_range(values: NDArray[np.float32]) -> tuple[float, float]:
    """Percentile range of the intensities (subsampled for speed; falls back to min/max)."""
    flat = values.ravel(order="K")  # any order will do: no copy of a Fortran-ordered array
    step = max(1, flat.size // 1_000_000)
    low, high = np.percentile(flat[::step], _PERCENTILES)
    if high <= low:
        low, high = float(flat.min()), float(flat.max())
    if high <= low:
        raise InputError("the image is constant inside its mask: nothing to register")
    return float(low), float(high)


def _equalise(intensity: torch.Tensor, weight: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Map foreground intensities in ``[0, 1]`` (above ``_FOREGROUND``, in the mask) to ranks.

    A continuous, monotone map: identity up to ``_FOREGROUND``, then piecewise linear through
    ``bins`` quantiles of the foreground onto ``[_FOREGROUND, 1]``. Tissue contrasts become
    evenly spread, whatever the scanner's contrast curve.
    """
    flat = intensity.flatten()
    step = max(1, flat.numel() // 1_000_000)
    sample = flat[::step][(weight.flatten()[::step] > 0) & (flat[::step] > _FOREGROUND)]
    if sample.numel() < bins:
        return intensity
    probabilities = torch.linspace(0.0, 1.0, bins + 1, device=flat.device)
    head = torch.tensor([0.0, _FOREGROUND], device=flat.device)
    knots = torch.cat([head, torch.quantile(sample, probabilities)])
    ranks = torch.cat([head, _FOREGROUND + (1.0 - _FOREGROUND) * probabilities])
    return _piecewise_linear(intensity, knots, ranks)


def _piecewise_linear(
    values: torch.Tensor, knots: torch.Tensor, targets: torch.Tensor, size: int = 65536
) -> torch.Tensor:
    """Monotone piecewise-linear map of ``values`` in ``[0, 1]`` through ``(knots, targets)``
    (constant beyond the end knots), through a lookup table of ``size`` steps."""
    table = (torch.arange(size + 1, device=values.device) + 0.5) / size
    upper = torch.searchsorted(knots, table).clamp_(1, knots.numel() - 1)
    start, width = knots[upper - 1], (knots[upper] - knots[upper - 1]).clamp_(min=1e-12)
    fraction = ((table - start) / width).clamp_(0.0, 1.0)
    table = torch.lerp(targets[upper - 1], targets[upper], fraction)
    index = (values.clamp(0.0, 1.0) * size).int()  # truncation: floor, as values >= 0
    return torch.index_select(table, 0, index.flatten()).view_as(values)


def _box_filter(
    volume: torch.Tensor, geometry: Geometry, factors: NDArray[np.int64]
) -> tuple[torch.Tensor, Geometry]:
    """Average blocks of ``factors`` voxels (along ``i, j, k``); partial blocks are dropped."""
    if np.all(factors == 1):
        return volume, geometry
    kernel = tuple(int(f) for f in factors[::-1])  # network order (k, j, i)
    pooled = F.avg_pool3d(volume, kernel, stride=kernel)
    shift = np.eye(4)
    shift[:3, :3] = np.diag(factors)
    shift[:3, 3] = (factors - 1) / 2
    shape = tuple(int(n) for n in pooled.shape[2:][::-1])
    return pooled, Geometry(shape, geometry.affine @ shift)  # type: ignore[arg-type]


def _voxel_points(
    geometry: Geometry, network_shape: Sequence[int], flat: torch.Tensor
) -> torch.Tensor:
    """RAS+ mm centres ``[M, 3]`` (float32) of the voxels at flat network-order indices."""
    n1, n2 = int(network_shape[1]), int(network_shape[2])
    ijk = torch.stack([flat % n2, (flat // n2) % n1, flat // (n1 * n2)], dim=-1)
    matrix = torch.as_tensor(geometry.affine, dtype=torch.float32, device=flat.device)
    return ijk.float() @ matrix[:3, :3].T + matrix[:3, 3]


def _initial_moving_centre(
    init: str, fixed_centre: NDArray[np.float64], fixed: _Image, moving: _Image
) -> NDArray[np.float64]:
    """The moving point the fixed centre of mass starts on."""
    if init == "com":
        return moving.centre_of_mass()
    if init == "geometry":
        return fixed_centre + moving.geometry.center_world() - fixed.geometry.center_world()
    return fixed_centre.copy()


def _build_level(
    fixed: _Image, moving: _Image, spacing: float, fixed_centre: NDArray[np.float64]
) -> _Level:
    """Fixed samples and the box-filtered moving image with its gradient at ``spacing`` mm."""
    points, values, weights = _fixed_samples(fixed, spacing, fixed_centre)
    volume, grid = _padded(*moving.pooled(spacing))
    d_k, d_j, d_i = torch.gradient(volume[0, 0])  # per voxel along each axis
    inverse = np.linalg.inv(grid.affine)
    return _Level(
        points=points,
        fixed_values=values,
        fixed_weights=weights,
        moving=torch.stack([volume[0, 0], volume[0, 1], d_i, d_j, d_k])[None].contiguous(),
        world_to_moving=_world_to_sampling(grid, volume.device),
        gradient_to_world=torch.as_tensor(inverse[:3, :3], dtype=torch.float32),
        spacing=spacing,
    )


def _fixed_samples(
    fixed: _Image, spacing: float, centre: NDArray[np.float64]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxels of the box-filtered fixed image near its foreground (at most ``_MAX_POINTS``):
    RAS+ mm positions relative to ``centre`` ``[N, 3]``, intensities and weights ``[N]``."""
    volume, grid = fixed.pooled(spacing)
    weight = volume[0, 1].flatten()
    flat = _sample_indices(weight.numel(), 4 * _MAX_POINTS, weight.device)
    flat = flat[weight[flat] > 1e-3]
    points = _voxel_points(grid, volume.shape[2:], flat)
    low, high = fixed.box(margin=max(12.0, 2 * spacing))
    near = ((points >= low.float()) & (points <= high.float())).all(-1)
    flat, points = flat[near], points[near]
    chosen = _sample_indices(flat.numel(), _MAX_POINTS, flat.device)
    flat, points = flat[chosen], points[chosen]
    offset = torch.as_tensor(centre, dtype=torch.float32, device=points.device)
    values = volume[0, 0].flatten()[flat].double()
    return points - offset, values, weight[flat].double()


def _padded(volume: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, Geometry]:
    """One more voxel on every side: the edge intensity repeated, zero weight.

    Sampled with ``padding_mode="border"``, points beyond the field of view then get weight 0
    and points within its last half voxel the unbiased edge intensity.
    """
    intensity = F.pad(volume[:, :1], (1,) * 6, mode="replicate")
    weight = F.pad(volume[:, 1:], (1,) * 6)
    shift = np.eye(4)
    shift[:3, 3] = -1.0
    shape = tuple(n + 2 for n in geometry.shape)
    return torch.cat([intensity, weight], 1), Geometry(shape, geometry.affine @ shift)  # type: ignore[arg-type]


def _sample_indices(count: int, most: int, device: torch.device) -> torch.Tensor:
    """Increasing indices into ``range(count)``: all of them, or a seeded random ``most``."""
    if count <= most:
        return torch.arange(count, device=device)
    generator = torch.Generator().manual_seed(0)
    draw = torch.rand(count, generator=generator).to(device)
    return torch.nonzero(draw < most / count).flatten()


def _world_to_sampling(grid: Geometry, device: torch.device) -> torch.Tensor:
    """4x4 matrix from RAS+ mm to ``grid_sample`` coordinates (``align_corners=True``)."""
    size = np.asarray(grid.shape, dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(2.0 / np.maximum(size - 1, 1))
    scale[:3, 3] = -1.0
    return torch.as_tensor(scale @ np.linalg.inv(grid.affine), device=device)


# --------------------------------------------------------------------------- optimisation


def _rotation(vector: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector (axis times angle in radians)."""
    zero = torch.zeros((), dtype=vector.dtype, device=vector.device)
    x, y, z = vector
    skew = torch.stack(
        [torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])]
    )
    return torch.linalg.matrix_exp(skew)


def _linear(params: torch.Tensor, radius: float) -> torch.Tensor:
    """3x3 linear part from its parameters: rotation, log-scales (1 or 3), shears.

    Each parameter is the displacement (mm) it causes at ``radius`` mm from the centre.
    """
    count = params.numel()
    linear = _rotation(params[:3] / radius)
    if count == 4:
        linear = linear * torch.exp(params[3] / radius)
    elif count >= 6:
        linear = linear * torch.exp(params[3:6] / radius)  # columns: scale along each axis
    if count == 9:
        xy, xz, yz = params[6:9] / radius
        one, zero = torch.ones_like(xy), torch.zeros_like(xy)
        shear = torch.stack(
            [
                torch.stack([one, xy, xz]),
                torch.stack([zero, one, yz]),
                torch.stack([zero, zero, one]),
            ]
        )
        linear = linear @ shear
    return linear


@dataclass(frozen=True)
class _Start:
    """Where a level starts: parameters and the constants they are relative to."""

    params: torch.Tensor  # [P], see _linear
    moving_centre: torch.Tensor  # [3] float64, RAS+ mm
    radius: float  # mm


@dataclass(frozen=True)
class _State:
    """Similarity at one parameter vector, with its Gauss-Newton gradient and Hessian."""

    params: torch.Tensor  # [P]: translation (mm), then the linear parameters
    ncc: float
    gradient: torch.Tensor  # [P], d NCC / d params
    hessian: torch.Tensor  # [P, P]


def _sample(
    level: _Level, params: torch.Tensor, moving_centre: torch.Tensor, radius: float
) -> torch.Tensor:
    """Every channel of the moving image at the mapped fixed points: ``[C, N]``."""
    linear = _linear(params[3:], radius)
    rows = level.world_to_moving[:3, :3]
    offset = rows @ (moving_centre + params[:3]) + level.world_to_moving[:3, 3]
    grid = level.points @ (rows @ linear).T.float() + offset.float()
    values = F.grid_sample(
        level.moving, grid.view(1, -1, 1, 1, 3), align_corners=True, padding_mode="border"
    )
    return values.view(level.moving.shape[1], -1)


def _evaluate(
    level: _Level, params: torch.Tensor, moving_centre: torch.Tensor, radius: float
) -> _State:
    """Sample the moving image at the mapped fixed points; NCC and its Gauss-Newton system."""
    values = _sample(level, params, moving_centre, radius)
    d_linear = torch.autograd.functional.jacobian(
        lambda q: _linear(q, radius).reshape(9), params[3:]
    )  # [9, P - 3]
    return _gauss_newton(level, params, values.double(), d_linear)


def _gauss_newton(
    level: _Level, params: torch.Tensor, values: torch.Tensor, d_linear: torch.Tensor
) -> _State:
    """NCC = <a, b>_w of the normalised fixed (a) and moving (b) samples, with
    ``gradient = J^T W a`` and ``hessian = J^T W J`` for ``J = d b / d params``."""
    weight = level.fixed_weights * values[1]
    total = weight.sum()
    if float(total) <= 1e-3 * float(level.fixed_weights.sum()):
        identity = torch.eye(params.numel(), dtype=params.dtype, device=params.device)
        return _State(params, -math.inf, torch.zeros_like(params), identity)
    fixed = level.fixed_values - (weight * level.fixed_values).sum() / total
    moving = values[0] - (weight * values[0]).sum() / total
    fixed = fixed / torch.sqrt((weight * fixed**2).sum()).clamp(min=1e-12)
    moving_norm = torch.sqrt((weight * moving**2).sum()).clamp(min=1e-12)
    moving = moving / moving_norm
    spatial = values[2:5].T.float() @ level.gradient_to_world.to(values.device)  # [N, 3] per mm
    outer = (spatial[:, :, None] * level.points[:, None, :]).reshape(-1, 9)
    jacobian = torch.cat([spatial, outer @ d_linear.float()], dim=1)
    weight32, moving32 = weight.float(), moving.float()
    jacobian -= (weight32 @ jacobian) / float(total)
    jacobian -= moving32[:, None] * ((weight32 * moving32) @ jacobian)
    weighted = weight32[:, None] * jacobian
    ncc = float((weight * fixed * moving).sum())
    gradient = (weighted.T @ fixed.float()).double() / moving_norm
    hessian = (jacobian.T @ weighted).double() / moving_norm**2
    return _State(params, ncc, gradient, hessian)


def _optimise(level: _Level, start: _Start, steps: int, bar: tqdm) -> torch.Tensor:
    """Levenberg-Marquardt ascent of the NCC at one level; at most ``steps`` evaluations."""
    centre, radius = start.moving_centre, start.radius
    state = _evaluate(level, start.params, centre, radius)
    damping, largest, rejected, used = 1e-3, 2.0 * level.spacing, 0, 0
    while used < steps:
        used += 1
        matrix = state.hessian + damping * torch.diag(state.hessian.diagonal().clamp(min=1e-12))
        step = torch.linalg.solve(matrix, state.gradient)
        step = step * min(1.0, largest / float(step.abs().max().clamp(min=1e-12)))
        trial = _evaluate(level, state.params + step, centre, radius)
        bar.update(1)
        bar.set_postfix(spacing=f"{level.spacing:g} mm", ncc=f"{max(trial.ncc, state.ncc):.4f}")
        small = float(step.abs().max()) < _TOLERANCE * level.spacing
        if trial.ncc > state.ncc:
            state, damping, rejected = trial, max(damping / 4, 1e-6), 0
        else:
            damping, rejected = damping * 8, rejected + 1
        if small or rejected == _MAX_REJECTED:
            break
    bar.update(steps - used)
    return state.params


def _to_transform(
    linear: NDArray[np.float64],
    translation: NDArray[np.float64],
    fixed_centre: NDArray[np.float64],
    moving_centre: NDArray[np.float64],
) -> AffineTransform:
    """``y = L (x - c_f) + c_m + t`` as a 4x4 RAS+ mm matrix (fixed -> moving)."""
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = moving_centre + translation - linear @ fixed_centre
    return AffineTransform(matrix)
