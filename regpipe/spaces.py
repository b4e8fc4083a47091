"""Coordinate conventions: the one module of regpipe that owns them.

Spaces
------
voxel
    Continuous index ``(i, j, k)`` into a nibabel array; voxel centres sit on integers.
world
    RAS+ millimetres: what a NIfTI affine maps voxel indices to. Every point and every
    displacement regpipe keeps in memory is in this space.
lps
    LPS+ millimetres, ``diag(-1, -1, 1) @ ras``: what ITK, ANTs and SimpleITK use. Only the
    transform-file readers and writers convert to it.
network
    A tensor ``[batch, channel, D0, D1, D2]``. Its axes are the *reversed* voxel axes of the
    grid it samples (``D0 = k``, ``D2 = i``), which is exactly ``np.asarray(itk_image)``, the
    order uniGradICON was trained on. A network grid is described by a 4x4 matrix mapping
    network indices ``(d0, d1, d2)`` to world points.
normalised
    Channel ``c`` of a coordinate tensor holds ``d_c / (n_c - 1)`` in ``[0, 1]``
    (``align_corners=True``) and refers to tensor axis ``c + 2``.

Direction
---------
A registration transform maps **fixed** points to **moving** points (a pull-back): the moving
image resampled onto the fixed grid is ``moving(T(x))`` for every fixed point ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

#: Matrix converting RAS+ coordinates to LPS+ (it is its own inverse).
RAS_TO_LPS: NDArray[np.float64] = np.diag([-1.0, -1.0, 1.0])

GridMode = Literal["squash", "isotropic", "squash-ras"]
#: Every accepted grid mode.
GRID_MODES: tuple[str, ...] = ("squash", "isotropic", "squash-ras")


@dataclass(frozen=True, eq=False)
class Geometry:
    """A regular 3-D voxel grid placed in world (RAS+ mm) space.

    Parameters
    ----------
    shape
        Number of voxels along ``(i, j, k)``.
    affine
        4x4 matrix mapping voxel indices to RAS+ millimetres (the NIfTI convention).
    """

    shape: tuple[int, int, int]
    affine: NDArray[np.float64]

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got {affine!r}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("affine is singular: the image has no valid orientation")
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be three positive integers, got {self.shape}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_image(cls, image: nib.spatialimages.SpatialImage) -> Geometry:
        """Geometry of the first three axes of a nibabel image."""
        return cls(tuple(image.shape[:3]), image.affine)  # type: ignore[arg-type]

    @property
    def spacing(self) -> NDArray[np.float64]:
        """Voxel size in mm along ``(i, j, k)``."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def direction_ras(self) -> NDArray[np.float64]:
        """Unit column vectors of the voxel axes in RAS+ space (3x3)."""
        return self.affine[:3, :3] / self.spacing

    def voxel_to_world(self, ijk: NDArray[np.floating]) -> NDArray[np.float64]:
        """Map voxel indices ``[..., 3]`` to RAS+ mm ``[..., 3]``."""
        return apply_affine(self.affine, ijk)

    def world_to_voxel(self, xyz: NDArray[np.floating]) -> NDArray[np.float64]:
        """Map RAS+ mm points ``[..., 3]`` to continuous voxel indices ``[..., 3]``."""
        return apply_affine(np.linalg.inv(self.affine), xyz)

    def center_world(self) -> NDArray[np.float64]:
        """RAS+ mm position of the grid's centre."""
        return self.voxel_to_world((np.asarray(self.shape, dtype=np.float64) - 1) / 2)

    def same_as(self, other: Geometry, atol: float = 1e-4) -> bool:
        """True when both grids have the same shape and (nearly) the same affine."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    def network_shape(self) -> tuple[int, int, int]:
        """Shape of this grid as a network tensor (reversed voxel axes)."""
        return (self.shape[2], self.shape[1], self.shape[0])

    def network_to_world(self) -> NDArray[np.float64]:
        """4x4 matrix from network indices ``(d0, d1, d2) = (k, j, i)`` to RAS+ mm."""
        return self.affine @ REVERSE_AXES


def ras_reoriented(geometry: Geometry) -> Geometry:
    """The same voxels with their axes permuted and flipped to the closest RAS orientation
    (``nibabel.as_closest_canonical``'s grid): how preprocessing and the ``isotropic`` and
    ``squash-ras`` network placements see an image, whatever its file's voxel order."""
    ornt = nib.orientations.io_orientation(geometry.affine)
    shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(ornt):
        shape[int(new_axis)] = int(geometry.shape[axis])
    affine = geometry.affine @ nib.orientations.inv_ornt_aff(ornt, geometry.shape)
    return Geometry((shape[0], shape[1], shape[2]), affine)


def orthogonal_cover(geometry: Geometry) -> Geometry:
    """The smallest grid with orthogonal axes that holds every voxel centre of ``geometry``.

    For sheared grids (a CT with gantry tilt, a sheared sform), which ITK images cannot
    represent: same voxel sizes (the lengths of the sheared axes), axis directions the nearest
    orthonormal ones (polar decomposition), and enough voxels on each axis to reach the
    farthest corner of ``geometry``. An orthogonal grid comes back unchanged.
    """
    u, _, vt = np.linalg.svd(geometry.direction_ras)
    linear = (u @ vt) * geometry.spacing
    if np.allclose(linear, geometry.affine[:3, :3], atol=1e-9):
        return geometry
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in geometry.shape], indexing="ij"))
    world = geometry.voxel_to_world(corners.reshape(3, -1).T)
    origin = geometry.affine[:3, 3]
    index = np.linalg.solve(linear, (world - origin).T).T
    low = np.floor(index.min(axis=0) + 1e-6)
    high = np.ceil(index.max(axis=0) - 1e-6)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin + linear @ low
    size = (high - low + 1).astype(int)
    return Geometry((int(size[0]), int(size[1]), int(size[2])), affine)


#: Permutation matrix between network indices ``(d0, d1, d2)`` and voxel ``(i, j, k)``.
REVERSE_AXES: NDArray[np.float64] = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)


def apply_affine(
    matrix: NDArray[np.floating], points: NDArray[np.floating]
) -> NDArray[np.float64]:
    """Apply a 4x4 homogeneous matrix to points ``[..., 3]``."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def ras_to_lps(points_or_vectors: NDArray[np.floating]) -> NDArray[np.float64]:
    """Flip the first two components of ``[..., 3]`` RAS+ coordinates to LPS+ (and back)."""
    out = np.array(points_or_vectors, dtype=np.float64, copy=True)
    out[..., :2] *= -1
    return out


lps_to_ras = ras_to_lps


def affine_ras_to_lps(matrix_ras: NDArray[np.floating]) -> NDArray[np.float64]:
    """Express a 4x4 world->world RAS matrix as the equivalent LPS matrix (and back)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(matrix_ras, dtype=np.float64) @ flip


def network_grid(
    geometry: Geometry,
    grid_shape: tuple[int, int, int],
    mode: GridMode = "squash",
) -> NDArray[np.float64]:
    """4x4 matrix from the indices of a network grid laid over ``geometry`` to RAS+ mm.

    ``squash`` is uniGradICON's placement: each voxel axis is stretched independently onto
    ``n`` samples (``align_corners=False``: voxel ``i = (N / n) (x + 1/2) - 1/2``), so the grid
    covers exactly the image and the aspect ratio is lost. ``isotropic`` keeps the physical
    aspect ratio: one spacing for all axes, the smallest with which every axis fits (for a
    cube grid, the longest side's), centred on the image (shorter sides are padded with zeros
    when sampled), with voxel axes permuted and
    flipped to the closest RAS orientation so the network sees anatomy in one orientation.
    ``squash-ras`` stretches each axis like ``squash`` after the same reorientation (network
    axes ``(d0, d1, d2)`` = closest ``(S, A, R)``, whatever the file's voxel order): regpipe's
    bundled model uses it.
    """
    n_net = np.asarray(grid_shape, dtype=np.float64)  # (n0, n1, n2) in network order
    if mode == "squash":
        shape = np.asarray(geometry.shape, dtype=np.float64)
        affine = geometry.affine
    elif mode in ("isotropic", "squash-ras"):
        ras = ras_reoriented(geometry)
        shape, affine = np.asarray(ras.shape, dtype=np.float64), ras.affine
    else:
        raise ValueError(f"grid mode must be one of {', '.join(GRID_MODES)}, got {mode!r}")
    n_vox = n_net[::-1]  # network sizes along (i, j, k)
    if mode != "isotropic":
        scale = shape / n_vox
    else:
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        # one spacing for every axis, the smallest with which each axis of the image fits
        # (a cube grid: the longest side / n; a slab's own grid keeps its own voxel size)
        iso = float(np.max(shape * spacing / n_vox))
        scale = iso / spacing
    # voxel = c + scale * (x - (n - 1) / 2), with c = (N - 1) / 2, x in voxel order
    to_voxel = np.eye(4)
    to_voxel[:3, :3] = np.diag(scale)
    to_voxel[:3, 3] = (shape - 1) / 2 - scale * (n_vox - 1) / 2
    return affine @ to_voxel @ REVERSE_AXES


def identity_grid(
    grid_shape: tuple[int, ...], device: torch.device | None = None
) -> torch.Tensor:
    """Normalised identity coordinates ``[1, 3, n0, n1, n2]`` (float64 ``i/(n-1)`` -> float32)."""
    axes = [
        torch.arange(n, dtype=torch.float64, device=device) / max(n - 1, 1) for n in grid_shape
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh).unsqueeze(0).to(torch.float32)


def index_to_sampling_grid(
    index_points: torch.Tensor, source_shape: tuple[int, ...]
) -> torch.Tensor:
    """Turn source-voxel indices ``[..., 3]`` (``(i, j, k)`` order) into grid_sample coordinates.

    The source tensor must be laid out in network order ``[B, C, k, j, i]``; ``grid_sample``'s
    last dimension is then ``(i, j, k)`` and, with ``align_corners=True``, ``-1`` and ``+1`` are
    the centres of the first and last voxels.
    """
    size = torch.as_tensor(source_shape, dtype=index_points.dtype, device=index_points.device)
    return index_points * (2.0 / torch.clamp(size - 1, min=1)) - 1.0


def index_to_sampling_matrix(source_shape: tuple[int, ...]) -> NDArray[np.float64]:
    """4x4 matrix form of :func:`index_to_sampling_grid`: homogeneous ``(i, j, k)`` source-voxel
    indices to ``grid_sample`` coordinates of a network-order tensor."""
    matrix = np.eye(4)
    for axis, n in enumerate(source_shape):
        matrix[axis, axis] = 2.0 / max(int(n) - 1, 1)
        matrix[axis, 3] = -1.0
    return matrix


def index_grid(
    shape: tuple[int, ...] | list[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Network-index coordinates ``[1, 3, n0, n1, n2]`` of a grid (float32).

    Channel ``c`` holds the index along tensor axis ``c + 2``: the identity map in the
    grid-index units of displacement fields (``g + U(g)``).
    """
    axes = [torch.arange(int(n), dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def sampling_identity(
    shape: tuple[int, ...] | list[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """``grid_sample``'s identity coordinates ``[1, n0, n1, n2, 3]`` of a network-order grid:
    last axis ``(d2, d1, d0)`` in [-1, 1] (``align_corners=True``), i.e. :func:`index_grid`
    through :func:`index_to_sampling_grid`, built directly for hot loops."""
    axes = [torch.linspace(-1.0, 1.0, int(n), device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)[None]


def sample_at_indices(
    volume: torch.Tensor, points: torch.Tensor, padding: Literal["zeros", "border"] = "border"
) -> torch.Tensor:
    """Trilinear samples of ``volume`` ``[1, C, n0, n1, n2]`` at network-index points.

    ``points`` is ``[1, 3, ...]`` in :func:`index_grid`'s layout (channel ``c``: index along
    axis ``c``); the result is ``[1, C, ...]``. ``padding``: ``grid_sample``'s, outside the
    grid.
    """
    # grid_sample wants (d2, d1, d0) last
    grid = index_to_sampling_grid(points.permute(0, 2, 3, 4, 1).flip(-1), volume.shape[2:][::-1])
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def resample_volume(
    volume: torch.Tensor,
    source: Geometry,
    target_to_world: NDArray[np.float64],
    target_shape: tuple[int, int, int],
    *,
    mode: Literal["bilinear", "nearest"] = "bilinear",
    padding: Literal["zeros", "border"] = "zeros",
) -> torch.Tensor:
    """Resample a volume through an affine relation between two grids.

    Parameters
    ----------
    volume
        ``[B, C, k, j, i]`` tensor (network order) holding data on ``source``.
    source
        Geometry of ``volume``.
    target_to_world
        4x4 matrix from target network indices ``(d0, d1, d2)`` to RAS+ mm.
    target_shape
        Target shape in network order ``(n0, n1, n2)``.

    Returns
    -------
    Tensor ``[B, C, n0, n1, n2]``, trilinear (``bilinear``) or nearest neighbour.
    """
    to_source = np.linalg.inv(source.affine) @ target_to_world  # target (d) -> source (i,j,k)
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    axes = [torch.arange(n, dtype=torch.float64, device=volume.device) for n in target_shape]
    # Build the sampling grid slice by slice to bound memory at ~24 bytes per voxel.
    m = torch.as_tensor(to_source, dtype=torch.float64, device=volume.device)
    d1, d2 = torch.meshgrid(axes[1], axes[2], indexing="ij")
    plane = torch.stack([torch.zeros_like(d1), d1, d2], dim=-1)  # [n1, n2, 3]
    base = plane @ m[:3, :3].T + m[:3, 3]
    step = m[:3, 0]
    grid = base.unsqueeze(0) + axes[0].view(-1, 1, 1, 1) * step
    grid = index_to_sampling_grid(grid.to(dtype), source.shape).unsqueeze(0)
    grid = grid.expand(volume.shape[0], *grid.shape[1:])
    return F.grid_sample(
        volume.to(dtype), grid, mode=mode, padding_mode=padding, align_corners=True
    )


def sample_network(
    tensor: torch.Tensor,
    indices: torch.Tensor,
    *,
    mode: Literal["bilinear", "nearest"] = "bilinear",
    padding: Literal["zeros", "border"] = "border",
) -> torch.Tensor:
    """Sample a network-order tensor ``[1, C, n0, n1, n2]`` at network indices ``[..., 3]``.

    ``indices`` hold continuous ``(d0, d1, d2)`` indices; the result has shape ``[..., C]``.
    ``padding="border"`` repeats the edge everywhere outside; ``"zeros"`` follows ITK: the
    edge value up to half a voxel beyond the outermost centres, zero further out.
    """
    shape = tuple(tensor.shape[2:])
    flat = indices.reshape(1, -1, 1, 1, 3).flip(-1)  # grid_sample wants (d2, d1, d0)
    grid = index_to_sampling_grid(flat.to(tensor.dtype), shape[::-1])
    out = F.grid_sample(tensor, grid, mode=mode, padding_mode="border", align_corners=True)
    out = out.reshape(tensor.shape[1], -1).T
    if padding == "zeros":
        # ITK's convention: the edge value holds to half a voxel beyond the outermost voxel
        # centres, and exactly zero lies outside (not a linear fade to zero).
        flat_idx = indices.reshape(-1, 3)
        size = torch.as_tensor(shape, dtype=flat_idx.dtype, device=flat_idx.device)
        outside = ((flat_idx < -0.5) | (flat_idx >= size - 0.5)).any(dim=-1)
        out = out.masked_fill(outside[:, None], 0.0)
    return out.reshape(*indices.shape[:-1], tensor.shape[1])


def to_network_tensor(
    data: NDArray[np.generic], device: torch.device | None = None
) -> torch.Tensor:
    """Array ``[i, j, k]`` -> tensor ``[1, 1, k, j, i]`` (network order), float32, contiguous."""
    array = np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0))
    return torch.from_numpy(array)[None, None].to(device)


def from_network_tensor(tensor: torch.Tensor) -> NDArray[np.float32]:
    """Tensor ``[1, 1, k, j, i]`` (or ``[k, j, i]``) -> array ``[i, j, k]``."""
    array = tensor.detach().to("cpu", torch.float32).numpy()
    if array.ndim == 5:
        array = array[0, 0]
    return np.ascontiguousarray(array.transpose(2, 1, 0))
