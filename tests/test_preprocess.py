"""Intensity normalisation (uniGradICON's formulas) and network inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regpipe.errors import InputError
from regpipe.preprocess import check_modality, network_input, normalize_intensity
from regpipe.spaces import Geometry, network_grid


def test_ct_is_clipped_and_scaled_by_the_window():
    data = np.array([-3000, -1000, 0, 500, 1000, 4000], np.float32).reshape(1, 2, 3)
    out = normalize_intensity(data, "ct")
    assert np.allclose(out.ravel(), [0, 0, 0.5, 0.75, 1, 1])
    # by the window, not by the clipped image's own range (uniGradICON 1.0.6's preprocess)
    soft_tissue = np.array([-200, 0, 400], np.float32).reshape(1, 1, 3)
    assert np.allclose(normalize_intensity(soft_tissue, "ct").ravel(), [0.4, 0.5, 0.7])
    assert np.allclose(normalize_intensity(soft_tissue, "ct", ct_window=(-400, 600)).ravel(),
                       [0.2, 0.4, 0.8])
    with pytest.raises(InputError, match="constant inside the CT window"):
        normalize_intensity(np.full((2, 2, 2), -1500, np.float32), "ct")


def test_mri_uses_kth_smallest_as_upper_bound():
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = normalize_intensity(data, "mri")
    # k = floor(0.99 * 1000) = 990 -> value 989 (1-indexed k-th smallest)
    assert out.max() == 1.0 and out.ravel()[989] == 1.0
    assert out.ravel()[988] == pytest.approx(988 / 989)


def test_mask_zeroes_outside():
    data = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32) + 1
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[:2] = 3
    out = normalize_intensity(data, "mri", mask=mask)
    assert np.all(out[2:] == 0) and np.any(out[:2] > 0)


def test_unknown_modality():
    with pytest.raises(InputError, match="unknown modality"):
        check_modality("pet")


def test_bad_quantiles():
    with pytest.raises(InputError, match="quantile"):
        normalize_intensity(np.random.rand(3, 3, 3), "mri", quantile_range=(0.5, 0.2))


def test_squash_input_is_exactly_interpolate():
    geometry = Geometry((20, 18, 16), np.diag([1.0, 1.2, 2.0, 1.0]))
    data = np.random.default_rng(1).random(geometry.shape).astype(np.float32)
    grid = network_grid(geometry, (17, 17, 17), "squash")
    ours = network_input(data, geometry, grid, (17, 17, 17), squash=True)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(data.transpose(2, 1, 0).copy())[None, None], size=(17, 17, 17),
        mode="trilinear", align_corners=False,
    )
    assert torch.equal(ours, ref)


def test_squashed_masks_sit_where_the_squashed_image_does():
    """Nearest neighbour picks the voxel the trilinear resize centres on: a two-voxel mark
    at 256 lands on the same grid voxel in both (uniGradICON's mode="nearest" samples voxel
    4 d, half a grid voxel off at 256 -> 64, and missed it)."""
    geometry = Geometry((8, 8, 256), np.eye(4))
    mark = np.zeros(geometry.shape, np.float32)
    mark[:, :, 130:132] = 1.0  # grid voxel 32 of 64 is centred at 129.5 of 256
    grid = network_grid(geometry, (64, 8, 8), "squash")
    linear = network_input(mark, geometry, grid, (64, 8, 8), squash=True)[0, 0, :, 4, 4]
    nearest = network_input(mark, geometry, grid, (64, 8, 8), squash=True,
                            nearest=True)[0, 0, :, 4, 4]
    assert int(torch.argmax(linear)) == int(torch.argmax(nearest)) == 32
    assert float(nearest.max()) == 1.0


def test_an_outlying_minimum_is_found_and_warned_about(caplog):
    import logging

    import regpipe
    from regpipe.imageio import Image
    from regpipe.preprocess import outlying_minimum

    rng = np.random.default_rng(0)
    head = np.zeros((30, 30, 30), np.float32)
    head[5:25, 5:25, 5:25] = rng.uniform(200, 1000, (20, 20, 20))
    head += rng.normal(0, 5, head.shape).astype(np.float32)  # background noise below 0
    assert outlying_minimum(head) is None
    padded = head.copy()
    padded[0, 0, 0] = -32768.0  # a scanner's padding value
    minimum, low = outlying_minimum(padded)
    assert minimum == -32768.0 and -50 < low < 0
    slab = head.copy()
    slab[:, :, :2] = -32768.0  # padding in whole slices (7 % of the voxels)
    assert outlying_minimum(slab)[0] == -32768.0
    assert outlying_minimum(np.where(head > 0, head, 0)) is None  # a zero background is fine

    geometry = Geometry(head.shape, np.eye(4))
    with caplog.at_level(logging.WARNING, logger="regpipe"):
        regpipe.register(Image(head, geometry), Image(padded, geometry), weights=None,
                         io_iterations=0, affine="none", evaluate=False, progress=False)
    assert "moving image <in-memory image>: its minimum (-32768)" in caplog.text
    assert "fixed image" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="regpipe"):  # scaled from a quantile: no issue
        regpipe.register(Image(head, geometry), Image(padded, geometry), weights=None,
                         io_iterations=0, affine="none", evaluate=False, progress=False,
                         quantile_range=(0.001, 0.99))
    assert "its minimum" not in caplog.text
