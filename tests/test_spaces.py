"""Coordinate conventions: network grids, resampling, RAS/LPS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regpipe.spaces import (
    Geometry,
    apply_affine,
    from_network_tensor,
    identity_grid,
    network_grid,
    ras_to_lps,
    resample_volume,
    to_network_tensor,
)
from tests.conftest import make_affine


def test_ras_to_lps_flips_first_two_axes():
    assert np.allclose(ras_to_lps(np.array([1.0, 2.0, 3.0])), [-1.0, -2.0, 3.0])


def test_network_tensor_round_trip_reverses_axes():
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    tensor = to_network_tensor(data)
    assert tensor.shape == (1, 1, 4, 3, 2)
    assert tensor[0, 0, 3, 2, 1] == data[1, 2, 3]
    assert np.array_equal(from_network_tensor(tensor), data)


def test_identity_grid_matches_float64_rounding():
    grid = identity_grid((5, 7, 9))
    expected = (np.arange(9, dtype=np.float64) / 8).astype(np.float32)
    assert grid.shape == (1, 3, 5, 7, 9)
    assert np.array_equal(grid[0, 2, 0, 0].numpy(), expected)


def test_squash_grid_corners_follow_align_corners_false():
    geom = Geometry((40, 30, 20), make_affine("oblique", (40, 30, 20)))
    grid = network_grid(geom, (10, 15, 20), "squash")
    voxel = geom.world_to_voxel(apply_affine(grid, np.array([0.0, 0.0, 0.0])))
    # network (d0, d1, d2) = (k, j, i); voxel = (N / n) (x + 1/2) - 1/2
    assert np.allclose(voxel, [40 / 20 * 0.5 - 0.5, 30 / 15 * 0.5 - 0.5, 20 / 10 * 0.5 - 0.5])


def test_squash_resample_equals_trilinear_interpolate():
    rng = np.random.default_rng(0)
    geom = Geometry((20, 16, 12), make_affine("LIA", (20, 16, 12)))
    data = rng.random(geom.shape).astype(np.float32)
    shape = (9, 11, 13)
    grid = network_grid(geom, shape, "squash")
    ours = resample_volume(to_network_tensor(data), geom, grid, shape, padding="border")
    ref = F.interpolate(to_network_tensor(data), size=shape, mode="trilinear", align_corners=False)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["RAS", "LPS", "LIA", "oblique", "anisotropic"])
def test_isotropic_grid_is_isotropic_and_centred(kind):
    geom = Geometry((24, 20, 16), make_affine(kind))
    grid = network_grid(geom, (32, 32, 32), "isotropic")
    spacings = np.linalg.norm(grid[:3, :3], axis=0)
    assert np.allclose(spacings, spacings[0])
    centre = apply_affine(grid, np.array([15.5, 15.5, 15.5]))
    assert np.allclose(centre, geom.center_world(), atol=1e-6)
    # the longest physical side fits the grid exactly
    extent = np.max(np.asarray(geom.shape) * geom.spacing)
    assert np.isclose(spacings[0] * 32, extent)


def test_isotropic_grid_of_another_shape_is_isotropic_and_covers_the_image():
    """A grid that is no cube (a slab's own voxel grid): one spacing, every axis fits."""
    slab = Geometry((64, 64, 12), np.diag([2.0, 2.0, 2.0, 1.0]))  # 128 x 128 x 24 mm
    grid = network_grid(slab, (12, 64, 64), "isotropic")  # network order: (S, A, R)
    spacings = np.linalg.norm(grid[:3, :3], axis=0)
    np.testing.assert_allclose(spacings, 2.0)  # not 128 mm / 12 along the slab
    corners = apply_affine(grid, np.array([[0.0, 0, 0], [11, 63, 63]]))
    np.testing.assert_allclose(slab.world_to_voxel(corners), [[0, 0, 0], [63, 63, 11]],
                               atol=1e-9)


def test_isotropic_grid_is_close_to_ras_orientation():
    geom = Geometry((24, 20, 16), make_affine("LIA"))
    grid = network_grid(geom, (16, 16, 16), "isotropic")
    # network axis d2 (fastest) should point along +R, d0 along +S
    directions = grid[:3, :3] / np.linalg.norm(grid[:3, :3], axis=0)
    assert np.argmax(np.abs(directions[:, 2])) == 0 and directions[0, 2] > 0
    assert np.argmax(np.abs(directions[:, 0])) == 2 and directions[2, 0] > 0


def test_resample_volume_world_consistency():
    """Sampling through a pure translation in world shifts content by that many mm."""
    geom = Geometry((20, 20, 20), np.diag([2.0, 2.0, 2.0, 1.0]))
    data = np.zeros(geom.shape, np.float32)
    data[10, 10, 10] = 1.0
    shift = np.eye(4)
    shift[:3, 3] = [4.0, 0.0, 0.0]  # target point x samples source at x + 4 mm
    target = shift @ geom.network_to_world()
    out = from_network_tensor(resample_volume(to_network_tensor(data), geom, target, (20, 20, 20)))
    assert out[8, 10, 10] == pytest.approx(1.0)


def test_sampling_at_the_index_grid_is_the_identity_and_shifts_by_whole_voxels():
    from regpipe.spaces import index_grid, sample_at_indices

    volume = torch.rand(1, 2, 5, 6, 7)
    identity = index_grid((5, 6, 7))
    assert identity.shape == (1, 3, 5, 6, 7) and float(identity[0, 1, 0, 4, 0]) == 4.0
    torch.testing.assert_close(sample_at_indices(volume, identity), volume)
    shifted = identity + torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(sample_at_indices(volume, shifted)[..., :-1], volume[..., 1:])
    # one voxel beyond the last centre: zero with zero padding, the edge value with border
    assert float(sample_at_indices(volume, shifted, padding="zeros")[..., -1].abs().max()) == 0.0
    torch.testing.assert_close(sample_at_indices(volume, shifted)[..., -1], volume[..., -1])


def test_sampling_identity_is_the_index_grid_in_grid_sample_coordinates():
    from regpipe.spaces import index_grid, index_to_sampling_grid, sampling_identity

    shape = (5, 6, 7)
    direct = sampling_identity(shape)
    assert direct.shape == (1, 5, 6, 7, 3)
    via_indices = index_to_sampling_grid(index_grid(shape).permute(0, 2, 3, 4, 1).flip(-1),
                                         shape[::-1])
    torch.testing.assert_close(direct, via_indices)
    volume = torch.rand(1, 1, *shape)
    torch.testing.assert_close(
        torch.nn.functional.grid_sample(volume, direct, align_corners=True), volume)


def test_an_isotropic_own_grid_covers_a_thick_slice_image_at_its_finest_spacing():
    """The instance optimisation's own grid in isotropic mode: one spacing (the finest voxel
    size, coarser when capped) and as many grid voxels per axis as the extent needs."""
    from regpipe.registration import _own_grid_shape

    image = Geometry((256, 256, 30), np.diag([1.0, 1.0, 5.0, 1.0]))
    shape = _own_grid_shape(image, "isotropic", 160)
    assert shape == (94, 160, 160)  # network order: 150 mm of slices at 1.6 mm
    grid = network_grid(image, shape, "isotropic")
    np.testing.assert_allclose(np.linalg.norm(grid[:3, :3], axis=0), 1.6)
    corners = apply_affine(grid, np.array([[0.0, 0, 0], [93, 159, 159]]))
    index = image.world_to_voxel(corners)
    assert (index[0] >= -0.5).all() and (index[1] <= np.array(image.shape) - 0.5).all()
