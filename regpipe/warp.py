"""Resample images and label maps through a transform onto a reference grid."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from regpipe.spaces import Geometry, index_to_sampling_grid
from regpipe.transforms import Transform, map_voxel_grid

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
    to_voxel = np.linalg.inv(source.affine)
    out_dtype = (data.dtype if interpolation == "nearest"
                 else np.result_type(data.dtype, np.float32))
    out = np.empty((int(np.prod(reference.shape)), flat_data.shape[-1]), dtype=out_dtype)
    if interpolation == "linear":
        tensor = torch.from_numpy(
            np.ascontiguousarray(flat_data.transpose(3, 2, 1, 0), dtype=np.float32)
        )[None]
    for start, vox in map_voxel_grid(transform, reference, to_voxel, chunk=_CHUNK):
        if interpolation == "nearest":
            out[start : start + len(vox)] = _nearest(flat_data, vox, fill)
        else:
            out[start : start + len(vox)] = _linear(tensor, vox, source.shape, fill)
    return out.reshape(*reference.shape, *extra) if extra else out.reshape(reference.shape)


def _nearest(data: NDArray[np.generic], vox: NDArray[np.float64], fill: float) -> NDArray:
    idx = np.rint(vox).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(data.shape[:3])), axis=-1)
    result = np.full((vox.shape[0], data.shape[-1]), fill, dtype=data.dtype)
    i, j, k = idx[inside].T
    result[inside] = data[i, j, k]
    return result


def _linear(
    tensor: torch.Tensor, vox: NDArray[np.float64], shape: tuple[int, int, int], fill: float
) -> NDArray:
    grid = index_to_sampling_grid(torch.from_numpy(vox.astype(np.float32)), shape)
    grid = grid.reshape(1, -1, 1, 1, 3)
    values = F.grid_sample(tensor, grid, mode="bilinear", padding_mode="border",
                           align_corners=True)
    result = values.reshape(tensor.shape[1], -1).T.numpy()
    # As ITK and ANTs: edge values up to half a voxel outside, ``fill`` beyond.
    outside = np.any((vox < -0.5) | (vox >= np.asarray(shape) - 0.5), axis=-1)
    result[outside] = fill
    return result
