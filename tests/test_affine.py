"""Affine pre-alignment on a synthetic head phantom with known fixed -> moving transforms."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from regpipe.affine import affine_register
from regpipe.ants_affine import ants_affine_register
from regpipe.errors import InputError
from regpipe.spaces import Geometry, apply_affine

#: Soft ellipsoids (centre mm, radii mm, added intensity): scalp, brain, two unequal ventricles,
#: asymmetric blobs and a nose, so that every rotation axis is identifiable.
HEAD = [
    ((0, 0, 0), (72, 92, 80), 0.35),
    ((0, 2, 6), (62, 80, 66), 0.45),
    ((8, 4, 12), (6, 22, 9), -0.5),
    ((-7, 2, 12), (4, 16, 7), -0.45),
    ((30, 35, 25), (13, 11, 9), 0.4),
    ((-28, -42, -8), (9, 14, 8), 0.3),
    ((5, -60, 30), (10, 6, 12), -0.2),
    ((0, 75, -30), (18, 12, 14), 0.25),
]
NECK = ((0, -15, -110), (32, 35, 50), 0.4)


def phantom(points: NDArray[np.float64], neck: bool = False) -> NDArray[np.float32]:
    """Phantom intensity at RAS mm points ``[..., 3]``: soft ellipsoids plus a mild texture
    (which mutual information, unlike the plateaus alone, can lock on to)."""
    out = np.zeros(points.shape[:-1])
    for centre, radii, value in HEAD + ([NECK] if neck else []):
        distance = np.linalg.norm((points - np.asarray(centre)) / np.asarray(radii), axis=-1)
        out += value / (1 + np.exp((distance - 1) * min(radii) / 1.5))
    x, y, z = np.moveaxis(points, -1, 0)
    texture = 0.08 * np.sin(x / 6.0 + 1.0) * np.sin(y / 7.0) * np.sin(z / 5.0 + 2.0)
    return (out + texture * (out > 0.3)).astype(np.float32)


def grid(
    spacing: float | tuple[float, float, float],
    extent: tuple[float, float, float],
    *,
    direction: NDArray[np.float64] | None = None,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Geometry:
    """A grid of ``extent`` mm centred on ``centre`` with voxel axes ``direction`` (columns)."""
    sizes = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    shape = np.ceil(np.asarray(extent) / sizes).astype(int)
    linear = (np.eye(3) if direction is None else direction) @ np.diag(sizes)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre) - linear @ ((shape - 1) / 2)
    return Geometry(tuple(int(n) for n in shape), affine)  # type: ignore[arg-type]


def world(geometry: Geometry) -> NDArray[np.float64]:
    """RAS mm positions ``[X, Y, Z, 3]`` of every voxel."""
    return geometry.voxel_to_world(np.indices(geometry.shape).transpose(1, 2, 3, 0))


def render(geometry: Geometry, truth: NDArray[np.float64], neck: bool = False) -> NDArray:
    """The phantom seen through ``truth`` (fixed -> moving): ``image(truth(x)) = phantom(x)``."""
    return phantom(apply_affine(np.linalg.inv(truth), world(geometry)), neck=neck)


def rotation(degrees: tuple[float, float, float]) -> NDArray[np.float64]:
    """Rotations about x, then y, then z (degrees)."""
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [(1, 2), (0, 2), (0, 1)][axis]
        step = np.eye(3)
        step[i, i] = step[j, j] = c
        step[i, j], step[j, i] = -s, s
        out = step @ out
    return out


def affine(
    degrees: tuple[float, float, float],
    shift: tuple[float, float, float],
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    shear: float = 0.0,
) -> NDArray[np.float64]:
    matrix = np.eye(4)
    matrix[:3, :3] = (
        rotation(degrees) @ np.diag(scales) @ np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    )
    matrix[:3, 3] = shift
    return matrix


#: A large fixed -> moving affine: 30 mm, about 15 degrees, 4-6 % scaling, mild shear.
TRUTH = affine((12.0, -9.0, 10.0), (18.0, -20.0, 15.0), (1.05, 0.95, 1.04), 0.04)
RIGID = affine((-15.0, 6.0, 4.0), (-12.0, 25.0, -8.0))
FIXED = grid(2.0, (160.0, 200.0, 176.0))
LPS = np.diag([-1.0, -1.0, 1.0])
MOVING_GRIDS = {
    "same": FIXED,
    "lps-anisotropic": grid((2.0, 2.5, 3.0), (180.0, 220.0, 200.0), direction=LPS),
    "oblique": grid(
        (2.4, 2.0, 2.2),
        (200.0, 220.0, 200.0),
        direction=rotation((20, -10, 25)),
        centre=(5, -8, 10),
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these small problems gain nothing from more, and lose a lot when
    the CPU is shared (OpenMP workers spin while waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixed() -> NDArray[np.float32]:
    return render(FIXED, np.eye(4))


def errors(matrix: NDArray, truth: NDArray, geometry: Geometry, image: NDArray) -> NDArray:
    """Distances (mm) between estimated and true mapped points over the object."""
    points = geometry.voxel_to_world(np.argwhere(image > 0.2)[::5].astype(np.float64))
    return np.linalg.norm(apply_affine(matrix, points) - apply_affine(truth, points), axis=-1)


@pytest.mark.parametrize("name", sorted(MOVING_GRIDS))
def test_recovers_affine(fixed: NDArray, name: str) -> None:
    moving_grid = MOVING_GRIDS[name]
    result = affine_register(fixed, FIXED, render(moving_grid, TRUTH), moving_grid)
    distance = errors(result.matrix, TRUTH, FIXED, fixed)
    assert distance.mean() < 0.5 and distance.max() < 1.0


def test_rigid_result_is_a_rotation(fixed: NDArray) -> None:
    moving_grid = MOVING_GRIDS["lps-anisotropic"]
    result = affine_register(fixed, FIXED, render(moving_grid, RIGID), moving_grid, dof=6)
    linear = result.matrix[:3, :3]
    np.testing.assert_allclose(linear.T @ linear, np.eye(3), atol=1e-6)
    assert np.linalg.det(linear) == pytest.approx(1.0)
    assert errors(result.matrix, RIGID, FIXED, fixed).max() < 1.0


@pytest.mark.parametrize("dof", [7, 9])
def test_constrained_dof_has_no_shear(fixed: NDArray, dof: int) -> None:
    truth = affine((5.0, -8.0, 6.0), (10.0, -6.0, 4.0), (1.04, 1.04, 1.04))
    result = affine_register(fixed, FIXED, render(FIXED, truth), FIXED, dof=dof)
    gram = result.matrix[:3, :3].T @ result.matrix[:3, :3]
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-6)
    if dof == 7:
        np.testing.assert_allclose(np.diag(gram), gram[0, 0], rtol=1e-6)
    assert errors(result.matrix, truth, FIXED, fixed).max() < 1.0


def test_different_field_of_view() -> None:
    """Fixed: head and neck; moving: a field of view that cuts the head above the neck."""
    fixed_grid = grid(2.0, (160.0, 200.0, 260.0), centre=(0.0, 0.0, -40.0))
    fixed = render(fixed_grid, np.eye(4), neck=True)
    moving_grid = grid((2.0, 2.0, 2.5), (200.0, 220.0, 170.0), direction=LPS, centre=(15, -20, 35))
    moving = render(moving_grid, TRUTH, neck=True)
    result = affine_register(fixed, fixed_grid, moving, moving_grid)
    head_only = render(fixed_grid, np.eye(4), neck=False)
    assert errors(result.matrix, TRUTH, fixed_grid, head_only).max() < 1.0


def test_intensity_ranges_and_masks(fixed: NDArray) -> None:
    """A CT-like range (-1000..2000) and masks that cut away a distracting moving structure."""
    moving_grid = MOVING_GRIDS["lps-anisotropic"]
    moving = render(moving_grid, TRUTH) * 3000.0 - 1000.0
    anatomy = apply_affine(np.linalg.inv(TRUTH), world(moving_grid))  # phantom coordinates
    outside = np.linalg.norm(anatomy / np.array([72, 92, 80]), axis=-1) > 1.05
    moving[outside & (anatomy[..., 2] < -40)] = 2000.0  # bright clutter below the head
    moving_mask = ~outside
    fixed_mask = fixed > 0.05
    result = affine_register(
        fixed, FIXED, moving, moving_grid, fixed_mask=fixed_mask, moving_mask=moving_mask
    )
    assert errors(result.matrix, TRUTH, FIXED, fixed).max() < 1.0


@pytest.mark.parametrize("init", ["geometry", "identity"])
def test_other_initialisations(fixed: NDArray, init: str) -> None:
    truth = affine((6.0, -4.0, 8.0), (8.0, -10.0, 6.0), (1.03, 0.97, 1.0))
    result = affine_register(fixed, FIXED, render(FIXED, truth), FIXED, init=init)  # type: ignore[arg-type]
    assert errors(result.matrix, truth, FIXED, fixed).max() < 1.0


def test_deterministic(fixed: NDArray) -> None:
    moving = render(MOVING_GRIDS["oblique"], TRUTH)
    first = affine_register(
        fixed, FIXED, moving, MOVING_GRIDS["oblique"], levels=(6.0,), iterations=(8,)
    )
    second = affine_register(
        fixed, FIXED, moving, MOVING_GRIDS["oblique"], levels=(6.0,), iterations=(8,)
    )
    np.testing.assert_array_equal(first.matrix, second.matrix)


def test_runs_under_no_grad(fixed: NDArray) -> None:
    """Callers often hold ``torch.no_grad()``; the optimisation must not depend on autograd."""
    truth = affine((4.0, 0.0, -5.0), (6.0, 3.0, -4.0))
    with torch.no_grad():
        moving = render(FIXED, truth)
        result = affine_register(
            fixed, FIXED, moving, FIXED, levels=(6.0, 3.0), iterations=(20, 10)
        )
    assert errors(result.matrix, truth, FIXED, fixed).max() < 1.0


def test_constant_image_raises(fixed: NDArray) -> None:
    with pytest.raises(InputError, match="constant"):
        affine_register(fixed, FIXED, np.full(FIXED.shape, 3.0), FIXED)
    with pytest.raises(InputError, match="constant"):
        ants_affine_register(np.zeros(FIXED.shape), FIXED, fixed, FIXED)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"moving": np.zeros((0, 4, 4))}, "empty"),
        ({"moving": np.ones((4, 4, 4))}, "shape"),
        ({"moving_mask": np.zeros(FIXED.shape)}, "moving_mask is empty"),
        ({"dof": 8}, "dof"),
        ({"levels": (4.0, -2.0), "iterations": (5, 5)}, "levels"),
        ({"levels": (4.0, 2.0), "iterations": (5,)}, "iterations"),
        ({"init": "centre"}, "init"),
    ],
)
def test_invalid_inputs_raise(fixed: NDArray, kwargs: dict, message: str) -> None:
    arguments = {"moving": fixed, **kwargs}
    moving = arguments.pop("moving")
    with pytest.raises(InputError, match=message):
        affine_register(fixed, FIXED, moving, FIXED, **arguments)


def test_ants_rejects_nine_dof(fixed: NDArray) -> None:
    with pytest.raises(InputError, match="dof"):
        ants_affine_register(fixed, FIXED, fixed, FIXED, dof=9)


def test_ants_affine_recovers_truth_in_ras() -> None:
    """ANTs' LPS ``.mat`` (fixed -> moving) becomes our RAS matrix; the seed changes nothing
    global."""
    fixed_grid = grid(4.0, (160.0, 200.0, 176.0))
    fixed = render(fixed_grid, np.eye(4))
    moving_grid = grid((4.0, 4.0, 4.5), (180.0, 220.0, 200.0), direction=LPS, centre=(8, -6, 4))
    truth = affine((8.0, -6.0, 7.0), (12.0, -10.0, 8.0), (1.04, 0.97, 1.02))
    threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    result = ants_affine_register(
        fixed,
        fixed_grid,
        render(moving_grid, truth),
        moving_grid,
        levels=(8.0, 4.0),
        iterations=(100, 50),
        seed=1,
    )
    distance = errors(result.matrix, truth, fixed_grid, fixed)
    assert distance.mean() < 1.0 and distance.max() < 1.5
    assert os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") == threads


@pytest.mark.parametrize("init", ["geometry", "identity"])
def test_ants_initial_transform_is_kept_without_iterations(init: str) -> None:
    """With no iterations ANTs returns its start: the grid centres' offset, or the identity."""
    fixed_grid = grid(4.0, (160.0, 200.0, 176.0))
    moving_grid = grid((4.0, 4.0, 4.5), (180.0, 220.0, 200.0), direction=LPS, centre=(8, -6, 4))
    fixed, moving = render(fixed_grid, np.eye(4)), render(moving_grid, np.eye(4))
    result = ants_affine_register(
        fixed,
        fixed_grid,
        moving,
        moving_grid,
        levels=(8.0,),
        iterations=(0,),
        init=init,  # type: ignore[arg-type]
    )
    expected = np.eye(4)
    if init == "geometry":
        expected[:3, 3] = (8.0, -6.0, 4.0)
    np.testing.assert_allclose(result.matrix, expected, atol=1e-4)


def test_a_slab_of_the_fixed_image_is_found_where_the_header_puts_it(fixed: NDArray) -> None:
    """A moving image covering only the bottom 28 mm of the head (a slab): its centre of
    mass is far from where it belongs, and from there the optimiser squashed it onto the whole
    head (27 mm off); the header's start (the identity here) is taken when it fits better."""
    slab = Geometry((FIXED.shape[0], FIXED.shape[1], 14), FIXED.affine)
    moving = render(slab, np.eye(4))
    result = affine_register(fixed, FIXED, moving, slab)
    inside = errors(result.matrix, np.eye(4), slab, moving)
    assert inside.mean() < 1.0, inside.mean()
    whole = affine_register(fixed, FIXED, render(FIXED, RIGID), FIXED)  # whole heads: as before
    assert errors(whole.matrix, RIGID, FIXED, fixed).mean() < 1.0


def test_implausible_scales_from_every_start_are_warned_about(fixed, monkeypatch, caplog):
    import regpipe.affine

    monkeypatch.setattr(regpipe.affine, "PLAUSIBLE_SCALE", (5.0, 10.0))  # none can be
    slab = Geometry((FIXED.shape[0], FIXED.shape[1], 14), FIXED.affine)
    with caplog.at_level("INFO", logger="regpipe"):
        affine_register(fixed, FIXED, render(slab, np.eye(4)), slab)
    assert "another start" in caplog.text  # one won on NCC, and still:
    assert "its scales are implausible (beyond 5-10) from every start" in caplog.text
