"""Jacobian determinants, folding statistics, NCC and Dice."""

from __future__ import annotations

import numpy as np
import pytest

from regpipe.metrics import dice_per_label, folding_stats, jacobian_determinant, ncc
from regpipe.spaces import Geometry
from regpipe.transforms import AffineTransform, DisplacementField
from tests.conftest import make_affine


@pytest.mark.parametrize("kind", ["RAS", "LPS", "oblique", "anisotropic"])
def test_jacobian_of_affine_is_its_determinant(kind):
    geometry = Geometry((12, 10, 8), make_affine(kind, (12, 10, 8)))
    matrix = np.eye(4)
    matrix[:3, :3] = [[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.1]]
    matrix[:3, 3] = [3.0, -2.0, 1.0]
    field = DisplacementField.from_transform(AffineTransform(matrix), geometry)
    jac = jacobian_determinant(field)
    assert np.allclose(jac, np.linalg.det(matrix[:3, :3]), atol=1e-4)


@pytest.mark.parametrize("slab_voxels", [10**9, 99, 1])  # one slab, slabs of 1 and 1 plane
def test_jacobian_in_slabs_equals_whole_volume_differences(monkeypatch, slab_voxels):
    monkeypatch.setattr("regpipe.metrics._SLAB_VOXELS", slab_voxels)
    shape = (7, 9, 11)
    geometry = Geometry(shape, make_affine("oblique", shape))
    rng = np.random.default_rng(2)
    field = DisplacementField(geometry, rng.normal(0, 0.4, (*shape, 3)).astype(np.float32))
    # reference: np.gradient over the whole volume, chain rule through the affine
    grads = np.stack([np.gradient(field.field.astype(np.float64), axis=a) for a in range(3)], -1)
    expected = np.linalg.det(grads @ np.linalg.inv(geometry.affine[:3, :3]) + np.eye(3))
    assert np.allclose(jacobian_determinant(field), expected, atol=1e-4)


def test_jacobian_needs_two_voxels_per_axis():
    geometry = Geometry((5, 1, 4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 voxels"):
        jacobian_determinant(DisplacementField(geometry, np.zeros((5, 1, 4, 3), np.float32)))


def test_folding_detected():
    jac = np.ones((10, 10, 10), np.float32)
    jac[0, 0, :5] = -0.5
    stats = folding_stats(jac)
    assert stats["folding_percent"] == pytest.approx(0.5)
    assert stats["sd_log_jacobian"] == pytest.approx(0.0)
    assert stats["min_jacobian"] == pytest.approx(-0.5)


def test_folding_stats_respect_mask():
    jac = np.ones((4, 4, 4), np.float32)
    jac[0] = -1
    mask = np.zeros((4, 4, 4), bool)
    mask[1:] = True
    assert folding_stats(jac, mask)["folding_percent"] == 0.0


def test_ncc_bounds():
    a = np.random.default_rng(0).random((5, 5, 5))
    assert ncc(a, 2 * a + 1) == pytest.approx(1.0)
    assert ncc(a, -a) == pytest.approx(-1.0)
    inside = a > 0.5  # a binary image is constant inside its own foreground: undefined there
    assert np.isnan(ncc(inside.astype(float), a, inside))


def test_dice_per_label():
    a = np.zeros((4, 4, 4), int)
    b = np.zeros((4, 4, 4), int)
    a[:2], b[:1] = 1, 1
    a[3, 3, 3] = 7
    scores = dice_per_label(a, b)
    assert scores[1] == pytest.approx(2 * 16 / (32 + 16))
    assert scores[7] == 0.0
