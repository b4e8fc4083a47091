"""Measures of a registration: Jacobian determinants, folding, similarity and overlap."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from regpipe.transforms import DisplacementField

if TYPE_CHECKING:
    from regpipe.imageio import Image
    from regpipe.registration import RegistrationResult

#: Voxels per slab of the Jacobian computation (bounds its float32 temporaries: measured
#: +440 MB of peak memory with 4e6, +275 MB with 2e6, output included, for a 256^3 field).
_SLAB_VOXELS = 2_000_000


def jacobian_determinant(field: DisplacementField) -> NDArray[np.float32]:
    """Determinant of the Jacobian of ``x -> x + d(x)`` at every voxel of the field's grid.

    Derivatives are central differences in voxel index (one-sided at the edges, as
    ``np.gradient``), converted to world millimetres through the grid's affine, so oblique and
    anisotropic grids are handled. Values below 1 mean local shrinkage of the fixed region when
    mapped to moving space; values <= 0 mean folding. Computed in float32 with torch, a slab of
    planes at a time (bounded memory).
    """
    shape = field.field.shape[:3]
    if min(shape) < 2:
        raise ValueError(f"a Jacobian needs at least 2 voxels along every axis, got {shape}")
    inv_linear = np.linalg.inv(field.geometry.affine[:3, :3])
    components = torch.from_numpy(np.asarray(field.field, dtype=np.float32)).permute(3, 0, 1, 2)
    out = np.empty(shape, dtype=np.float32)
    rows = max(_SLAB_VOXELS // (shape[1] * shape[2]), 1)
    for first in range(0, shape[0], rows):
        low, high = max(first - 1, 0), min(first + rows + 1, shape[0])
        keep = slice(first - low, first - low + min(rows, shape[0] - first))
        jac: list[list[torch.Tensor]] = []  # jac[c][col] = d (x + d(x))_c / d world_col
        for c in range(3):
            # d field_c / d voxel_a, a = 0, 1, 2 (one plane of margin on each side of the slab)
            grads = [g[keep] for g in torch.gradient(components[c, low:high].contiguous())]
            jac.append([grads[0] * float(inv_linear[0, col]) + grads[1] * float(inv_linear[1, col])
                        + grads[2] * float(inv_linear[2, col]) + float(c == col)
                        for col in range(3)])
        determinant = (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
        )
        out[first : first + rows] = determinant.numpy()
    return out


def folding_stats(jacobian: NDArray[np.floating], mask: NDArray | None = None) -> dict[str, float]:
    """Folding statistics of a Jacobian map, inside ``mask`` (all voxels when ``None``).

    Returns ``folding_percent`` (share of voxels with J <= 0, in %), ``sd_log_jacobian``
    (standard deviation of log J over voxels with J > 0), ``min_jacobian`` and
    ``max_jacobian``.
    """
    values = jacobian if mask is None else jacobian[np.asarray(mask) != 0]
    values = values.astype(np.float64)
    positive = values[values > 0]
    return {
        "folding_percent": float(100.0 * np.mean(values <= 0)) if values.size else 0.0,
        "sd_log_jacobian": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "min_jacobian": float(values.min()) if values.size else float("nan"),
        "max_jacobian": float(values.max()) if values.size else float("nan"),
    }


def ncc(a: NDArray[np.generic], b: NDArray[np.generic], mask: NDArray | None = None) -> float:
    """Global normalised cross-correlation of two numeric arrays (inside ``mask``), in [-1, 1];
    NaN where it is undefined (an array constant there, such as a binary fixed image inside
    its own foreground): 0 would read as "no similarity"."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if mask is not None:
        keep = np.asarray(mask) != 0
        x, y = x[keep], y[keep]
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def dice_per_label(
    a: NDArray[np.generic], b: NDArray[np.generic], labels: list[int] | None = None
) -> dict[int, float]:
    """Dice overlap of each label (background 0 excluded) between two label maps."""
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0)
    scores = {}
    for label in labels:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum() + in_b.sum())
        scores[label] = (float(2.0 * np.logical_and(in_a, in_b).sum() / total) if total
                         else float("nan"))
    return scores


#: More distinct values than label maps usually have (FreeSurfer's aparc+aseg ~110,
#: Schaefer-1000 1001): worth a warning (an int16 intensity image given as a label map?).
MANY_LABELS = 2000


def shared_labels(a: NDArray[np.generic], b: NDArray[np.generic]) -> list[int]:
    """Labels (0 excluded) present in both label maps: those a registration is scored on (a
    label one subject's map lacks would score 0 whatever the registration; one the warp loses
    still counts, as 0)."""
    return sorted(int(v) for v in np.intersect1d(np.unique(a), np.unique(b)) if v != 0)


def registration_metrics(
    result: RegistrationResult,
    norm: Mapping[str, NDArray[np.floating]],
    masks: Mapping[str, Image],
    segs: Mapping[str, Image],
    after: NDArray[np.generic] | None = None,
) -> dict[str, Any]:
    """The metrics of a registration result (``RegistrationResult.metrics``).

    Folding statistics inside the fixed region (``masks["fixed"]``, else the normalised fixed
    image above 0.05), NCC of the normalised images before any alignment (``ncc_before``),
    after the affine pre-alignment when there is one (``ncc_affine``) and after registration
    (``ncc_after``), and with ``segs["fixed"]`` and ``segs["moving"]`` Dice per label and
    its mean over the labels both maps hold (:func:`shared_labels`). ``norm`` holds the
    normalised ``"fixed"`` and ``"moving"`` arrays on their own grids; ``after``, when
    given, is the normalised moving image already warped by ``result.forward`` (saves one
    resampling).
    """
    from regpipe.transforms import AffineTransform
    from regpipe.warp import warp_array

    fixed = result.fixed
    region = masks["fixed"].data if "fixed" in masks else norm["fixed"] > 0.05
    jacobian = np.asarray(result.jacobian().data, dtype=np.float32)
    metrics: dict[str, Any] = dict(folding_stats(jacobian, region))
    def ncc_through(transform) -> float:
        moved = warp_array(norm["moving"], result.moving.geometry, transform, fixed.geometry)
        return ncc(moved, norm["fixed"], region)

    # before any alignment, as every method's evaluation (and the App's tables) define it
    metrics["ncc_before"] = ncc_through(AffineTransform.identity())
    if result.affine is not None:
        metrics["ncc_affine"] = ncc_through(result.affine)
    if after is None:
        after = warp_array(norm["moving"], result.moving.geometry, result.forward, fixed.geometry)
    metrics["ncc_after"] = ncc(after, norm["fixed"], region)
    if "fixed" in segs and "moving" in segs:
        warped_seg = warp_array(
            segs["moving"].data, result.moving.geometry, result.forward, fixed.geometry,
            interpolation="nearest",
        )
        dice = dice_per_label(segs["fixed"].data, warped_seg,
                              shared_labels(segs["fixed"].data, segs["moving"].data))
        metrics["dice"] = {str(k): v for k, v in dice.items()}
        valid = [v for v in dice.values() if np.isfinite(v)]
        metrics["dice_mean"] = float(np.mean(valid)) if valid else float("nan")
    return metrics
