"""Intensity normalisation and placement of images on a network grid.

The normalisation reproduces uniGradICON's (``unigradicon`` 1.0.6): CT is clamped to a window
(default -1000..1000 HU) then scaled to [0, 1]; MRI is clamped between its minimum (or a low
quantile) and its 99th percentile (the k-th smallest voxel, ``k = floor(0.99 N)``) then scaled
to [0, 1].
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from regpipe.errors import InputError
from regpipe.spaces import Geometry, resample_volume, to_network_tensor

Modality = Literal["ct", "mri"]
MODALITIES: tuple[str, ...] = ("ct", "mri")


def check_modality(modality: str) -> Modality:
    """Return ``modality`` lower-cased, or raise :class:`InputError` if it is unknown."""
    value = modality.lower()
    if value not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}: choose one of {', '.join(MODALITIES)}")
    return value  # type: ignore[return-value]


def _kth_smallest(values: NDArray[np.float32], quantile: float) -> float:
    """uniGradICON's quantile: the k-th smallest value, ``k = floor(q N)`` clamped to [1, N]."""
    k = min(max(int(np.floor(quantile * values.size)), 1), values.size)
    # the order of the values does not matter: no C-order copy of a nibabel (Fortran) array,
    # and torch's selection is several times faster than np.partition
    flat = torch.from_numpy(np.ascontiguousarray(values.ravel(order="K")))
    return float(torch.kthvalue(flat, k).values)


def normalize_intensity(
    data: NDArray[np.generic],
    modality: str,
    *,
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    quantile_range: tuple[float, float] = (0.0, 0.99),
    mask: NDArray[np.generic] | None = None,
) -> NDArray[np.float32]:
    """Scale an image to [0, 1] the way uniGradICON does; optionally zero outside ``mask``.

    Parameters
    ----------
    data
        Image intensities (HU for CT).
    modality
        ``"ct"`` or ``"mri"``.
    ct_window
        HU range kept for CT.
    quantile_range
        Lower and upper quantiles for MRI (0 means the image minimum).
    mask
        Optional mask on the same grid; voxels where it is zero are set to 0 after scaling
        (uniGradICON's ``--input_masking``).
    """
    modality = check_modality(modality)
    image = np.asarray(data, dtype=np.float32)
    if modality == "ct":
        lo, hi = ct_window
        if not lo < hi:
            raise InputError(f"CT window must be increasing, got {ct_window}")
        image = np.clip(image, lo, hi)  # scaled by the window itself, as uniGradICON does
        if float(image.min()) == float(image.max()):
            raise InputError(f"the image is constant inside the CT window {lo:g}..{hi:g} HU: "
                             "give another ct_window (--ct_window MIN MAX)")
    else:
        q_lo, q_hi = quantile_range
        if not 0.0 <= q_lo < q_hi <= 1.0:
            raise InputError("quantile range must satisfy 0 <= low < high <= 1, "
                             f"got {quantile_range}")
        lo = float(image.min()) if q_lo == 0 else _kth_smallest(image, q_lo)
        hi = _kth_smallest(image, q_hi)
        image = np.clip(image, lo, hi)
    if hi <= lo:
        raise InputError("the image has no intensity range between its quantiles "
                         f"{quantile_range[0]:g} and {quantile_range[1]:g} (over "
                         f"{100 * quantile_range[1]:g} % of its voxels share one value): give a "
                         "higher upper quantile (--quantile_range 0 0.999) or check the image")
    out = ((image - np.float32(lo)) * np.float32(1.0 / (hi - lo))).astype(np.float32)
    if mask is not None:
        out = out * (np.asarray(mask) != 0)
    return out


def outlying_minimum(data: NDArray[np.generic]) -> tuple[float, float] | None:
    """``(minimum, 0.1st percentile of the other voxels)`` when an image's minimum lies further
    below all its other voxels than their whole range from the 0.1st to the 99th percentile (a
    padding value such as -32768 in an MRI, in one voxel or whole slabs), else ``None``.
    uniGradICON scales MRI from the minimum, so such a value squeezes the image into a narrow
    band of [0, 1]. Percentiles from a subsample (fast)."""
    flat = np.asarray(data).ravel(order="K")
    if flat.size == 0:
        return None
    minimum = float(flat.min())
    sample = flat[:: max(flat.size // 200_000, 1)].astype(np.float64)
    sample = sample[sample > minimum]  # padding fills whole slabs: look past it
    if sample.size == 0:
        return None
    low, high = np.percentile(sample, [0.1, 99.0])
    if high > low and low - minimum > high - low:
        return minimum, float(low)
    return None


def network_input(
    data: NDArray[np.floating],
    geometry: Geometry,
    grid_to_world: NDArray[np.float64],
    grid_shape: tuple[int, int, int],
    *,
    squash: bool = False,
    nearest: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Sample an image on a network grid; returns ``[1, 1, n0, n1, n2]`` float32.

    With ``squash=True`` (the grid is the image's own squash grid), this is exactly
    uniGradICON's ``F.interpolate(..., mode="trilinear", align_corners=False)`` resize; with
    ``nearest`` (masks, label maps), ``mode="nearest-exact"``, which picks the voxel at the
    same centres (uniGradICON's ``mode="nearest"`` picks ``floor(d N / n)``, half a grid
    voxel and more off).
    Otherwise the image is sampled through ``grid_to_world`` (zero outside the image).
    """
    tensor = to_network_tensor(data, device)
    if squash:
        if nearest:  # at the voxel the trilinear resize centres on (uniGradICON's
            # mode="nearest" took floor(d N / n): up to 1.5 voxels off at 256 -> 64)
            return F.interpolate(tensor, size=grid_shape, mode="nearest-exact")
        return F.interpolate(tensor, size=grid_shape, mode="trilinear", align_corners=False)
    mode: Literal["bilinear", "nearest"] = "nearest" if nearest else "bilinear"
    return resample_volume(tensor, geometry, grid_to_world, grid_shape, mode=mode)

