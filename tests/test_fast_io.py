"""Tests of the fast CPU instance optimisation (:mod:`regpipe.fast_io`), small synthetic
volumes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.fast_io import FastIOSettings, lncc, optimise_displacement
from regpipe.io_level import Level, box_mean

SHAPE = (36, 40, 36)


def _index_grid(shape: tuple[int, ...]) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))  # [3, n0, n1, n2]


def _blobs(points: torch.Tensor) -> torch.Tensor:
    """A tissue-like image in [0, 1], evaluated analytically at index points ``[3, ...]``.

    150 seeded Gaussian blobs (sigma 1.5-3 voxels) inside an ellipsoid, passed through a steep
    sigmoid so that it has sharp edges between bright and dark regions (smooth blobs alone
    leave LNCC nearly blind to shifts), zero outside.
    """
    generator = torch.Generator().manual_seed(0)
    centre = torch.tensor([(n - 1) / 2 for n in SHAPE], dtype=torch.float64)
    radius = torch.tensor([0.3 * n for n in SHAPE], dtype=torch.float64)
    image = torch.zeros(points.shape[1:], dtype=torch.float64)
    count = 0
    while count < 150:
        unit = torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1
        if unit.norm() > 1:
            continue
        count += 1
        c = centre + unit * radius
        sigma = 1.5 + 1.5 * float(torch.rand(1, generator=generator))
        weight = 0.3 + 0.7 * float(torch.rand(1, generator=generator))
        d2 = sum((points[a] - c[a]) ** 2 for a in range(3))
        image += weight * torch.exp(-d2 / (2 * sigma**2))
    image = image / image.max()
    return torch.sigmoid((image - 0.3) * 15) * (image > 0.02)


def _true_displacement(shape: tuple[int, ...], amplitude: float = 2.0) -> torch.Tensor:
    """A smooth fold-free displacement ``[3, n0, n1, n2]`` in index units."""
    g = _index_grid(shape)
    phase = [2 * math.pi * g[a] / shape[a] for a in range(3)]
    return torch.stack([
        amplitude * torch.sin(phase[1]) * torch.cos(phase[2]),
        amplitude * torch.sin(phase[2] + 0.5) * torch.cos(phase[0]),
        amplitude * torch.sin(phase[0] + 1.0) * torch.cos(phase[1]),
    ])


@pytest.fixture(scope="module")
def pair() -> dict[str, torch.Tensor]:
    """``fixed(g) = moving(g + u(g))`` for a known smooth ``u``; both in [0, 1]."""
    grid = _index_grid(SHAPE)
    u = _true_displacement(SHAPE)
    moving = _blobs(grid)
    fixed = _blobs(grid + u)
    return {
        "moving": moving[None, None].float(),
        "fixed": fixed[None, None].float(),
        "u": u[None].float(),
    }


def _warp(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``image(g + U(g))`` for index-unit ``U``, zeros outside."""
    sizes = torch.tensor(image.shape[2:], dtype=torch.float32)
    points = _index_grid(tuple(image.shape[2:])).float()[None] + displacement
    grid = (points * (2 / (sizes - 1)).view(1, 3, 1, 1, 1) - 1).permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(image, grid, align_corners=True)


def _min_jacobian(displacement: torch.Tensor) -> float:
    """Smallest determinant of ``I + dU/dg`` (central differences, interior)."""
    d = displacement[0].double()
    grads = torch.stack([torch.stack(torch.gradient(d[c])) for c in range(3)])  # [c, a, ...]
    jac = grads + torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1, 1)
    det = torch.linalg.det(jac.permute(2, 3, 4, 0, 1))
    return float(det[2:-2, 2:-2, 2:-2].min())


def _zeros() -> torch.Tensor:
    return torch.zeros((1, 3, *SHAPE))


def _run(pair: dict, displacement: torch.Tensor | None = None, steps: int = 30, **kwargs):
    return optimise_displacement(
        pair["moving"], pair["fixed"], _zeros() if displacement is None else displacement,
        steps=steps, grid_spacing_mm=1.0, progress=False, **kwargs,
    )


def _textured(pair: dict) -> torch.Tensor:
    """Where the fixed image has content (displacements are only observable there)."""
    return pair["fixed"] > 0.1


def _error(displacement: torch.Tensor, pair: dict) -> float:
    """Mean distance (voxels) to the true displacement over the textured region."""
    return float((displacement - pair["u"]).norm(dim=1)[_textured(pair)[:, 0]].mean())


def test_recovers_known_smooth_deformation(pair):
    result = _run(pair)
    region = _textured(pair)
    before = lncc(pair["moving"], pair["fixed"], mask=region)
    after = lncc(_warp(pair["moving"], result), pair["fixed"], mask=region)
    assert after > before + 0.1
    assert after > 0.97
    assert _error(result, pair) < 0.6 * _error(torch.zeros_like(result), pair)
    assert _min_jacobian(result) > 0.3


def test_returns_same_shape_and_dtype(pair):
    result = _run(pair, steps=2)
    assert result.shape == (1, 3, *SHAPE)
    assert result.dtype == torch.float32
    result64 = _run(pair, _zeros().double(), steps=2)
    assert result64.dtype == torch.float64


def test_zero_steps_returns_input(pair):
    start = 0.3 * pair["u"]
    result = _run(pair, start, steps=0)
    assert torch.equal(result, start)
    assert result is not start


def test_deterministic(pair):
    first = _run(pair, steps=8)
    second = _run(pair, steps=8)
    assert torch.equal(first, second)


def test_refines_network_displacement(pair):
    start = 0.5 * pair["u"]
    result = _run(pair, start, steps=20)
    assert _error(result, pair) < 0.6 * _error(start, pair)
    region = _textured(pair)
    assert lncc(_warp(pair["moving"], result), pair["fixed"], mask=region) > lncc(
        _warp(pair["moving"], start), pair["fixed"], mask=region
    )


def test_keeps_an_exact_start(pair):
    result = _run(pair, pair["u"], steps=20)
    assert _error(result, pair) < 0.15


def test_respects_fixed_mask(pair):
    # The images agree where d1 < 20 and differ by a smooth deformation where d1 > 24; with a
    # mask on d1 < 14 there is nothing to correct, without it the far region is corrected.
    grid = _index_grid(SHAPE)
    ramp = ((grid[1] - 20) / 8).clamp(0, 1)
    u = _true_displacement(SHAPE) * ramp
    moving = pair["moving"]
    fixed = _blobs(grid + u)[None, None].float()
    mask = torch.zeros((1, 1, *SHAPE))
    mask[:, :, :, :14] = 1
    kwargs = {"steps": 30, "grid_spacing_mm": 1.0, "progress": False, "level_steps": (1.0, 1.0)}
    masked = optimise_displacement(moving, fixed, _zeros(), fixed_mask=mask, **kwargs)
    free = optimise_displacement(moving, fixed, _zeros(), **kwargs)
    assert masked.abs().max() < 0.3
    far = (fixed > 0.1)[0, 0]
    far[:, :28] = False
    truth = u[None].float()
    error_before = truth.norm(dim=1)[0][far].mean()
    assert (free - truth).norm(dim=1)[0][far].mean() < 0.6 * error_before


@pytest.mark.parametrize("velocity", [True, False])
def test_both_parametrisations_improve_without_folding(pair, velocity):
    result = _run(pair, steps=20, velocity=velocity)
    assert _min_jacobian(result) > 0
    assert _error(result, pair) < 0.7 * _error(torch.zeros_like(result), pair)


def test_more_steps_match_better(pair):
    assert _error(_run(pair, steps=25), pair) < 0.8 * _error(_run(pair, steps=2), pair)


@pytest.mark.parametrize(("level_steps", "mean", "largest"), [
    ((1.0, 1.0), 0.05, 0.15),  # many fine-level iterations: the regulariser holds it still
    (None, 0.15, 0.4),  # the default budget (mostly coarse iterations) drifts a little more
])
def test_identical_images_stay_still(pair, level_steps, mean, largest):
    tuning = {} if level_steps is None else {"level_steps": level_steps}
    result = optimise_displacement(
        pair["fixed"], pair["fixed"], _zeros(), steps=30, grid_spacing_mm=1.0, progress=False,
        **tuning,
    )
    drift = result.norm(dim=1)[_textured(pair)[:, 0]]  # voxels, where the image has content
    assert float(drift.mean()) < mean and float(drift.max()) < largest


@pytest.mark.parametrize(
    "change",
    [
        {"displacement": torch.zeros((1, 3, 4, 4, 4))},
        {"moving_t": torch.zeros((1, 1, 4, 4, 4))},
        {"steps": -1},
        {"steps": 2.5},
        {"fixed_mask": torch.zeros((1, 1, *SHAPE))},
        {"grid_spacing_mm": 0.0},
        {"not_an_option": 1},
        {"window_mm": -1.0},
        {"image_scales": (2.0, 1.0), "control_spacings": (2.0,)},
    ],
)
def test_invalid_inputs_raise_input_error(pair, change):
    kwargs = {
        "moving_t": pair["moving"], "fixed_t": pair["fixed"], "displacement": _zeros(), "steps": 2,
        "grid_spacing_mm": 1.0, "progress": False,
    }
    kwargs.update(change)
    with pytest.raises(InputError):
        optimise_displacement(**kwargs)


def test_settings_reject_unknown_names():
    with pytest.raises(InputError, match="unknown"):
        FastIOSettings.from_options({"windw_mm": 3})


@pytest.mark.parametrize("window", [3, 5, 9])
def test_box_filter_matches_average_pooling(window):
    volume = torch.rand((1, 2, 9, 11, 13), dtype=torch.float64)
    expected = F.avg_pool3d(volume, window, stride=1, padding=window // 2, count_include_pad=True)
    torch.testing.assert_close(box_mean(volume, window), expected)


@pytest.mark.parametrize("masked", [False, True])
def test_analytic_lncc_gradient_matches_autograd(masked):
    generator = torch.Generator().manual_seed(1)
    shape = (7, 8, 9)
    fixed = torch.rand((1, 1, *shape), generator=generator, dtype=torch.float64)
    warped = torch.rand((1, 1, *shape), generator=generator, dtype=torch.float64)
    mask = (torch.rand((1, 1, *shape), generator=generator) > 0.5).double() if masked else None
    settings = FastIOSettings(window_mm=5.0)
    level = Level.build(warped, fixed, mask, shape, torch.ones(3), 1.0, settings)
    warped.requires_grad_(True)
    value, _ = level.similarity(warped)
    (expected,) = torch.autograd.grad(value, warped)
    with torch.no_grad():
        _, stats = level.similarity(warped)
        analytic = level.similarity_gradient(warped, *stats)
    torch.testing.assert_close(analytic, expected)


def test_lncc_of_identical_images_is_one_in_the_foreground(pair):
    mask = pair["fixed"] > 0.1
    assert lncc(pair["fixed"], pair["fixed"], mask=mask) == pytest.approx(1.0, abs=0.02)
