"""ANTs registrations converted to regpipe results (tiny volumes, about a second each)."""

from __future__ import annotations

import numpy as np
import pytest

from regpipe.ants_methods import (
    ANTS_METHODS,
    ants_random_seed,
    ants_register,
    n4_bias_correct,
)
from regpipe.errors import InputError
from regpipe.imageio import Image, save_image
from regpipe.metrics import dice_per_label
from regpipe.registration import RegistrationResult
from regpipe.resources import measure_resources
from regpipe.spaces import Geometry
from regpipe.transforms import AffineTransform, ComposedTransform, DisplacementField
from regpipe.warp import warp_array
from tests.conftest import blob_image, make_affine

ants = pytest.importorskip("ants")

SHAPE = (28, 28, 28)


@pytest.fixture(scope="module")
def pair() -> tuple[Image, Image]:
    """A fixed phantom (RAS) and the same phantom shifted, on an LPS grid of another shape."""
    fixed_geom = Geometry(SHAPE, make_affine("RAS", SHAPE))
    moving_geom = Geometry((26, 30, 24), make_affine("LPS", (26, 30, 24)))
    shift = np.eye(4)
    shift[:3, 3] = [2.0, -1.5, 1.0]
    fixed = Image(blob_image(fixed_geom), fixed_geom)
    moving = warp_array(fixed.data, fixed_geom, AffineTransform(np.linalg.inv(shift)), moving_geom)
    return fixed, Image(moving + 0.01, moving_geom)


@pytest.fixture(scope="module")
def synquick(pair) -> RegistrationResult:
    fixed, moving = pair
    segs = [
        Image((image.data > 0.4).astype(np.int16) + (image.data > 0.8), image.geometry)
        for image in pair
    ]
    return ants_register(
        fixed,
        moving,
        method="synquick",
        seed=3,
        fixed_segmentation=segs[0],
        moving_segmentation=segs[1],
    )


def _ants_image(image: Image):
    from regpipe.ants_methods import to_ants_image

    return to_ants_image(image.data, image.geometry)


def test_methods_table_names_ants_transforms():
    assert ANTS_METHODS == {
        "syn": "SyN",
        "synquick": "antsRegistrationSyNQuick[s]",
        "affine": "Affine",
    }


def test_unknown_method_is_an_input_error(pair):
    with pytest.raises(InputError, match="unknown ANTs method"):
        ants_register(*pair, method="bspline")  # type: ignore[arg-type]


def test_affine_result_is_a_registration_result(pair):
    fixed, moving = pair
    result = ants_register(fixed, moving, method="affine", seed=1)
    assert isinstance(result, RegistrationResult)
    assert isinstance(result.forward, AffineTransform)
    assert result.settings["type_of_transform"] == "Affine"
    assert result.settings["deterministic"] and result.settings["threads"] == 1
    points = fixed.geometry.voxel_to_world(np.array([[14.0, 14, 14], [8, 18, 10]]))
    assert np.allclose(
        result.inverse.map_points(result.forward.map_points(points)), points, atol=1e-6
    )
    for key in ("runtime_s", "peak_memory_mb", "ncc_before", "ncc_after", "folding_percent"):
        assert np.isfinite(result.metrics[key])


def test_synquick_forward_is_warp_then_affine(synquick):
    assert isinstance(synquick.forward, ComposedTransform)
    kinds = [type(t) for t in synquick.forward.transforms]
    assert kinds == [DisplacementField, AffineTransform]
    assert isinstance(synquick.affine, AffineTransform)


def test_synquick_warped_matches_ants_on_written_transform(synquick, tmp_path):
    """The written forward ``.h5``, applied by ANTs itself, gives our warped image."""
    synquick.save(tmp_path / "fwd.h5", inverse_out=tmp_path / "inv.h5")
    fixed, moving = synquick.fixed, synquick.moving
    theirs = ants.apply_transforms(
        _ants_image(fixed), _ants_image(moving), [str(tmp_path / "fwd.h5")], whichtoinvert=[False]
    ).numpy()
    inner = (slice(3, -3),) * 3
    assert np.abs(theirs[inner] - synquick.warped.data[inner]).max() < 1e-3


def test_synquick_inverse_undoes_forward(synquick):
    points = synquick.fixed.geometry.voxel_to_world(np.array([[14.0, 14, 14], [10, 16, 12]]))
    back = synquick.inverse.map_points(synquick.forward.map_points(points))
    assert np.abs(back - points).max() < 0.2


def test_synquick_improves_similarity_and_reports_dice(synquick):
    metrics = synquick.metrics
    assert metrics["ncc_after"] > metrics["ncc_before"]
    assert set(metrics["dice"]) == {"1", "2"}
    # overlap of the unregistered pair: 0.53 / 0.54. SynQuick reaches 0.68-0.75 on this tiny
    # phantom, varying with float rounding of its input (noise of 1e-6 moves it that much)
    labels = [(image.data > 0.4).astype(np.int16) + (image.data > 0.8)
              for image in (synquick.fixed, synquick.moving)]
    unregistered = warp_array(labels[1], synquick.moving.geometry, AffineTransform.identity(),
                              synquick.fixed.geometry, interpolation="nearest")
    before = np.mean(list(dice_per_label(labels[0], unregistered).values()))
    assert metrics["dice_mean"] > before + 0.1
    assert metrics["folding_percent"] == 0.0


def test_seed_makes_ants_reproducible(pair, synquick):
    again = ants_register(*pair, method="synquick", seed=3)
    assert np.array_equal(again.warped.data, synquick.warped.data)


def test_seed_zero_is_reproducible_too(pair):
    # ANTs reads --random-seed 0 as "seed from the clock"; regpipe's seed 0 (the BIDS App's
    # default) must still give identical runs.
    first, second = (ants_register(*pair, method="affine", seed=0) for _ in range(2))
    assert np.array_equal(first.forward.matrix, second.forward.matrix)
    assert first.settings["ants_random_seed"] == 1


def test_the_fresh_process_exchanges_no_pickle_and_reports_its_failure(pair, tmp_path):
    from regpipe.ants_methods import _ants_args, _in_fresh_process
    from regpipe.errors import RegpipeError

    fixed, moving = pair
    images = {"fixed": _ants_args(fixed.data, fixed.geometry),
              "moving": _ants_args(moving.data, moving.geometry)}
    files = _in_fresh_process((images, "Translation", str(tmp_path), 1, 1, False), str(tmp_path))
    assert files["fwdtransforms"] and files["runtime_s"] > 0  # measured in the child
    with np.load(tmp_path / "request.npz", allow_pickle=False) as arrays:  # no object arrays
        assert np.array_equal(arrays["fixed_data"], images["fixed"][0])
    with pytest.raises(RegpipeError, match="ANTs registration failed"):
        _in_fresh_process((images, "NoSuchTransform", str(tmp_path), 1, 1, False), str(tmp_path))


def test_ants_random_seed_is_positive_and_distinct():
    seeds = [ants_random_seed(s) for s in (0, 1, 2, 2**31 - 2, 2**32 - 1)]
    assert all(1 <= s <= 2**31 - 1 for s in seeds)
    assert len(set(seeds[:4])) == 4
    with pytest.raises(InputError, match="non-negative"):
        ants_random_seed(-1)


def test_n4_keeps_grid_and_removes_bias(tmp_path):
    geometry = Geometry((32, 32, 32), make_affine("LIA", (32, 32, 32)))
    index = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
    radius = np.linalg.norm(index - 15.5, axis=-1)
    clean = (0.1 + (radius < 13) + (radius < 7)).astype(np.float32)  # two sharp "tissues"
    bias = np.linspace(0.7, 1.3, 32)[:, None, None].astype(np.float32)
    path = save_image(Image(clean * bias, geometry), tmp_path / "biased.nii.gz")
    corrected = n4_bias_correct(path, shrink_factor=2)
    assert corrected.geometry.same_as(geometry)
    assert corrected.data.dtype == np.float32
    ring = (radius < 13) & (radius > 8)  # one tissue: its variation is the bias

    def variation(data):
        return np.std(data[ring]) / np.mean(data[ring])

    assert variation(corrected.data) < 0.2 * variation(clean * bias)


def test_measure_resources_sees_a_large_allocation():
    with measure_resources() as usage:
        block = np.ones((64, 1024, 1024))  # 512 MiB
        del block
    assert usage.runtime_s > 0
    if usage.scope == "block":
        assert usage.peak_memory_mb > 500
