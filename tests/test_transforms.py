"""Transforms: mapping, inverse, densification and warping."""

from __future__ import annotations

import numpy as np
import torch

from regpipe.spaces import Geometry, network_grid
from regpipe.transforms import (
    AffineTransform,
    DisplacementField,
    GridTransform,
    compose,
    map_voxel_slabs,
)
from regpipe.warp import warp_array
from tests.conftest import blob_image


def smooth_displacement(shape, amplitude=1.5, seed=0) -> torch.Tensor:
    """A smooth random field: a few low-frequency sinusoids per component (grid voxels)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    field = np.zeros((3, *shape))
    for c in range(3):
        for _ in range(3):
            k = rng.uniform(0.5, 1.5, 3)
            phase = rng.uniform(0, 2 * np.pi)
            field[c] += np.sin(np.pi * sum(k[a] * axes[a] for a in range(3)) + phase)
    field *= amplitude / np.abs(field).max()
    return torch.from_numpy(field.astype(np.float32))


def test_grid_transform_identity_maps_points_to_themselves(geometry):
    grid = network_grid(geometry, (12, 14, 16), "isotropic")
    tx = GridTransform(grid, torch.zeros(3, 12, 14, 16), grid)
    pts = geometry.voxel_to_world(np.random.default_rng(1).random((50, 3)) * 10)
    assert np.allclose(tx.map_points(pts), pts, atol=1e-9)


def test_inverse_undoes_forward(geometry):
    shape = (24, 28, 32)
    grid = network_grid(geometry, shape, "isotropic")
    shift = np.eye(4)
    shift[:3, 3] = [2.0, -1.0, 0.5]
    tx = GridTransform(grid, smooth_displacement(shape), shift @ grid)
    inv = tx.inverse()
    # exact at grid nodes; between nodes trilinear interpolation of the inverse dominates
    assert tx.inverse_consistency(inv) < 0.1  # grid voxels
    pts = geometry.center_world() + np.random.default_rng(2).uniform(-5, 5, (100, 3))
    assert np.abs(inv.map_points(tx.map_points(pts)) - pts).max() < 0.1  # mm


def test_inverse_of_a_strongly_compressing_field_solves_the_inverse_equation():
    # a radial squeeze towards the centre: Jacobian determinant 0.03**3 there
    shape = (40, 40, 40)
    nodes = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape],
                                       indexing="ij"), dim=-1)
    offset = nodes - 20.0
    weight = torch.exp(-(offset**2).sum(-1) / (2 * 4.0**2))
    field = (-0.97 * offset * weight[..., None]).permute(3, 0, 1, 2).contiguous()
    inv = GridTransform(np.eye(4), field, np.eye(4)).inverse().displacement.permute(1, 2, 3, 0)
    from regpipe.spaces import sample_network

    moved = nodes + inv
    residual = (moved + sample_network(field[None], moved, padding="border") - nodes).norm(dim=-1)
    assert float(residual.max()) < 0.01  # grid voxels: g + U(g) = h at every node h


def test_displacement_field_reproduces_transform_on_grid_points(geometry):
    shape = (12, 14, 16)
    grid = network_grid(geometry, shape, "squash")
    tx = GridTransform(grid, smooth_displacement(shape), grid)
    field = DisplacementField.from_transform(tx, geometry)
    ijk = np.array([[3, 4, 5], [10, 2, 7], [0, 0, 0]], dtype=float)
    world = geometry.voxel_to_world(ijk)
    assert np.allclose(field.map_points(world), tx.map_points(world), atol=1e-4)


def test_warp_with_affine_moves_content_to_expected_place():
    geom = Geometry((20, 20, 20), np.diag([2.0, 2.0, 2.0, 1.0]))
    data = np.zeros(geom.shape, np.float32)
    data[12, 10, 10] = 1.0
    shift = np.eye(4)
    shift[:3, 3] = [4.0, 0.0, 0.0]  # fixed x samples moving at x + 4 mm
    out = warp_array(data, geom, AffineTransform(shift), geom)
    assert out[10, 10, 10] == 1.0 and out.sum() == 1.0


def test_nearest_warp_keeps_integer_dtype_and_values(geometry):
    labels = (blob_image(geometry) * 5).astype(np.int16)
    labels[labels > 3] = 1000  # a large label id survives
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 0.5, -0.5]
    out = warp_array(labels, geometry, AffineTransform(shift), geometry, interpolation="nearest")
    assert out.dtype == np.int16
    assert set(np.unique(out)) <= set(np.unique(labels))


def test_nearest_warp_rounds_half_way_points_up_as_itk_does():
    import SimpleITK as sitk

    labels = np.zeros((12, 3, 3), np.int16)
    labels[:] = np.arange(12, dtype=np.int16)[:, None, None]
    source = Geometry(labels.shape, np.eye(4))  # 1 mm, RAS
    for offset in (-0.25, 0.5):  # half the spacing; half a voxel shifted: ties everywhere
        affine = np.diag([0.5, 1.0, 1.0, 1.0])
        affine[0, 3] = offset
        reference = Geometry((22, 3, 3), affine)
        ours = warp_array(labels, source, AffineTransform.identity(), reference,
                          interpolation="nearest")[:, 1, 1]
        # ITK's answer (LPS: RAS x and y negated, same voxel order)
        image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
        image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
        grid = sitk.Image(*reference.shape, sitk.sitkInt16)
        grid.SetSpacing((0.5, 1.0, 1.0))
        grid.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
        grid.SetOrigin((-offset, 0.0, 0.0))
        itk = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(),
                                                   sitk.sitkNearestNeighbor, 0))[1, 1, :]
        assert ours.tolist() == itk.tolist()
    assert np.bincount(ours)[1:].tolist() == [2] * 11  # two samples per label, not 3-1-3-1


def test_compose_applies_first_transform_first():
    a = np.eye(4)
    a[:3, :3] *= 2.0
    b = np.eye(4)
    b[:3, 3] = [1.0, 0.0, 0.0]
    chain = compose(AffineTransform(a), AffineTransform(b))
    assert np.allclose(chain.map_points(np.array([1.0, 1.0, 1.0])), [3.0, 2.0, 2.0])


def _grid_transform(geometry):
    shape = (12, 14, 16)
    grid = network_grid(geometry, shape, "squash")
    shift = np.eye(4)
    shift[:3, 3] = [1.5, -2.0, 0.5]
    return GridTransform(grid, smooth_displacement(shape), shift @ grid)


def test_slabs_in_network_order_hold_the_same_points(geometry):
    tx = _grid_transform(geometry)
    c_order = torch.cat([p for _, p in map_voxel_slabs(tx, geometry, chunk=500)])
    network = torch.cat([p for _, p in map_voxel_slabs(tx, geometry, chunk=500,
                                                        network_order=True)])
    assert c_order.shape == (*geometry.shape, 3)
    assert torch.allclose(network.permute(2, 1, 0, 3), c_order, atol=1e-9)
    ijk = np.array([[3, 4, 5], [10, 2, 7], [0, 0, 0]])
    expected = tx.map_points(geometry.voxel_to_world(ijk.astype(float)))
    assert np.allclose(c_order[tuple(ijk.T)].numpy(), expected, atol=1e-6)
    moved = torch.cat([p for _, p in map_voxel_slabs(tx, geometry, displacement=True)])
    world = geometry.voxel_to_world(np.stack(np.indices(geometry.shape), -1).astype(float))
    assert np.allclose(moved.numpy(), c_order.numpy() - world, atol=1e-9)


def _trilinear(data, vox):
    """Reference trilinear interpolation at voxel indices (ITK's half-voxel edge rule)."""
    shape = np.asarray(data.shape[:3])
    out = np.zeros((len(vox), *data.shape[3:]))
    for n, point in enumerate(vox):
        if np.any(point < -0.5) or np.any(point >= shape - 0.5):
            continue
        point = np.clip(point, 0, shape - 1)
        low = np.minimum(np.floor(point).astype(int), np.maximum(shape - 2, 0))
        frac = point - low
        for corner in np.ndindex(2, 2, 2):
            index = np.minimum(low + corner, shape - 1)
            weight = np.prod(np.where(corner, frac, 1 - frac))
            out[n] += weight * data[tuple(index)]
    return out


def test_linear_warp_matches_direct_interpolation(geometry):
    rng = np.random.default_rng(3)
    data = rng.random((*geometry.shape, 2)).astype(np.float32)  # two channels
    chain = compose(_grid_transform(geometry), AffineTransform(np.diag([1.05, 0.95, 1.0, 1.0])))
    for transform in (_grid_transform(geometry), chain):
        out = warp_array(data, geometry, transform, geometry, fill=-1.0)
        ijk = np.stack(np.unravel_index(rng.choice(out[..., 0].size, 300), geometry.shape), -1)
        moved = transform.map_points(geometry.voxel_to_world(ijk.astype(float)))
        expected = _trilinear(data, geometry.world_to_voxel(moved))
        outside = np.all(expected == 0, axis=-1)
        expected[outside] = -1.0
        assert np.allclose(out[tuple(ijk.T)], expected, atol=1e-4)


def test_linear_warp_of_a_single_slice_keeps_it():
    geom = Geometry((10, 8, 1), np.diag([1.0, 1.0, 3.0, 1.0]))
    data = np.arange(80, dtype=np.float32).reshape(10, 8, 1)
    out = warp_array(data, geom, AffineTransform.identity(), geom)
    assert np.allclose(out, data)
    moved = np.eye(4)
    moved[2, 3] = 1.6  # more than half a voxel (1.5 mm) out of the slab
    assert np.all(warp_array(data, geom, AffineTransform(moved), geom) == 0)
