"""Fast instance optimisation on CPU: a smooth correction on top of a network's displacement.

The network (or nothing: a zero displacement after an affine pre-alignment) gives a map
``phi(g) = g + U(g)`` on the network grid; the moving image resampled onto the fixed grid is
``moving(phi(g))``. :func:`optimise_displacement` looks for a correction ``psi(g) = g + w(g)``
applied **first**, so that ``moving(phi(psi(g)))`` matches ``fixed(g)``, and returns the composed
displacement::

    U_new(g) = w(g) + U(g + w(g))        (grid-index units, channel c along tensor axis c + 2)

The Jacobian of the composition is ``det(I + DU(psi)) det(I + Dw)``: a fold-free network output
stays fold-free when ``psi`` is.

Method
------
* The correction lives on coarse control grids (default: 4 then 2 network voxels apart) laid
  over the bounding box of the fixed image's foreground (or ``fixed_mask``) plus a margin, and
  is upsampled trilinearly to the image level being matched (default: half, then full network
  resolution). By default it is a stationary velocity field integrated by scaling and squaring
  (``velocity=True``), otherwise a displacement.
* Similarity (:mod:`regpipe.io_level`): local normalised cross-correlation (LNCC) with a large
  box window (``window_mm``),
  the box sums done with separable convolutions whose backward pass is the same filter.
* Regularisation: diffusion (mean squared spatial gradient of the optimised field, mm per mm)
  and a penalty on Jacobian determinants below ``jacobian_floor`` (folding).
* Adam with a step in mm, deterministic, multi-level coarse to fine.

Example
-------
>>> refined = optimise_displacement(moving_t, fixed_t, displacement, steps=60,
...                                 grid_spacing_mm=1.5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from regpipe.errors import InputError
from regpipe.io_level import Level, WarpedLNCC, level_size, lncc
from regpipe.spaces import index_grid, sample_at_indices, sampling_identity

__all__ = ["DEFAULT_STEPS", "FastIOSettings", "lncc", "optimise_displacement"]

#: The iteration budget of ``regpipe-register``, the BIDS App and ``regpipe-bench`` (30 + 10
#: iterations with the default ``level_steps``).
DEFAULT_STEPS = 50


@dataclass(frozen=True)
class FastIOSettings:
    """Tuning knobs of :func:`optimise_displacement` (defaults chosen on real brain pairs).

    Parameters
    ----------
    image_scales
        Image resolution of each level, coarsest first, as a downsampling factor of the network
        grid (``2.0`` = half resolution).
    control_spacings
        Spacing of the control grid at each level, in network-grid voxels (same length as
        ``image_scales``).
    level_steps
        Iterations of each level as a multiple of ``steps`` (same length; a level with a
        positive entry runs at least one iteration). The default ``(0.6, 0.2)`` spends most
        iterations at the cheap half-resolution level: on the development brain pairs, 30 + 10
        iterations reach the Dice of 50 + 50 (0.779 vs 0.778 at SD log J 0.285 vs 0.271) in
        about a quarter of the work (``benchmarks/io_budget.py``).
    window_mm
        Full width (mm) of the LNCC box window; rounded to an odd number of voxels (at least 3)
        at each level.
    lr_mm
        Adam step size (mm of displacement or velocity per iteration).
    lr_final
        Step size at the last iteration of each level as a fraction of ``lr_mm`` (linear
        decay; 1 keeps it constant).
    adam_eps
        Adam's ``eps`` for the loss scaled by the number of control points: parameters whose
        gradient is below it move proportionally to it (damping weak-signal regions) instead
        of at the full step size.
    diffusion
        Weight of the diffusion regulariser: mean over control points of
        ``sum_{a,c} (d field_c / d x_a)^2`` (dimensionless, mm per mm).
    folding
        Weight of the folding penalty ``mean(relu(jacobian_floor - det J)^2)`` over the control
        grid.
    jacobian_floor
        Jacobian determinant below which the folding penalty starts (dimensionless).
    smoothing
        Width of the box filter applied to the upsampled correction, as a multiple of the
        control spacing (0 = plain trilinear upsampling).
    jacobian_ceiling
        Jacobian determinant above which the same penalty applies to expansion (``inf``:
        none).
    velocity
        Optimise a stationary velocity field integrated by scaling and squaring (``True``) or a
        displacement (``False``).
    esm
        Use the mean of the fixed and warped image gradients as the image gradient of the
        similarity (efficient second-order minimisation) instead of the warped image's alone.
    squarings
        Number of squaring steps when ``velocity`` is true.
    eps
        Variance floor added to the fixed image's local variance in the LNCC denominator
        ``cov^2 / ((var_f + eps) (var_m + moving_eps))`` (intensities in [0, 1]): windows where
        the fixed image is flat (background, noise) count less.
    moving_eps
        The same for the warped moving image; kept much smaller than ``eps`` because a floor
        on this side rewards raising the warped image's local contrast (a bias that shifts
        edges even between identical images).
    margin_mm
        Margin (mm) added around the foreground's bounding box; the correction is optimised in
        that box and extended outside it by repeating its edge values.
    foreground
        Fixed intensity above which a voxel counts as foreground when no ``fixed_mask`` is given.
    """

    image_scales: tuple[float, ...] = (2.0, 1.0)
    control_spacings: tuple[float, ...] = (4.0, 2.0)
    level_steps: tuple[float, ...] = (0.6, 0.2)
    window_mm: float = 9.0
    lr_mm: float = 0.25
    lr_final: float = 1.0
    adam_eps: float = 1e-8
    diffusion: float = 0.5
    folding: float = 10.0
    jacobian_floor: float = 0.3
    jacobian_ceiling: float = math.inf
    smoothing: float = 0.0
    velocity: bool = False
    esm: bool = True
    squarings: int = 6
    eps: float = 1e-4
    moving_eps: float = 1e-6
    margin_mm: float = 12.0
    foreground: float = 0.02

    def __post_init__(self) -> None:
        for name in ("image_scales", "control_spacings", "level_steps"):
            values = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
        n = len(self.image_scales)
        if n == 0 or len(self.control_spacings) != n or len(self.level_steps) != n:
            raise InputError(
                "image_scales, control_spacings and level_steps must be non-empty and of equal"
                f" length, got {self.image_scales}, {self.control_spacings}, {self.level_steps}"
            )
        if min(self.image_scales) < 1 or min(self.control_spacings) < 1:
            raise InputError("image_scales and control_spacings must be >= 1 (network voxels)")
        if min(self.level_steps) < 0:
            raise InputError(f"level_steps must be >= 0, got {self.level_steps}")
        positive = ("window_mm", "lr_mm", "eps", "moving_eps", "adam_eps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "lr_final", "smoothing", "diffusion", "folding", "jacobian_floor", "margin_mm",
            "foreground",
        ):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.jacobian_ceiling > max(self.jacobian_floor, 1.0):
            raise InputError("jacobian_ceiling must exceed 1 and jacobian_floor, "
                             f"got {self.jacobian_ceiling}")
        if not 0 <= int(self.squarings) <= 12:
            raise InputError(f"squarings must be in 0..12, got {self.squarings}")

    @classmethod
    def from_options(cls, options: dict) -> FastIOSettings:
        """Build settings from keyword options, rejecting unknown names with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(
                f"unknown fast instance-optimisation option(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**options)


def optimise_displacement(
    moving_t: torch.Tensor,
    fixed_t: torch.Tensor,
    displacement: torch.Tensor,
    *,
    steps: int,
    fixed_mask: torch.Tensor | None = None,
    grid_spacing_mm: float | Sequence[float] = 1.0,
    progress: bool = True,
    **tuning: object,
) -> torch.Tensor:
    """Refine a network displacement (grid-index units) by optimising a smooth correction.

    Parameters
    ----------
    moving_t, fixed_t
        ``[1, 1, n0, n1, n2]`` images in [0, 1] on the same network grid (the moving image
        already resampled through the affine pre-alignment and grid placement).
    displacement
        ``[1, 3, n0, n1, n2]`` current displacement ``U`` in grid-index units, channel ``c``
        along tensor axis ``c + 2``: the current map samples ``moving`` at ``g + U(g)``.
    steps
        The iteration budget: level ``l`` runs ``round(steps * level_steps[l])`` iterations (at
        least one where ``level_steps[l] > 0``; see :class:`FastIOSettings`). Run time grows
        linearly with it; 0 returns ``displacement`` unchanged.
    fixed_mask
        Optional ``[1, 1, n0, n1, n2]`` region of interest on the fixed grid (nonzero inside):
        the similarity is averaged over it only.
    grid_spacing_mm
        Spacing of the network grid in mm, one number or one per tensor axis ``(d0, d1, d2)``.
    progress
        Show a tqdm progress bar.
    **tuning
        Any field of :class:`FastIOSettings` (for example ``window_mm=9.0``).

    Returns
    -------
    torch.Tensor
        ``[1, 3, n0, n1, n2]`` refined displacement in grid-index units, same dtype and device
        as ``displacement``: ``U_new(g) = w(g) + U(g + w(g))``, the correction ``w`` applied
        first and ``U`` extended beyond the grid by its edge values.

    Raises
    ------
    InputError
        On mismatched shapes, a negative ``steps``, an empty foreground or mask, or invalid
        tuning options.
    """
    settings = FastIOSettings.from_options(dict(tuning))
    shape = _check_inputs(moving_t, fixed_t, displacement, fixed_mask, steps)
    spacing = _spacing(grid_spacing_mm)
    if steps == 0:
        return displacement.detach().clone()

    device = displacement.device
    moving = moving_t.detach().to(device, torch.float32)
    fixed = fixed_t.detach().to(device, torch.float32)
    disp = displacement.detach().to(torch.float32)
    mask = None if fixed_mask is None else (fixed_mask.detach().to(device) != 0).float()

    region = mask if mask is not None else (fixed > settings.foreground).float()
    if not bool(region.any()):
        what = "fixed_mask" if mask is not None else "fixed image foreground"
        raise InputError(f"fast instance optimisation: the {what} is empty")
    box = _bounding_box(region[0, 0], spacing, settings.margin_mm)
    crop = tuple(slice(lo, hi + 1) for lo, hi in box)
    identity = index_grid(shape, device)
    cropped = (slice(None), slice(None), *crop)
    with torch.no_grad():
        if bool(disp.abs().max() > 0):
            points = identity[cropped] + disp[cropped]
            moved = sample_at_indices(moving, points, padding="zeros")
        else:
            moved = moving[cropped]
    fixed_crop = fixed[cropped]
    mask_crop = None if mask is None else mask[cropped]
    crop_shape = tuple(int(s) for s in fixed_crop.shape[2:])

    with torch.enable_grad():
        field_mm, smoothing_mm = _optimise_levels(
            moved, fixed_crop, mask_crop, crop_shape, spacing, steps, settings, progress
        )
    with torch.no_grad():
        window = _smoothing_voxels(smoothing_mm, spacing)
        correction = _dense(field_mm, crop_shape, window) / spacing.view(1, 3, 1, 1, 1)
        pads: list[int] = []
        for (lo, hi), n in zip(reversed(box), reversed(shape), strict=True):
            pads += [lo, n - 1 - hi]
        correction = F.pad(correction, pads, mode="replicate")
        refined = correction + sample_at_indices(disp, identity + correction, padding="border")
    return refined.to(displacement.dtype)


# --------------------------------------------------------------------------- optimisation


def _optimise_levels(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    mask: torch.Tensor | None,
    shape: tuple[int, ...],
    spacing: torch.Tensor,
    steps: int,
    settings: FastIOSettings,
    progress: bool,
) -> tuple[torch.Tensor, float]:
    """Coarse-to-fine optimisation on the cropped grid; returns the correction in mm.

    The result is the displacement ``w`` (mm, channel ``c`` along axis ``c + 2``) on the finest
    control grid, which spans the same box as ``fixed`` (``align_corners`` convention), and the
    width (mm) of the box smoothing applied after upsampling it (see :func:`_dense`).
    """
    extent_mm = (torch.tensor(shape, dtype=torch.float32) - 1).clamp(min=1) * spacing.cpu()
    iterations = [max(1, round(steps * f)) if f > 0 else 0 for f in settings.level_steps]
    bar = tqdm(total=sum(iterations), desc="fast instance optimisation", disable=not progress)
    param: torch.Tensor | None = None
    control_size: tuple[int, ...] = ()
    for scale, control, n_iter in zip(
        settings.image_scales, settings.control_spacings, iterations, strict=True
    ):
        level = Level.build(moving, fixed, mask, shape, spacing, scale, settings)
        control_size = level_size(shape, control)
        control_spacing = (extent_mm / (torch.tensor(control_size) - 1).clamp(min=1)).to(
            fixed.device
        )
        if param is None:
            param = torch.zeros((1, 3, *control_size), device=fixed.device)
        else:
            param = F.interpolate(param, size=control_size, mode="trilinear", align_corners=True)
        param = param.detach().requires_grad_(True)
        smoothing_mm = settings.smoothing * float(control_spacing.mean())
        smoothing = _smoothing_voxels(smoothing_mm, level.spacing)
        optimiser = torch.optim.Adam([param], lr=settings.lr_mm, eps=settings.adam_eps)
        # Adam ignores the loss scale except through eps: scaling by the number of control
        # points gives eps the same meaning at every level and grid size.
        loss_scale = float(param[0, 0].numel())
        for iteration in range(n_iter):
            fraction = iteration / max(n_iter - 1, 1)
            for group in optimiser.param_groups:
                group["lr"] = settings.lr_mm * (1.0 + (settings.lr_final - 1.0) * fraction)
            optimiser.zero_grad(set_to_none=True)
            field = _integrate(param, control_spacing, settings)
            dense = _dense(field, level.shape, smoothing)
            similarity = 1.0 - WarpedLNCC.apply(dense / level.spacing.view(1, 3, 1, 1, 1), level)
            loss = similarity
            if settings.diffusion > 0:
                loss = loss + settings.diffusion * _diffusion(param, control_spacing)
            if settings.folding > 0:
                jac = _jacobian_determinant(field, control_spacing)
                penalty = F.relu(settings.jacobian_floor - jac).pow(2)
                if math.isfinite(settings.jacobian_ceiling):
                    penalty = penalty + F.relu(jac - settings.jacobian_ceiling).pow(2)
                loss = loss + settings.folding * penalty.mean()
            (loss * loss_scale).backward()
            optimiser.step()
            bar.update(1)
            if progress and iteration % 10 == 0:
                lncc = 1.0 - float(similarity.detach())
                bar.set_postfix(level=f"1/{scale:g}", lncc=f"{lncc:.4f}")
    bar.close()
    if param is None:  # pragma: no cover - settings guarantee at least one level
        raise InputError("no optimisation level configured")
    with torch.no_grad():
        return _integrate(param.detach(), control_spacing, settings), smoothing_mm


def _integrate(
    param: torch.Tensor, spacing: torch.Tensor, settings: FastIOSettings
) -> torch.Tensor:
    """Displacement (mm) of the correction: ``param`` itself, or ``exp(param)`` for a velocity."""
    if not settings.velocity or settings.squarings == 0:
        return param
    sizes = torch.tensor(param.shape[2:], dtype=torch.float32, device=param.device)
    to_normalised = (2.0 / (sizes - 1).clamp(min=1) / spacing).view(1, 3, 1, 1, 1)
    identity = sampling_identity(tuple(param.shape[2:]), param.device)
    field = param / (2 ** settings.squarings)
    for _ in range(settings.squarings):
        offset = (field * to_normalised).permute(0, 2, 3, 4, 1).flip(-1)
        field = field + F.grid_sample(
            field, identity + offset, mode="bilinear", padding_mode="border", align_corners=True
        )
    return field


def _diffusion(field: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
    """Mean squared forward-difference gradient of a mm field on a grid of ``spacing`` mm."""
    total = field.new_zeros(())
    for axis in range(3):
        if field.shape[axis + 2] < 2:
            continue
        diff = torch.diff(field, dim=axis + 2) / spacing[axis]
        total = total + diff.pow(2).mean() * 3.0
    return total


def _jacobian_determinant(field: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
    """Determinant of ``I + dw/dx`` (forward differences) for a mm displacement ``[1, 3, ...]``."""
    sizes = [max(n - 1, 1) for n in field.shape[2:]]
    columns = []
    for axis in range(3):
        if field.shape[axis + 2] < 2:
            diff = torch.zeros_like(field)
        else:
            diff = torch.diff(field, dim=axis + 2) / spacing[axis]
        columns.append(diff[:, :, : sizes[0], : sizes[1], : sizes[2]])
    # j[r][c] = delta_rc + d field_r / d x_c
    j = [[columns[c][:, r] + (1.0 if r == c else 0.0) for c in range(3)] for r in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


# --------------------------------------------------------------------------- helpers


def _check_inputs(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    displacement: torch.Tensor,
    mask: torch.Tensor | None,
    steps: int,
) -> tuple[int, int, int]:
    if fixed.dim() != 5 or fixed.shape[:2] != (1, 1):
        raise InputError(f"fixed_t must be [1, 1, n0, n1, n2], got {tuple(fixed.shape)}")
    shape = tuple(int(s) for s in fixed.shape[2:])
    if tuple(moving.shape) != tuple(fixed.shape):
        raise InputError(f"moving_t {tuple(moving.shape)} and fixed_t {tuple(fixed.shape)} differ")
    if tuple(displacement.shape) != (1, 3, *shape):
        raise InputError(
            f"displacement must be [1, 3, {', '.join(map(str, shape))}], got "
            f"{tuple(displacement.shape)}"
        )
    if mask is not None and tuple(mask.shape) != tuple(fixed.shape):
        raise InputError(
            f"fixed_mask {tuple(mask.shape)} does not match fixed_t {tuple(fixed.shape)}"
        )
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}")
    if min(shape) < 2:
        raise InputError(f"the network grid needs at least 2 voxels per axis, got {shape}")
    return shape  # type: ignore[return-value]


def _spacing(grid_spacing_mm: float | Sequence[float]) -> torch.Tensor:
    values = [float(grid_spacing_mm)] * 3 if isinstance(grid_spacing_mm, (int, float)) else [
        float(v) for v in grid_spacing_mm
    ]
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(
            f"grid_spacing_mm must be positive (one or three values), got {grid_spacing_mm}"
        )
    return torch.tensor(values, dtype=torch.float32)


def _bounding_box(
    region: torch.Tensor, spacing: torch.Tensor, margin_mm: float
) -> list[tuple[int, int]]:
    """Inclusive index bounds ``(lo, hi)`` per axis of the nonzero voxels plus a margin."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = torch.nonzero(region.amax(dim=other) > 0).flatten()
        margin = math.ceil(margin_mm / float(spacing[axis]))
        n = region.shape[axis]
        lo = max(int(present[0]) - margin, 0)
        hi = min(int(present[-1]) + margin, n - 1)
        if hi - lo < 2:  # at least three voxels so every level has a valid grid
            lo, hi = max(min(lo, n - 3), 0), min(max(hi, lo + 2), n - 1)
        box.append((lo, hi))
    return box


def _smoothing_voxels(width_mm: float, spacing: torch.Tensor) -> int:
    """Odd box width (voxels) of at least ``width_mm`` at the mean spacing; 1 for no smoothing."""
    if width_mm <= 0:
        return 1
    voxels = width_mm / float(spacing.mean())
    return 2 * math.ceil((voxels - 1) / 2 - 1e-6) + 1


def _dense(field: torch.Tensor, shape: Sequence[int], window: int) -> torch.Tensor:
    """Trilinear upsampling of a control-grid field to ``shape``, then a box smoothing.

    The box (``window`` voxels, edge values repeated at the borders) turns the piecewise
    linear interpolant into a smoother, B-spline-like one, so the Jacobian has no jumps at the
    control cells' faces.
    """
    dense = F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)
    if window <= 1:
        return dense
    half = window // 2
    padded = F.pad(dense, [half] * 6, mode="replicate")
    out = padded
    for dim in range(2, 5):
        n = out.shape[dim] - 2 * half
        total = out.narrow(dim, 0, n)
        for shift in range(1, window):
            total = total + out.narrow(dim, shift, n)
        out = total
    return out * (1.0 / window**3)


