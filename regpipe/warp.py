"""Resample images and label maps through a transform onto a reference grid.

:func:`apply_transform` takes files or images (``regpipe.apply_transform``); :func:`warp_array`
works on arrays and geometries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from regpipe.errors import InputError
from regpipe.imageio import Image, ImageLike, check_image_path, load_image, save_image
from regpipe.spaces import Geometry, index_to_sampling_matrix
from regpipe.transforms import Transform, map_voxel_grid, map_voxel_slabs

LOGGER = logging.getLogger("regpipe")

Interpolation = Literal["linear", "nearest"]

#: Output voxels processed per chunk (bounds peak memory for large grids).
_CHUNK = 2_000_000


def warp_array(
    data: NDArray[np.generic],
    source: Geometry,
    transform: Transform,
    reference: Geometry,
    *,
    interpolation: Interpolation = "linear",
    fill: float = 0.0,
) -> NDArray[np.generic]:
    """Resample ``data`` (on ``source``) at ``transform(x)`` for every voxel ``x`` of
    ``reference``.

    Linear interpolation returns float32 (float64 input stays float64); nearest neighbour keeps
    the input dtype exactly, so integer label maps stay integer with their original values.
    Points outside the source grid get ``fill``.
    """
    data = np.asarray(data)
    if data.shape[:3] != source.shape:
        raise ValueError(f"data shape {data.shape} does not match its geometry {source.shape}")
    extra = data.shape[3:]
    flat_data = data.reshape(*source.shape, -1)
    out_dtype = (data.dtype if interpolation == "nearest"
                 else np.result_type(data.dtype, np.float32))
    if interpolation == "linear":
        out = _linear(flat_data, source, transform, reference, fill).astype(out_dtype, copy=False)
    else:
        out = np.empty((int(np.prod(reference.shape)), flat_data.shape[-1]), dtype=out_dtype)
        to_voxel = np.linalg.inv(source.affine)
        for start, vox in map_voxel_grid(transform, reference, to_voxel, chunk=_CHUNK):
            out[start : start + len(vox)] = _nearest(flat_data, vox, fill)
    return out.reshape(*reference.shape, *extra) if extra else out.reshape(reference.shape)


def _nearest(data: NDArray[np.generic], vox: NDArray[np.float64], fill: float) -> NDArray:
    # half-way points go up, as in ITK and ANTs (not to the even neighbour, as np.rint does,
    # which on a grid of half the spacing would give every other label twice its share)
    idx = np.floor(vox + 0.5).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(data.shape[:3])), axis=-1)
    result = np.full((vox.shape[0], data.shape[-1]), fill, dtype=data.dtype)
    i, j, k = idx[inside].T
    result[inside] = data[i, j, k]
    return result


def _linear(
    data: NDArray[np.generic], source: Geometry, transform: Transform, reference: Geometry,
    fill: float,
) -> NDArray[np.float32]:
    """Trilinear resampling of ``data`` ``[n0, n1, n2, C]``: ``[m0 * m1 * m2, C]`` float32.

    Works in network order (:func:`~regpipe.transforms.map_voxel_slabs`), so the samples
    visit the source in memory order.
    """
    tensor = torch.from_numpy(
        np.ascontiguousarray(data.transpose(3, 2, 1, 0), dtype=np.float32)
    )[None]
    to_sampling = index_to_sampling_matrix(source.shape) @ np.linalg.inv(source.affine)
    # As ITK and ANTs: edge values up to half a voxel outside, ``fill`` beyond.
    spans = [max(int(n) - 1, 1) for n in source.shape]
    low = torch.tensor([-1.0 - 1.0 / d for d in spans])
    high = torch.tensor([(2.0 * n - 1.0) / d - 1.0 for n, d in zip(source.shape, spans,
                                                                   strict=True)])
    out = torch.empty(tensor.shape[1], *reference.shape[::-1])
    for first, points in map_voxel_slabs(transform, reference, to_sampling, chunk=_CHUNK,
                                         dtype=torch.float32, network_order=True):
        values = F.grid_sample(tensor, points[None], mode="bilinear", padding_mode="border",
                               align_corners=True)[0]
        outside = ((points < low) | (points >= high)).any(dim=-1)
        out[:, first : first + points.shape[0]] = values.masked_fill(outside, fill)
    return np.ascontiguousarray(out.numpy().transpose(3, 2, 1, 0)).reshape(-1, out.shape[0])


def apply_transform(
    moving: ImageLike,
    transform: Transform | str | os.PathLike,
    reference: ImageLike | Geometry,
    *,
    interpolation: Interpolation = "linear",
    output: str | os.PathLike | None = None,
) -> Image:
    """Resample ``moving`` onto ``reference``'s grid through ``transform`` (fixed -> moving).

    ``transform`` may be a transform object, a file (see :mod:`regpipe.transform_files`) or
    a list of them, applied as :func:`regpipe.transforms.compose` applies its arguments. Use
    ``interpolation="nearest"`` for label maps: their integer type and values are kept. The
    result keeps the reference image's NIfTI space code (an MNI template's 4).
    """
    from regpipe.atomic import check_distinct_paths, check_output_folder
    from regpipe.transform_files import read_transform
    from regpipe.transforms import compose

    if interpolation not in ("linear", "nearest"):
        raise InputError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    parts = list(transform) if isinstance(transform, (list, tuple)) else [transform]
    if output is not None:
        check_image_path(output)
        check_output_folder(output)  # before the resampling, not after it
        inputs: dict[str, Any] = {"moving": moving, "reference": reference}
        inputs.update({f"transform {n + 1}": part for n, part in enumerate(parts)})
        check_distinct_paths({"output": output}, {  # paths, or images read from one
            name: value if isinstance(value, (str, os.PathLike)) else getattr(value, "path", None)
            for name, value in inputs.items()})
    for part in parts:
        if not (isinstance(part, (str, os.PathLike)) or hasattr(part, "map_points")):
            raise InputError(f"transform must be a regpipe transform, a transform file or a "
                             f"list of them, not {type(part).__name__}")
    if not parts:
        raise InputError("an empty list of transforms")
    # resampling takes any content: empty label maps, constant images, an all-zero reference
    moving_img = load_image(moving, "any", "moving image")
    header = None
    if isinstance(reference, Geometry):
        geometry = reference
    else:
        reference_img = load_image(reference, "any", "reference image")
        geometry, header = reference_img.geometry, reference_img.header
    if output is not None:
        check_image_path(output, geometry)  # a format that holds this grid
    loaded = [read_transform(Path(p)) if isinstance(p, (str, os.PathLike)) else p for p in parts]
    chain = loaded[0] if len(loaded) == 1 else compose(*loaded)
    _warn_if_field_misses(chain, geometry)
    data = warp_array(moving_img.data, moving_img.geometry, chain, geometry,
                      interpolation=interpolation)
    image = Image(data, geometry, header=header)
    if output is not None:
        save_image(image, output)
    return image


def _warn_if_field_misses(transform: Transform, geometry: Geometry) -> None:
    """Warn when a displacement field covers less than half of the reference grid: outside
    its grid it displaces nothing (ITK's convention), which usually means the transform was
    made for another fixed image."""
    from regpipe.transforms import ComposedTransform, DisplacementField, GridTransform

    while isinstance(transform, ComposedTransform) and transform.transforms:
        transform = transform.transforms[0]  # the part applied to the reference's points
    if isinstance(transform, DisplacementField):
        field_grid = transform.geometry
    elif isinstance(transform, GridTransform) and transform.outside == "zeros":
        shape = transform.displacement.shape[1:]
        field_grid = Geometry((int(shape[0]), int(shape[1]), int(shape[2])), transform.grid_in)
    else:
        return
    axes = [np.linspace(0, n - 1, 9) for n in geometry.shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    points = field_grid.world_to_voxel(geometry.voxel_to_world(ijk))
    inside = np.all((points > -0.5) & (points < np.asarray(field_grid.shape) - 0.5), axis=1)
    if inside.mean() < 0.5:
        LOGGER.warning(
            "the transform's displacement field covers %.0f%% of the reference grid; outside "
            "it nothing is displaced (ITK's convention): was it made for another fixed image?",
            100 * inside.mean())
