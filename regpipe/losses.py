"""Similarity measures, the GradICON regulariser and the uniGradICON training objective.

Every similarity takes ``(warped, target, mask=None)``: ``warped`` is the moving image pulled
back onto the target's grid, all ``[B, C, n0, n1, n2]``; ``mask`` (same shape, non-zero =
inside) restricts the mean to the target's region of interest. Each returns a scalar *loss*
(lower is better). The formulas follow uniGradICON (``icon_registration`` 1.1.9 and
``unigradicon`` 1.0.6), including their masked mean: the mean over the mask per sample, then
over samples.

Example
-------
>>> import torch
>>> image = torch.rand(1, 1, 24, 24, 24)
>>> float(lncc_loss(image, image)) < 1e-3
True
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, overload

import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.networks.gradicon import warp_normalised

if TYPE_CHECKING:
    from regpipe.networks.gradicon import CoordinateMap, RegistrationNetwork

__all__ = [
    "SIMILARITIES",
    "ObjectiveTerms",
    "Similarity",
    "cell_jacobian_determinant",
    "count_flips",
    "gaussian_blur",
    "get_similarity",
    "gradicon_objective",
    "gradicon_regulariser",
    "lncc_loss",
    "lncc_map",
    "masked_mean",
    "mind_ssc",
    "mind_ssc_loss",
    "shared_label_one_hot",
    "soft_dice_loss",
    "squared_lncc_loss",
]

Similarity = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

#: Width (standard deviation, voxels) of the LNCC Gaussian window.
LNCC_SIGMA = 5.0
#: Added to both local variances in LNCC (keeps flat regions finite).
LNCC_EPS = 1e-5
#: Finite-difference step of the GradICON regulariser (normalised units).
GRADICON_DELTA = 1e-3
#: Noise of the GradICON sample points: this many grid spacings (of the last axis), std.
GRADICON_NOISE_VOXELS = 2.0
#: Smoothing constant of the soft Dice.
DICE_EPS = 1e-6


def _check_pair(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
    if warped.shape != target.shape:
        raise InputError(f"image shapes differ: {tuple(warped.shape)} vs {tuple(target.shape)}")
    if warped.dim() != 5:
        raise InputError(f"images must be 5-D [B, C, n0, n1, n2], got {tuple(warped.shape)}")
    if mask is not None and mask.shape != target.shape:
        raise InputError(f"mask shape {tuple(mask.shape)} differs from {tuple(target.shape)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over ``mask != 0`` per sample, then over samples.

    Without a mask, the plain mean. A sample with an empty mask contributes 0.

    Parameters
    ----------
    values
        ``[B, ...]`` tensor.
    mask
        Broadcastable to ``values``; non-zero marks voxels to include.
    """
    if mask is None:
        return torch.mean(values)
    inside = (mask != 0).expand_as(values)
    dims = tuple(range(1, values.dim()))
    counts = inside.sum(dims).clamp_min(1)
    totals = torch.where(inside, values, 0.0).sum(dims, dtype=torch.float32)
    return torch.mean(totals / counts).to(values.dtype)


def _gaussian_taps(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalised Gaussian weights at integer offsets ``-2 sigma .. 2 sigma`` (``4 sigma + 1``)."""
    half = int(2 * sigma)
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(device=device, dtype=dtype)


def gaussian_blur(volume: torch.Tensor, sigma: float = LNCC_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of every channel, zero padding ("same" size).

    Parameters
    ----------
    volume
        ``[B, C, n0, n1, n2]``.
    sigma
        Standard deviation in voxels; the window has ``4 sigma + 1`` taps and is applied along
        axes 2, 3, 4 in turn. Near the border the missing samples count as zeros (no
        renormalisation).
    """
    taps = _gaussian_taps(sigma, volume.device, volume.dtype)
    channels = volume.shape[1]
    out = volume
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = taps.numel()
        kernel = taps.view(shape).expand(channels, -1, -1, -1, -1)
        out = F.conv3d(out, kernel, padding="same", groups=channels)
    return out


def lncc_map(image: torch.Tensor, other: torch.Tensor, sigma: float = LNCC_SIGMA) -> torch.Tensor:
    """Local normalised cross-correlation at every voxel, ``[B, C, n0, n1, n2]`` in [-1, 1].

    ``(G(IJ) - G(I)G(J)) / sqrt((relu(G(I^2) - G(I)^2) + eps) (relu(G(J^2) - G(J)^2) + eps))``
    with ``G`` the Gaussian blur of :func:`gaussian_blur` and ``eps = 1e-5``.
    """
    blur_i, blur_j = gaussian_blur(image, sigma), gaussian_blur(other, sigma)
    covariance = gaussian_blur(image * other, sigma) - blur_i * blur_j
    variance_i = torch.relu(gaussian_blur(image * image, sigma) - blur_i**2) + LNCC_EPS
    variance_j = torch.relu(gaussian_blur(other * other, sigma) - blur_j**2) + LNCC_EPS
    return covariance / torch.sqrt(variance_i * variance_j)


def lncc_loss(
    warped: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigma: float = LNCC_SIGMA,
) -> torch.Tensor:
    """``1 - mean(LNCC)``: 0 for locally linearly related images, up to 2 when inverted."""
    _check_pair(warped, target, mask)
    return 1 - masked_mean(lncc_map(warped, target, sigma), mask)


def squared_lncc_loss(
    warped: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigma: float = LNCC_SIGMA,
) -> torch.Tensor:
    """``1 - mean(LNCC^2)``: sign-agnostic (contrast inversions count as matches)."""
    _check_pair(warped, target, mask)
    return 1 - masked_mean(lncc_map(warped, target, sigma) ** 2, mask)


# MIND-SSC: the six face-neighbours of a 3x3x3 patch centre; every pair of them at squared
# distance 2 compares two shifted copies of the image. Pairs are taken as (later, earlier)
# neighbour in row-major order; the finished descriptor's channels are then reordered as the
# original C++ implementation does.
Offset = tuple[int, int, int]
_SIX_NEIGHBOURS: tuple[Offset, ...] = (
    (0, 1, 1),
    (1, 1, 0),
    (1, 0, 1),
    (1, 1, 2),
    (2, 1, 1),
    (1, 2, 1),
)
_MIND_CHANNEL_ORDER = (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)


def _mind_shift_pairs() -> list[tuple[Offset, Offset]]:
    pairs = [
        (first, second)
        for first, second in itertools.product(_SIX_NEIGHBOURS, repeat=2)
        if _SIX_NEIGHBOURS.index(first) > _SIX_NEIGHBOURS.index(second)
        and sum((a - b) ** 2 for a, b in zip(first, second, strict=True)) == 2
    ]
    return pairs


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC self-similarity descriptor, ``[B, 12, n0, n1, n2]`` with values in (0, 1].

    Parameters
    ----------
    image
        ``[B, 1, n0, n1, n2]``.
    radius
        Half-width of the box that averages patch differences (box of ``2 radius + 1``).
    dilation
        Spacing of the compared neighbours, in voxels.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise InputError(f"MIND-SSC needs [B, 1, n0, n1, n2] images, got {tuple(image.shape)}")
    padded = F.pad(image, [dilation] * 6, mode="replicate")
    n0, n1, n2 = image.shape[2:]

    def shifted(offset: Offset) -> torch.Tensor:
        s0, s1, s2 = (dilation * o for o in offset)
        return padded[:, :, s0 : s0 + n0, s1 : s1 + n1, s2 : s2 + n2]

    differences = torch.cat(
        [(shifted(a) - shifted(b)) ** 2 for a, b in _mind_shift_pairs()], dim=1
    )
    ssd = F.avg_pool3d(
        F.pad(differences, [radius] * 6, mode="replicate"), 2 * radius + 1, stride=1
    )
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    variance = mind.mean(dim=1, keepdim=True)
    level = variance.mean()
    variance = torch.clamp(variance, (level * 0.001).item(), (level * 1000).item())
    return torch.exp(-mind / variance)[:, list(_MIND_CHANNEL_ORDER)]


def mind_ssc_loss(
    warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared difference of the MIND-SSC descriptors (radius 2, dilation 2)."""
    _check_pair(warped, target, mask)
    difference = mind_ssc(warped) - mind_ssc(target)
    channel_mask = None if mask is None else mask[:, :1]
    return masked_mean(difference**2, channel_mask)


def shared_label_one_hot(
    labels_a: torch.Tensor, labels_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-hot encode the non-zero labels present in both label maps.

    Parameters
    ----------
    labels_a, labels_b
        ``[B, 1, n0, n1, n2]`` integer-valued label maps (0 = background).

    Returns
    -------
    ``(one_hot_a, one_hot_b, valid)``: float ``[B, K, n0, n1, n2]`` masks for the ``K`` shared
    labels (ascending) and ``valid`` ``[B, K]`` (the label occurs in both maps of that pair).

    Raises
    ------
    InputError
        When the maps share no non-zero label, or some pair shares none.
    """
    a, b = labels_a.long(), labels_b.long()
    values_a, values_b = torch.unique(a), torch.unique(b)
    shared = values_a[torch.isin(values_a, values_b) & (values_a != 0)]
    if shared.numel() == 0:
        raise InputError("the label maps share no non-background label")
    shape = (1, -1, 1, 1, 1)
    one_hot_a = (a == shared.view(shape)).to(torch.float32)
    one_hot_b = (b == shared.view(shape)).to(torch.float32)
    valid = (one_hot_a.sum(dim=(2, 3, 4)) > 0) & (one_hot_b.sum(dim=(2, 3, 4)) > 0)
    if not bool(valid.any(dim=1).all()):
        raise InputError("a pair of label maps shares no non-background label")
    return one_hot_a, one_hot_b, valid


def soft_dice_loss(
    warped: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - soft Dice`` averaged over classes (only ``valid`` ones) and samples.

    Parameters
    ----------
    warped, target
        ``[B, K, n0, n1, n2]`` class probabilities / one-hot masks.
    valid
        Optional ``[B, K]`` boolean: classes to average over per sample.
    """
    if warped.shape != target.shape:
        raise InputError(f"shapes differ: {tuple(warped.shape)} vs {tuple(target.shape)}")
    dims = (2, 3, 4)
    overlap = torch.sum(warped * target, dim=dims)
    total = torch.sum(warped, dim=dims) + torch.sum(target, dim=dims)
    dice = (2.0 * overlap + DICE_EPS) / (total + DICE_EPS)
    if valid is None:
        return 1 - dice.mean()
    per_class = (1 - dice) * valid
    return (per_class.sum(dim=1) / valid.sum(dim=1)).mean()


#: Similarity measures by name (the ``--io_sim`` values of uniGradICON).
SIMILARITIES: dict[str, Similarity] = {
    "lncc": lncc_loss,
    "lncc2": squared_lncc_loss,
    "mind": mind_ssc_loss,
}


def get_similarity(similarity: str | Similarity) -> Similarity:
    """Resolve ``"lncc"``, ``"lncc2"`` or ``"mind"`` (or pass a callable through)."""
    if callable(similarity):
        return similarity
    try:
        return SIMILARITIES[similarity]
    except KeyError:
        raise InputError(
            f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}"
        ) from None


def count_flips(coordinates: torch.Tensor) -> torch.Tensor:
    """Grid cells whose forward-difference Jacobian determinant is negative, per sample.

    Parameters
    ----------
    coordinates
        ``[B, 3, n0, n1, n2]`` map values (not displacements) on a grid.
    """
    field = coordinates.detach()
    corner = field[:, :, 1:, 1:, 1:]
    d0 = corner - field[:, :, :-1, 1:, 1:]
    d1 = corner - field[:, :, 1:, :-1, 1:]
    d2 = corner - field[:, :, 1:, 1:, :-1]
    determinant = torch.sum(torch.linalg.cross(d0, d1, dim=1) * d2, dim=1)
    return torch.sum(determinant < 0) / field.shape[0]


def gradicon_regulariser(
    phi_ab: CoordinateMap, phi_ba: CoordinateMap, identity: torch.Tensor
) -> torch.Tensor:
    """GradICON penalty: squared Jacobian of the inverse-consistency error, mean over points.

    ``e(p) = p - phi_ab(phi_ba(p))`` at points ``p`` = every second identity grid point plus
    Gaussian noise (std 2 grid spacings of the last axis, drawn by ``torch.randn`` on the CPU
    default generator, so ``torch.manual_seed`` makes it reproducible); the loss is
    ``sum_k mean(((e(p) - e(p + delta d_k)) / delta)^2)`` for the unit vectors ``d_k`` of
    the three axes, ``delta = 1e-3``.

    Parameters
    ----------
    phi_ab, phi_ba
        The two pull-back maps of a pair (normalised coordinates).
    identity
        ``[1, 3, n0, n1, n2]`` identity grid of the network.
    """
    noise = torch.randn(*identity.shape).to(identity.device)
    jittered = identity + GRADICON_NOISE_VOXELS * noise / identity.shape[-1]
    points = jittered[:, :, ::2, ::2, ::2]
    error = points - phi_ab(phi_ba(points))
    loss = torch.zeros((), device=identity.device, dtype=identity.dtype)
    for axis in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, device=identity.device, dtype=identity.dtype)
        step[0, axis] = GRADICON_DELTA
        moved = points + step
        error_moved = moved - phi_ab(phi_ba(moved))
        loss = loss + torch.mean(((error - error_moved) / GRADICON_DELTA) ** 2)
    return loss


class ObjectiveTerms(NamedTuple):
    """Terms of :func:`gradicon_objective` (scalar tensors)."""

    all_loss: torch.Tensor
    inverse_consistency_loss: torch.Tensor
    similarity_loss: torch.Tensor
    transform_magnitude: torch.Tensor
    flips: torch.Tensor


def cell_jacobian_determinant(coordinates: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of a map per grid cell, in grid units, ``[B, 1, n0-1, n1-1, n2-1]``.

    The forward differences of the map values along axes 2, 3, 4, taken at each cell's far
    corner, give the cell's edge vectors ``a, b, c``; the determinant is ``(a x b) . c``
    scaled by ``(n0 - 1)(n1 - 1)(n2 - 1)`` (normalised units -> grid units), so the identity
    map gives 1 everywhere. Differentiable.

    Parameters
    ----------
    coordinates
        ``[B, 3, n0, n1, n2]`` map values (not displacements), normalised units.
    """
    if coordinates.dim() != 5 or coordinates.shape[1] != 3:
        raise InputError(f"expected a [B, 3, n0, n1, n2] map, got {tuple(coordinates.shape)}")
    corner = coordinates[:, :, 1:, 1:, 1:]
    a = corner - coordinates[:, :, :-1, 1:, 1:]
    b = corner - coordinates[:, :, 1:, :-1, 1:]
    c = corner - coordinates[:, :, 1:, 1:, :-1]
    determinant = torch.sum(torch.linalg.cross(a, b, dim=1) * c, dim=1, keepdim=True)
    n0, n1, n2 = coordinates.shape[2:]
    return determinant * (n0 - 1) * (n1 - 1) * (n2 - 1)


@overload
def _crop_high(volume: torch.Tensor) -> torch.Tensor: ...
@overload
def _crop_high(volume: torch.Tensor | None) -> torch.Tensor | None: ...
def _crop_high(volume: torch.Tensor | None) -> torch.Tensor | None:
    """Drop the last voxel along every spatial axis (the cells of the Jacobian determinant)."""
    return None if volume is None else volume[:, :, :-1, :-1, :-1]


def gradicon_objective(
    network: RegistrationNetwork,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    similarity: str | Similarity = "lncc",
    lam: float = 1.5,
    masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    *,
    intensity_conservation: bool = False,
    segmentations: tuple[torch.Tensor, torch.Tensor] | None = None,
    dice_loss_weight: float = 0.0,
) -> ObjectiveTerms:
    """uniGradICON's symmetric objective for one batch of pairs.

    ``all_loss = lam * L_gradicon + S(moving o phi_AB, fixed) + S(fixed o phi_BA, moving)
    [+ dice_loss_weight * L_dice]``, where both maps come from ``network`` (A = moving,
    B = fixed), the similarity warps use zero padding, and ``L_gradicon`` is
    :func:`gradicon_regulariser` of ``(phi_AB, phi_BA)``.

    Parameters
    ----------
    network
        The registration network (its ``train()``/``eval()`` mode is left as it is).
    moving, fixed
        ``[B, C, n0, n1, n2]`` images on the network grid.
    similarity
        ``"lncc"`` (default), ``"lncc2"``, ``"mind"`` or a callable ``(warped, target, mask)``.
    lam
        Weight of the GradICON term.
    masks
        Optional ``(moving_mask, fixed_mask)``, each ``[B, 1, n0, n1, n2]`` or ``None``: the
        fixed mask restricts the A->B similarity term, the moving mask the B->A term.
    intensity_conservation
        uniGradICON's ``--intensity_conservation_loss`` (mass-conserving registration, meant
        for CT where air is the lowest intensity): each warped image is multiplied by the
        per-cell Jacobian determinant of its map (:func:`cell_jacobian_determinant`) and the
        similarity becomes ``S(warped_fixed * det_BA, moving) + S(warped_moving * det_AB,
        fixed)`` with images and masks cropped by one voxel at the high end of every axis.
    segmentations
        ``(moving_labels, fixed_labels)``, each ``[B, 1, n0, n1, n2]`` integer-valued label
        maps on the network grid; needed (and only used) when ``dice_loss_weight > 0``.
    dice_loss_weight
        Weight of uniGradICON's Dice term: the non-zero labels present in both maps
        (:func:`shared_label_one_hot`) are warped with the maps (trilinear, border padding),
        and ``L_dice = soft_dice_loss(moving_seg o phi_AB, fixed_seg) +
        soft_dice_loss(fixed_seg o phi_BA, moving_seg)`` (classes valid in both maps only).
        The term is added to ``all_loss`` only; the similarity term is unchanged.

    Returns
    -------
    :class:`ObjectiveTerms`: ``transform_magnitude`` is ``mean((phi_AB(x) - x)^2)`` and
    ``flips`` the number of folded cells of ``phi_BA`` per sample.

    Raises
    ------
    InputError
        When ``dice_loss_weight > 0`` without both segmentations, or when they share no
        non-background label.
    """
    measure = get_similarity(similarity)
    use_dice = dice_loss_weight > 0.0
    if use_dice:
        if segmentations is None or segmentations[0] is None or segmentations[1] is None:
            raise InputError("a Dice loss weight > 0 needs both segmentations")
        seg_moving, seg_fixed, valid = shared_label_one_hot(*segmentations)
    identity = network.identity_grid
    phi_ab = network.map(moving, fixed)
    phi_ba = network.map(fixed, moving)
    coordinates_ab = phi_ab(identity, on_identity=True)
    coordinates_ba = phi_ba(identity, on_identity=True)
    warped_moving = warp_normalised(moving, coordinates_ab, "zeros")
    warped_fixed = warp_normalised(fixed, coordinates_ba, "zeros")
    mask_moving, mask_fixed = masks if masks is not None else (None, None)
    if intensity_conservation:
        determinant_ab = cell_jacobian_determinant(coordinates_ab)
        determinant_ba = cell_jacobian_determinant(coordinates_ba)
        similarity_loss = measure(
            _crop_high(warped_fixed) * determinant_ba, _crop_high(moving), _crop_high(mask_moving)
        ) + measure(
            _crop_high(warped_moving) * determinant_ab, _crop_high(fixed), _crop_high(mask_fixed)
        )
    else:
        similarity_loss = measure(warped_moving, fixed, mask_fixed) + measure(
            warped_fixed, moving, mask_moving
        )
    icon_loss = gradicon_regulariser(phi_ab, phi_ba, identity)
    all_loss = lam * icon_loss + similarity_loss
    if use_dice:
        warped_seg_moving = warp_normalised(seg_moving, coordinates_ab, "border")
        warped_seg_fixed = warp_normalised(seg_fixed, coordinates_ba, "border")
        dice_loss = soft_dice_loss(warped_seg_moving, seg_fixed, valid) + soft_dice_loss(
            warped_seg_fixed, seg_moving, valid
        )
        all_loss = all_loss + dice_loss * dice_loss_weight
    magnitude = torch.mean((identity - coordinates_ab) ** 2)
    return ObjectiveTerms(
        all_loss, icon_loss, similarity_loss, magnitude, count_flips(coordinates_ba)
    )
