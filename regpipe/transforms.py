"""Spatial transforms in world space (RAS+ mm), all of them fixed -> moving (pull-back).

Three kinds, one protocol (``map_points``):

* :class:`AffineTransform` -- a 4x4 world-to-world matrix.
* :class:`GridTransform` -- what a registration network produces: a displacement on a network
  grid laid over the fixed image, followed by a second grid placement on the moving side
  (which carries any affine pre-alignment). Exact inverse by fixed-point iteration.
* :class:`DisplacementField` -- a dense field of RAS+ mm displacements on a voxel grid, the
  form written to disk (see :mod:`regpipe.transform_files`).

Every transform maps a fixed-space point ``x`` to the moving-space point ``T(x)``; resampling
the moving image onto the fixed grid samples ``moving`` at ``T(x)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Literal, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from regpipe.spaces import Geometry, apply_affine, sample_network

#: Points processed per chunk when densifying (bounds peak memory, about 100 MB per chunk).
_CHUNK = 2_000_000


class Transform(Protocol):
    """Anything that maps fixed-space RAS+ mm points to moving-space points."""

    def map_points(self, points: NDArray[np.floating]) -> NDArray[np.float64]:
        """Map ``[..., 3]`` RAS+ mm fixed-space points to moving space."""
        ...


@dataclass(frozen=True, eq=False)
class AffineTransform:
    """World-to-world affine ``T(x) = M x`` with ``M`` a 4x4 RAS+ mm matrix (fixed -> moving)."""

    matrix: NDArray[np.float64]

    def map_points(self, points: NDArray[np.floating]) -> NDArray[np.float64]:
        return apply_affine(self.matrix, points)

    def inverse(self) -> AffineTransform:
        return AffineTransform(np.asarray(np.linalg.inv(self.matrix), dtype=np.float64))

    @classmethod
    def identity(cls) -> AffineTransform:
        return cls(np.eye(4))


@dataclass(frozen=True, eq=False)
class GridTransform:
    """``T(x) = G_out(g + U(g))`` with ``g = G_in^-1 x``: a network-grid displacement.

    Parameters
    ----------
    grid_in
        4x4 matrix from network indices ``(d0, d1, d2)`` to fixed-space RAS+ mm.
    displacement
        ``[3, n0, n1, n2]`` float32 tensor, displacement in network *index* units, channel
        ``c`` along network axis ``d_c`` (uniGradICON's field times ``n_c - 1``).
    grid_out
        4x4 matrix from network indices to moving-space RAS+ mm; it includes any affine
        pre-alignment (``grid_out = A @ grid_in``) or, in uniGradICON's squash mode, the
        moving image's own grid placement.
    outside
        How the displacement is extended beyond the grid: ``"border"`` repeats the edge,
        ``"zeros"`` adds nothing (ITK's displacement-field semantics).
    """

    grid_in: NDArray[np.float64]
    displacement: torch.Tensor = dataclass_field(repr=False)
    grid_out: NDArray[np.float64]
    outside: str = "border"

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(self.displacement.shape[1:])  # type: ignore[return-value]

    def map_points(self, points: NDArray[np.floating]) -> NDArray[np.float64]:
        points = np.asarray(points, dtype=np.float64)
        out = np.empty(points.shape, dtype=np.float64)
        flat_in, flat_out = points.reshape(-1, 3), out.reshape(-1, 3)
        to_grid = np.linalg.inv(self.grid_in)
        field = self.displacement[None].float()
        for start in range(0, flat_in.shape[0], _CHUNK):
            g = apply_affine(to_grid, flat_in[start : start + _CHUNK])
            g_t = torch.from_numpy(g.astype(np.float32))
            u = sample_network(field, g_t, padding=self.outside)  # type: ignore[arg-type]
            moved = g + u.numpy().astype(np.float64)
            flat_out[start : start + _CHUNK] = apply_affine(self.grid_out, moved)
        return out

    def inverse(self, iterations: int = 30, tolerance: float = 1e-3) -> GridTransform:
        """The inverse transform (moving -> fixed), by fixed-point iteration on the grid.

        Solves ``g + U(g) = h`` for ``g`` at every grid node ``h`` through
        ``V <- -U(h + V)``, which converges while the displacement's Jacobian stays away from
        folding. A node stops once its update is below ``tolerance`` (grid voxels), so later
        iterations only touch the few nodes still moving; after ten iterations those take
        half steps, which settles the two-cycles that strongly compressed regions (Jacobian
        determinant near 0) fall into.
        """
        disp = self.displacement.float()
        shape = self.grid_shape
        axes = [torch.arange(n, dtype=torch.float32, device=disp.device) for n in shape]
        nodes = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        field = disp[None]
        inv = -disp.permute(1, 2, 3, 0).reshape(-1, 3).clone()
        active = torch.arange(nodes.shape[0], device=disp.device)
        for iteration in range(iterations):
            current = inv[active]
            new = -sample_network(field, nodes[active] + current, padding="border")
            step = new - current
            if iteration >= 10:
                step = 0.5 * step
            inv[active] = current + step
            active = active[step.abs().amax(dim=-1) >= tolerance]
            if active.numel() == 0:
                break
        inverse_field = inv.reshape(*shape, 3).permute(3, 0, 1, 2).contiguous()
        return GridTransform(self.grid_out, inverse_field, self.grid_in, self.outside)

    def inverse_consistency(self, inverse: GridTransform) -> float:
        """Largest distance (grid voxels) between ``g`` and ``inverse(forward(g))`` on the grid."""
        shape = self.grid_shape
        axes = [torch.arange(n, dtype=torch.float32) for n in shape]
        nodes = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        fwd = nodes + self.displacement.permute(1, 2, 3, 0)
        back = fwd + sample_network(inverse.displacement[None].float(), fwd, padding="border")
        inside = ((fwd >= 0) & (fwd <= torch.tensor(shape) - 1)).all(-1)
        return float((back - nodes).norm(dim=-1)[inside].max()) if inside.any() else 0.0


@dataclass(frozen=True, eq=False)
class DisplacementField:
    """Dense pull-back field: ``T(x) = x + field(x)`` for points ``x`` of ``geometry``.

    Parameters
    ----------
    geometry
        The grid the field lives on (the fixed image's for a forward transform).
    field
        ``[X, Y, Z, 3]`` float32 RAS+ mm displacements. Outside the grid the displacement is
        zero, as in ITK and ANTs.
    """

    geometry: Geometry
    field: NDArray[np.float32] = dataclass_field(repr=False)

    def __post_init__(self) -> None:
        if self.field.shape != (*self.geometry.shape, 3):
            raise ValueError(
                f"field shape {self.field.shape} does not match grid {self.geometry.shape} x 3"
            )

    def map_points(self, points: NDArray[np.floating], *,
                   outside: Literal["zeros", "border"] = "zeros") -> NDArray[np.float64]:
        """``x + field(x)``; ``outside="border"`` repeats the edge values beyond the grid
        instead of the zero displacement of ITK's convention."""
        world = np.asarray(points, dtype=np.float64)
        vox = self.geometry.world_to_voxel(world)
        tensor = torch.from_numpy(np.ascontiguousarray(self.field.transpose(3, 2, 1, 0)))[None]
        idx = torch.from_numpy(vox[..., ::-1].astype(np.float32).copy())
        disp = sample_network(tensor.float(), idx, padding=outside)
        return world + disp.numpy().astype(np.float64)

    @classmethod
    def from_transform(
        cls, transform: Transform, geometry: Geometry, chunk: int = _CHUNK
    ) -> DisplacementField:
        """Evaluate any transform at the voxel centres of ``geometry``."""
        field = np.empty((*geometry.shape, 3), dtype=np.float32)
        # float32 (the field's own precision; within 1e-4 mm of float64) in network order:
        # measured 2-3x faster than float64 in C order
        for first, moved in map_voxel_slabs(transform, geometry, chunk=chunk, displacement=True,
                                            dtype=torch.float32, network_order=True):
            field[:, :, first : first + moved.shape[0]] = moved.permute(2, 1, 0, 3).numpy()
        return cls(geometry, field)


def map_voxel_grid(
    transform: Transform,
    geometry: Geometry,
    output_matrix: NDArray[np.floating] | None = None,
    chunk: int = _CHUNK,
) -> Iterator[tuple[int, NDArray[np.float64]]]:
    """``output_matrix @ T(x)`` for the voxel centres ``x`` of ``geometry``, in chunks.

    Yields ``(start, points)``: ``points`` ``[n, 3]`` float64 for the voxels ``start .. start +
    n`` in C order of ``geometry.shape``. ``output_matrix`` (default: identity, world RAS+ mm)
    lets a caller ask directly for a source image's voxel indices. See
    :func:`map_voxel_slabs` for the same as torch tensors, in either memory order.
    """
    per_slab = max(int(geometry.shape[1]) * int(geometry.shape[2]), 1)
    for first, points in map_voxel_slabs(transform, geometry, output_matrix, chunk=chunk):
        yield first * per_slab, points.reshape(-1, 3).numpy()


def map_voxel_slabs(
    transform: Transform,
    geometry: Geometry,
    output_matrix: NDArray[np.floating] | None = None,
    *,
    chunk: int = _CHUNK,
    dtype: torch.dtype = torch.float64,
    network_order: bool = False,
    displacement: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``output_matrix @ T(x)`` for the voxel centres ``x`` of ``geometry``, a slab at a time.

    Yields ``(first, points)``, ``points`` a ``dtype`` tensor of ``(x, y, z)`` triples for a
    slab of whole planes (at most about ``chunk`` points). By default the slab is the planes
    ``first ...`` along the first voxel axis and ``points`` is ``[m, n1, n2, 3]`` (C order of
    ``geometry.shape``). With ``network_order`` the slab runs along the last voxel axis and
    ``points`` is ``[m, n1, n0, 3]``: the ``[k, j, i]`` layout of network tensors
    (:func:`~regpipe.spaces.to_network_tensor`), in which consecutive points sample a
    network-order image at consecutive addresses, several times faster than C order.

    :class:`GridTransform` and :class:`AffineTransform` are evaluated in torch with their
    matrices folded together (one trilinear sample per point for a grid); other transforms
    through ``map_points`` (float64, then converted). With ``displacement``, the points are
    ``output_matrix @ (T(x) - x)`` instead: with the default ``output_matrix``, the RAS+ mm
    displacement of every voxel.
    """
    out = np.eye(4) if output_matrix is None else np.asarray(output_matrix, dtype=np.float64)
    shape = tuple(int(n) for n in geometry.shape)
    axis, rows, columns = (2, shape[1], shape[0]) if network_order else (0, shape[1], shape[2])
    slabs = max(chunk // max(rows * columns, 1), 1)
    row, column = torch.meshgrid(torch.arange(rows, dtype=dtype),
                                 torch.arange(columns, dtype=dtype), indexing="ij")
    for first in range(0, shape[axis], slabs):
        plane = torch.arange(first, min(first + slabs, shape[axis]), dtype=dtype)
        plane, j, other = torch.broadcast_tensors(plane[:, None, None], row[None], column[None])
        ijk = torch.stack([other, j, plane] if network_order else [plane, j, other], dim=-1)
        points = _map_indices(transform, geometry, out, ijk)
        if displacement:
            to_out = torch.from_numpy(out @ geometry.affine).to(dtype)
            points -= ijk @ to_out[:3, :3].T + to_out[:3, 3]
        yield first, points


def _map_indices(
    transform: Transform, geometry: Geometry, out: NDArray[np.float64], ijk: torch.Tensor
) -> torch.Tensor:
    """``out @ T(x)`` at the voxel indices ``ijk`` ``[..., 3]`` of ``geometry``."""
    dtype = ijk.dtype

    def matrix(m: NDArray[np.float64]) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = torch.from_numpy(np.ascontiguousarray(m)).to(dtype)
        return tensor[:3, :3].T, tensor[:3, 3]

    if isinstance(transform, GridTransform):
        linear, shift = matrix(np.linalg.inv(transform.grid_in) @ geometry.affine)
        g = ijk @ linear + shift
        u = sample_network(transform.displacement[None].float(), g.float(),
                           padding=transform.outside)  # type: ignore[arg-type]
        linear, shift = matrix(out @ transform.grid_out)
        return (g + u.to(dtype)) @ linear + shift
    if isinstance(transform, AffineTransform):
        linear, shift = matrix(out @ transform.matrix @ geometry.affine)
        return ijk @ linear + shift
    world = apply_affine(geometry.affine, ijk.reshape(-1, 3).to(torch.float64).numpy())
    moved = apply_affine(out, transform.map_points(world))
    return torch.from_numpy(moved).to(dtype).reshape(ijk.shape)


def compose(*transforms: Transform) -> ComposedTransform:
    """``compose(A, B)(x) = B(A(x))``: apply ``A`` first (in fixed space), then ``B``."""
    return ComposedTransform(tuple(transforms))


@dataclass(frozen=True, eq=False)
class ComposedTransform:
    """A chain of transforms applied first to last."""

    transforms: tuple[Transform, ...]

    def map_points(self, points: NDArray[np.floating]) -> NDArray[np.float64]:
        out = np.asarray(points, dtype=np.float64)
        for transform in self.transforms:
            out = transform.map_points(out)
        return out
