"""Moving a network displacement onto the finer grid of instance optimisation."""

from __future__ import annotations

import numpy as np
import torch

from regpipe.registration import _displacement_on_grid
from regpipe.spaces import Geometry, network_grid
from regpipe.transforms import AffineTransform, GridTransform


def _smooth_field(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, 4, 4, 4), generator=g) * 0.5
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear",
                                           align_corners=True)


def test_same_map_on_a_finer_grid():
    affine = np.array([[0, 0, -1.2, 80], [1.0, 0, 0, -90], [0, 0.9, 0, -70], [0, 0, 0, 1]])
    geometry = Geometry((90, 100, 80), affine)
    pre = AffineTransform(np.array([[1, 0.05, 0, 3], [0, 0.98, 0, -2], [0, 0, 1.02, 1],
                                    [0, 0, 0, 1]]))
    for mode in ("squash", "isotropic"):
        coarse_shape, fine_shape = (24, 28, 26), (60, 70, 64)
        grid = network_grid(geometry, coarse_shape, mode)
        fine = network_grid(geometry, fine_shape, mode)
        field = _smooth_field(coarse_shape)
        moved = _displacement_on_grid(field, grid, fine, fine_shape)
        assert moved.shape == (1, 3, *fine_shape)
        before = GridTransform(grid, field[0], pre.matrix @ grid)
        after = GridTransform(fine, moved[0], pre.matrix @ fine)
        rng = np.random.default_rng(0)
        centre = geometry.voxel_to_world(np.array(geometry.shape) / 2)
        points = centre + rng.uniform(-25, 25, size=(200, 3))
        error = np.abs(before.map_points(points) - after.map_points(points)).max()
        # mm, for displacements of several mm (trilinear resampling)
        assert error < 0.1, (mode, error)


def test_identity_stays_identity():
    geometry = Geometry((40, 40, 40), np.eye(4))
    grid = network_grid(geometry, (20, 20, 20), "squash")
    fine = network_grid(geometry, (40, 40, 40), "squash")
    zero = torch.zeros((1, 3, 20, 20, 20))
    assert torch.count_nonzero(_displacement_on_grid(zero, grid, fine, (40, 40, 40))) == 0
