"""End-to-end pairwise registration through the public API on small synthetic images."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import regpipe
from regpipe.errors import InputError, WeightsError
from regpipe.imageio import Image, load_image, save_image
from regpipe.networks import NetworkConfig, build_network, save_weights
from regpipe.spaces import Geometry
from regpipe.transform_files import read_transform
from regpipe.transforms import AffineTransform
from regpipe.warp import warp_array
from tests.conftest import blob_image, make_affine

SMALL = NetworkConfig(grid_shape=(40, 40, 40), n_steps=2, down_channels=(8, 8, 16, 16, 16),
                      up_channels=(8, 8, 16, 16, 16))


@pytest.fixture(scope="module")
def small_network():
    torch.manual_seed(0)
    network = build_network(SMALL)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.02)
    return network.eval()


@pytest.fixture(scope="module")
def pair():
    fixed_geom = Geometry((36, 32, 28), make_affine("oblique", (36, 32, 28)))
    moving_geom = Geometry((60, 44, 20), make_affine("anisotropic", (60, 44, 20)))
    shift = np.eye(4)
    shift[:3, 3] = [2.0, -1.5, 1.0]
    # the moving image shows the fixed phantom displaced by a known affine
    fixed = Image(blob_image(fixed_geom), fixed_geom)
    moving_data = warp_array(blob_image(Geometry((36, 32, 28), fixed_geom.affine)), fixed_geom,
                             AffineTransform(np.linalg.inv(shift)), moving_geom)
    return fixed, Image(moving_data + 0.01, moving_geom), shift


def test_register_outputs_are_consistent(pair, small_network, tmp_path):
    fixed, moving, _ = pair
    result = regpipe.register(fixed, moving, weights=small_network, affine="ours")
    assert result.settings["io_iterations"] == 50  # the command line's default, from Python too
    assert result.warped.data.shape == fixed.data.shape
    assert result.metrics["ncc_after"] > 0.9
    # NCC unaligned < after the affine pre-alignment (the shift is affine) <= final
    assert result.metrics["ncc_before"] < result.metrics["ncc_affine"] - 0.05
    assert result.metrics["ncc_affine"] <= result.metrics["ncc_after"] + 0.01
    assert result.metrics["inverse_consistency_voxels"] < 0.5
    for key in ("folding_percent", "sd_log_jacobian", "runtime_s", "peak_memory_mb"):
        assert key in result.metrics
    result.save(tmp_path / "fwd.h5", inverse_out=tmp_path / "inv.nii.gz",
                warped_out=tmp_path / "warped.nii.gz", jacobian_out=tmp_path / "jac.nii.gz")
    forward = read_transform(tmp_path / "fwd.h5")
    inverse = read_transform(tmp_path / "inv.nii.gz")
    pts = fixed.geometry.voxel_to_world(np.array([[18.0, 16, 14], [10, 12, 9], [25, 20, 18]]))
    assert np.allclose(forward.map_points(pts), result.forward.map_points(pts), atol=0.05)
    round_trip = inverse.map_points(forward.map_points(pts))
    assert np.abs(round_trip - pts).max() < 0.3


def test_affine_recovers_known_shift(pair):
    fixed, moving, shift = pair
    result = regpipe.register(fixed, moving, weights=None, affine="ours", io_iterations=0)
    centre = fixed.geometry.center_world()
    assert np.linalg.norm(result.forward.map_points(centre) - (centre + shift[:3, 3])) < 1.0


def test_ants_affine_pre_alignment_recovers_the_shift_too(pair):
    pytest.importorskip("ants")
    fixed, moving, shift = pair
    result = regpipe.register(fixed, moving, weights=None, affine="ants", io_iterations=0)
    assert result.settings["affine"] == "ants"
    centre = fixed.geometry.center_world()
    assert np.linalg.norm(result.affine.map_points(centre) - (centre + shift[:3, 3])) < 1.5


def test_fast_instance_optimisation_improves_similarity(pair):
    fixed, moving, _ = pair
    base = regpipe.register(fixed, moving, weights=None, affine="none", grid_mode="isotropic",
                            io_iterations=0)
    tuned = regpipe.register(fixed, moving, weights=None, affine="none", grid_mode="isotropic",
                             io_iterations=30)
    assert tuned.metrics["ncc_after"] > base.metrics["ncc_after"]
    assert tuned.metrics["folding_percent"] == 0.0


def test_io_grid_and_options_reach_the_optimisation(pair):
    fixed, moving, _ = pair
    coarse = regpipe.register(fixed, moving, weights=None, affine="none", grid_mode="isotropic",
                              io_iterations=5, io_grid=20, progress=False)
    assert max(coarse.settings["grid_shape"]) == 20 and coarse.forward.grid_shape == tuple(
        coarse.settings["grid_shape"])
    still = regpipe.register(fixed, moving, weights=None, affine="none", grid_mode="isotropic",
                             io_iterations=5, io_options={"level_steps": (0.0, 0.0)},
                             progress=False)
    assert float(still.forward.displacement.abs().max()) == 0.0  # no iteration at any level
    with pytest.raises(InputError, match="io_grid"):
        regpipe.register(fixed, moving, weights=None, io_iterations=5, io_grid=4)
    with pytest.raises(InputError):
        regpipe.register(fixed, moving, weights=None, io_iterations=5, io_options={"speed": 2})


def test_a_ct_without_air_is_warned_about(pair, caplog):
    """Raw scanner values (HU + 1024, no intercept): the CT window would clip the body."""
    fixed, moving, _ = pair
    raw = Image(fixed.data * 1000 + 1024, fixed.geometry)
    with caplog.at_level("WARNING", logger="regpipe"):
        regpipe.register(raw, moving, weights=None, fixed_modality="ct", io_iterations=0,
                         progress=False, evaluate=False)
    assert "fixed image" in caplog.text and "does not look like a CT" in caplog.text
    assert "moving image" not in caplog.text  # an MRI: no such check


def test_segmentations_give_dice(pair):
    fixed, moving, _ = pair
    fixed_seg = Image((fixed.data > 0.5).astype(np.int16) * 3, fixed.geometry)
    moving_seg = Image((moving.data > 0.5).astype(np.int16) * 3, moving.geometry)
    result = regpipe.register(fixed, moving, weights=None, fixed_segmentation=fixed_seg,
                              moving_segmentation=moving_seg)
    assert set(result.metrics["dice"]) == {"3"}
    warped = warp_array(moving_seg.data, moving.geometry, result.forward, fixed.geometry,
                        interpolation="nearest")
    expected = 2 * np.sum((warped == 3) & (fixed_seg.data == 3)) / (
        np.sum(warped == 3) + np.sum(fixed_seg.data == 3))
    assert result.metrics["dice_mean"] == pytest.approx(expected)
    assert result.metrics["dice_mean"] > 0.8
    # a label only one subject's map has is not scored (it would count 0 whatever the warp)
    extra = fixed_seg.data.copy()
    extra[:2] = 9
    again = regpipe.register(fixed, moving, weights=None, fixed_segmentation=Image(
        extra, fixed.geometry), moving_segmentation=moving_seg)
    assert set(again.metrics["dice"]) == {"3"}


def test_apply_transform_labels_keep_dtype(pair, small_network):
    fixed, moving, _ = pair
    result = regpipe.register(fixed, moving, weights=small_network)
    labels = Image((moving.data * 4).astype(np.uint8), moving.geometry)
    out = regpipe.apply_transform(labels, result.forward, fixed, interpolation="nearest")
    assert out.data.dtype == np.uint8
    assert set(np.unique(out.data)) <= set(np.unique(labels.data))


def test_apply_transform_warns_when_the_field_misses_the_reference(pair, caplog, tmp_path):
    from regpipe.transform_files import read_transform

    fixed, moving, _ = pair
    result = regpipe.register(fixed, moving, weights=None, affine="ours", io_iterations=2,
                              progress=False, evaluate=False)
    result.save(tmp_path / "fwd.nii.gz")
    field = read_transform(tmp_path / "fwd.nii.gz")
    with caplog.at_level("WARNING", logger="regpipe"):
        regpipe.apply_transform(moving, field, fixed)
    assert "covers" not in caplog.text
    far = Geometry(fixed.geometry.shape, fixed.geometry.affine @ np.array(
        [[1.0, 0, 0, 200], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    with caplog.at_level("WARNING", logger="regpipe"):
        regpipe.apply_transform(moving, field, far)
    assert "covers 0% of the reference grid" in caplog.text
    caplog.clear()  # the field first in a chain (as in ANTs' Composite.h5): the same warning
    from regpipe.transforms import AffineTransform, compose

    with caplog.at_level("WARNING", logger="regpipe"):
        regpipe.apply_transform(moving, compose(field, AffineTransform.identity()), far)
    assert "covers 0% of the reference grid" in caplog.text


def test_register_leaves_torch_state_and_the_callers_network_alone(pair, small_network):
    fixed, moving, _ = pair
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    small_network.train()
    regpipe.register(fixed, moving, weights=small_network, affine="none", io_iterations=2,
                     threads=1, progress=False, evaluate=False)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream goes on
    assert torch.get_num_threads() == threads
    assert small_network.training  # left as the caller had it
    small_network.eval()
    with pytest.raises(InputError, match="float32"):
        regpipe.register(fixed, moving, weights=small_network.double(), io_iterations=0)
    small_network.float()


@pytest.mark.parametrize(("options", "message"), [
    ({"io_sim": "mind"}, "io_sim and io_lr apply to io_method 'network'"),
    ({"io_lr": 1.0}, "io_sim and io_lr apply to io_method 'network'"),
    ({"weights": {"a": 1}}, "weights must be"),
    ({"threads": 0}, "thread count"),
])
def test_options_that_would_be_ignored_are_refused(pair, options, message):
    fixed, moving, _ = pair
    with pytest.raises(InputError, match=message):
        regpipe.register(fixed, moving, **{"weights": None, "io_iterations": 2, **options})


def test_images_must_be_files_nibabel_or_regpipe_images_with_matching_grids(pair):
    fixed, moving, _ = pair
    with pytest.raises(InputError, match="wrap an array"):
        regpipe.register(fixed, moving, weights=None, fixed_mask=fixed.data > 0.3)
    wrong = Image(fixed.data, Geometry(fixed.data.shape[::-1], fixed.geometry.affine))
    with pytest.raises(InputError, match="its data has shape"):
        regpipe.register(wrong, moving, weights=None)
    flat = nib.Nifti1Image(np.random.rand(8, 9).astype(np.float32), np.eye(4))
    with pytest.raises(InputError, match="fixed image"):
        regpipe.register(flat, moving, weights=None)


def test_save_checks_every_name_before_writing(pair, tmp_path):
    from regpipe.errors import TransformFileError

    fixed, moving, _ = pair
    result = regpipe.register(fixed, moving, weights=None, io_iterations=0, evaluate=False)
    with pytest.raises(TransformFileError, match="affine transforms only"):
        result.save(tmp_path / "fwd.h5", inverse_out=tmp_path / "inv.txt")
    with pytest.raises(InputError, match="images are written as"):
        result.save(tmp_path / "fwd.h5", warped_out=tmp_path / "w.mhd")
    assert list(tmp_path.iterdir()) == []


def test_outputs_never_overwrite_inputs_or_each_other(pair, tmp_path):
    fixed, moving, _ = pair
    moving_path = save_image(moving, tmp_path / "moving.nii.gz")
    fixed_path = save_image(fixed, tmp_path / "fixed.nii.gz")
    before = moving_path.read_bytes()
    result = regpipe.register(fixed_path, moving_path, weights=None, io_iterations=0,
                              evaluate=False)
    with pytest.raises(InputError, match="is the moving input"):
        result.save(tmp_path / "fwd.h5", warped_out=moving_path)
    with pytest.raises(InputError, match="transform_out and inverse_out are the same file"):
        result.save(tmp_path / "t.nii.gz", inverse_out=tmp_path / "t.nii.gz")
    with pytest.raises(InputError, match="is the moving input"):
        regpipe.apply_transform(moving_path, result.forward, fixed, output=moving_path)
    with pytest.raises(InputError, match="is the reference input"):
        regpipe.apply_transform(moving, result.forward, fixed_path, output=fixed_path)
    with pytest.raises(InputError, match="is the moving input"):  # an image read from the file
        regpipe.apply_transform(load_image(moving_path), result.forward, fixed, output=moving_path)
    assert moving_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.nii.gz", "moving.nii.gz"]


def test_save_refuses_an_itk_image_of_a_sheared_grid_before_writing(pair, tmp_path):
    fixed, moving, _ = pair
    affine = fixed.geometry.affine.copy()
    affine[:3, 1] += 0.3 * affine[:3, 0]  # sheared voxel axes
    sheared = Image(fixed.data, Geometry(fixed.geometry.shape, affine))
    result = regpipe.register(sheared, moving, weights=None, io_iterations=0, evaluate=False)
    with pytest.raises(InputError, match="sheared"):
        result.save(tmp_path / "fwd.h5", warped_out=tmp_path / "w.nrrd")
    with pytest.raises(InputError, match="sheared"):
        regpipe.apply_transform(moving, result.forward, sheared, output=tmp_path / "w.mha")
    assert list(tmp_path.iterdir()) == []


def test_apply_transform_resamples_any_content_and_checks_the_interpolation(pair):
    fixed, moving, _ = pair
    empty = Image(np.zeros(moving.geometry.shape, np.uint8), moving.geometry)
    reference = Image(np.zeros(fixed.geometry.shape, np.float32), fixed.geometry)
    out = regpipe.apply_transform(empty, AffineTransform.identity(), reference,
                                  interpolation="nearest")
    assert out.data.dtype == np.uint8 and not out.data.any()
    with pytest.raises(InputError, match="'linear' or 'nearest'"):
        regpipe.apply_transform(moving, AffineTransform.identity(), fixed,
                                interpolation="cubic")  # type: ignore[arg-type]


def test_weights_file_round_trip(pair, small_network, tmp_path):
    fixed, moving, _ = pair
    path = save_weights(small_network, tmp_path / "small.pt", {"grid_mode": "isotropic"})
    from_file = regpipe.register(fixed, moving, weights=str(path), affine="none")
    in_memory = regpipe.register(fixed, moving, weights=small_network, affine="none",
                                 grid_mode="isotropic")
    assert from_file.settings["grid_mode"] == "isotropic"
    assert torch.allclose(from_file.forward.displacement, in_memory.forward.displacement)


def test_incompatible_weights_fail_clearly(pair, tmp_path):
    fixed, moving, _ = pair
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError):
        regpipe.register(fixed, moving, weights=str(tmp_path / "bad.pt"))


def test_mask_on_other_grid_is_refused(pair):
    fixed, moving, _ = pair
    mask = Image(np.ones((5, 5, 5), np.uint8), Geometry((5, 5, 5), np.eye(4)))
    with pytest.raises(InputError, match="different grid"):
        regpipe.register(fixed, moving, weights=None, fixed_mask=mask)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"intensity_conservation": True, "io_method": "network"}, "only supported for CT"),
        ({"dice_loss_weight": 1.0, "io_method": "network"}, "segmentation"),
        ({"dice_loss_weight": -1.0}, ">= 0"),
        ({"intensity_conservation": True, "fixed_modality": "ct", "moving_modality": "ct"},
         "io_method 'network'"),
    ],
)
def test_reference_loss_options_are_validated(pair, small_network, kwargs, message):
    fixed, moving, _ = pair
    with pytest.raises(InputError, match=message):
        regpipe.register(fixed, moving, weights=small_network, affine="none", io_iterations=1,
                         **kwargs)


def test_network_io_with_reference_losses(pair, small_network):
    fixed, moving, _ = pair
    fixed_seg = Image((fixed.data > 0.4).astype(np.int16) * 4, fixed.geometry)
    moving_seg = Image((moving.data > 0.4).astype(np.int16) * 4, moving.geometry)
    result = regpipe.register(
        fixed, moving, weights=small_network, affine="none", fixed_modality="ct",
        moving_modality="ct", fixed_segmentation=fixed_seg, moving_segmentation=moving_seg,
        io_iterations=1, io_method="network", intensity_conservation=True,
        dice_loss_weight=0.5, progress=False,
    )
    assert result.settings["intensity_conservation"] is True
    assert result.settings["dice_loss_weight"] == 0.5
    assert "dice_mean" in result.metrics


def test_mixed_precision_is_float32_on_the_cpu(pair, small_network):
    fixed, moving, _ = pair
    plain = regpipe.register(fixed, moving, weights=small_network, affine="none", device="cpu",
                             io_iterations=0)
    asked = regpipe.register(fixed, moving, weights=small_network, affine="none", device="cpu",
                             io_iterations=0, mixed_precision=True)
    assert (asked.settings["mixed_precision"] is False
            and plain.settings["mixed_precision"] is False)
    torch.testing.assert_close(asked.forward.displacement, plain.forward.displacement,
                               rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_precision_on_gpu_stays_close_to_float32(pair, small_network):
    fixed, moving, _ = pair
    plain = regpipe.register(fixed, moving, weights=small_network, affine="none", device="cuda",
                             io_iterations=0)
    mixed = regpipe.register(fixed, moving, weights=small_network, affine="none", device="cuda",
                             io_iterations=0, mixed_precision=True)
    assert mixed.settings["mixed_precision"] is True
    difference = (mixed.forward.displacement - plain.forward.displacement).abs()
    assert 0 < float(difference.max()) < 0.1


def test_jacobian_is_computed_once_per_forward_transform():
    geometry = Geometry((6, 6, 6), np.eye(4))
    image = Image(np.zeros(geometry.shape, np.float32), geometry)
    scale = AffineTransform(np.diag([2.0, 1.0, 1.0, 1.0]))
    result = regpipe.RegistrationResult(scale, scale, image, image, image, None)
    first = result.jacobian()
    assert result.jacobian() is first and np.allclose(first.data, 2.0)
    result.forward = AffineTransform(np.diag([1.0, 3.0, 1.0, 1.0]))
    assert np.allclose(result.jacobian().data, 3.0)


def test_outputs_on_a_template_grid_keep_its_space_code(pair, tmp_path):
    """An MNI template's sform code 4 stays on the warped image and Jacobian on its grid
    (AFNI and FSL read code 1 as another, scanner, space)."""
    from regpipe.workflows.steps import conform_file

    fixed, moving, _ = pair
    template = fixed.to_nifti(np.float32)
    template.set_sform(template.affine, code=4)
    template.set_qform(template.affine, code=4)
    nib.save(template, tmp_path / "tpl.nii.gz")
    result = regpipe.register(tmp_path / "tpl.nii.gz", moving, weights=None, io_iterations=2)
    result.save(tmp_path / "fwd.h5", warped_out=tmp_path / "warped.nii.gz",
                jacobian_out=tmp_path / "jac.nii.gz")
    for name in ("warped.nii.gz", "jac.nii.gz"):
        header = nib.load(tmp_path / name).header
        assert (int(header["sform_code"]), int(header["qform_code"])) == (4, 4), name
    conformed = conform_file(str(tmp_path / "tpl.nii.gz"), "image", str(tmp_path / "c.nii.gz"))
    assert int(nib.load(conformed).header["sform_code"]) == 4
    nib.save(moving.to_nifti(np.float32), tmp_path / "scanner.nii.gz")  # no template: code 1
    assert int(nib.load(tmp_path / "scanner.nii.gz").header["sform_code"]) == 1


def test_own_resolution_grid_follows_the_placements_axis_order():
    """A coronal slab stored LIP (8 thick slices along A) gets the same optimisation grid as
    the same voxels stored RAS in the RAS placements; squash keeps the file's order."""
    from regpipe.registration import _own_grid_shape
    from regpipe.spaces import ras_reoriented

    lip = np.array([[-1.0, 0, 0, 0], [0, 0, -5.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    stored = Geometry((128, 128, 8), lip)  # i: L, j: I, k: P (thick)
    ras = ras_reoriented(stored)
    assert ras.shape == (128, 8, 128)
    # isotropic: 1 mm everywhere, so the 40 mm of thick slices get 40 grid voxels
    for mode, expected in (("squash-ras", (128, 8, 128)), ("isotropic", (128, 40, 128))):
        assert _own_grid_shape(stored, mode, 160) == _own_grid_shape(ras, mode, 160) == \
            expected
    assert _own_grid_shape(stored, "squash", 100) == (8, 100, 100)


def test_an_image_with_no_intensity_range_is_named_with_a_hint(pair):
    fixed, moving, _ = pair
    sparse = moving.data.copy()
    sparse[:] = 0.0
    sparse[:2, :2, :2] = 1.0  # under 1 % of the voxels differ from the background
    with pytest.raises(InputError,
                       match=r"moving image .*between its quantiles.*--quantile_range"):
        regpipe.register(fixed, Image(sparse, moving.geometry), weights=None, io_iterations=0)


def test_a_small_view_is_compared_only_where_it_has_data():
    """A slab inside a large fixed image: the optimisation's region is cut to the slab's
    view (it was pulled towards the zeros outside it); a moving image that covers the fixed
    one leaves the region alone."""
    import torch

    from regpipe.registration import _within_moving_view
    from regpipe.spaces import network_grid

    geometry = Geometry((20, 20, 20), np.eye(4))
    grid = network_grid(geometry, (20, 20, 20), "squash")
    fixed_t = torch.ones(1, 1, 20, 20, 20)
    whole = Image(np.ones((20, 20, 20), np.float32), geometry)
    assert _within_moving_view(None, fixed_t, whole, grid, (20, 20, 20), False, 0.02) == \
        (None, None)
    slab_affine = np.eye(4)
    slab_affine[2, 3] = 8.0  # voxels k = 8..11 of the fixed grid
    slab = Image(np.ones((20, 20, 4), np.float32), Geometry((20, 20, 4), slab_affine))
    region, view = _within_moving_view(None, fixed_t, slab, grid, (20, 20, 20), False, 0.02)
    assert 0.15 < float(region.mean()) < 0.25  # 4 (+/- a border voxel) of 20 slices
    assert float(region[0, 0, 9, 10, 10]) == 1.0 and float(region[0, 0, 2, 10, 10]) == 0.0
    assert torch.equal(view, region)  # the fixed image is all foreground here


def test_an_aligned_slab_is_not_stretched():
    """A slab cut from the fixed image, on its own grid at the same place: the answer is the
    identity. The fixed image outside the slab's view must not reach the similarity's windows
    at its edge (measured: mean / max 0.55 / 2.2 mm of displacement inside the slab before,
    0.14 / 0.46 mm after)."""
    from scipy.ndimage import gaussian_filter

    from regpipe.transforms import DisplacementField

    shape = (48, 48, 48)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    inside = np.linalg.norm((index - 23.5) / 20, axis=-1) < 1
    texture = gaussian_filter(np.random.default_rng(0).standard_normal(shape), 1.5)
    data = (inside * (1 + 3 * texture)).clip(0).astype(np.float32)
    fixed = Image(data, Geometry(shape, np.diag([2.0, 2.0, 2.0, 1.0])))
    slab_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    slab_affine[2, 3] = 40.0  # slices k = 20..27
    moving = Image(np.ascontiguousarray(data[:, :, 20:28]), Geometry((48, 48, 8), slab_affine))
    result = regpipe.register(fixed, moving, weights=None, affine="none", io_iterations=50,
                              evaluate=False, progress=False)
    field = DisplacementField.from_transform(result.forward, fixed.geometry).field
    within = np.zeros(shape, bool)
    within[:, :, 21:27] = inside[:, :, 21:27]
    moved = np.linalg.norm(field[within], axis=-1)
    assert moved.mean() < 0.3 and moved.max() < 1.0


def test_images_that_do_not_overlap_are_refused_not_registered(pair):
    fixed, moving, _ = pair
    far = moving.geometry.affine.copy()
    far[:3, 3] += 300.0
    with pytest.raises(InputError, match=r"does not overlap.*--affine ours"):
        regpipe.register(fixed, Image(moving.data, Geometry(moving.geometry.shape, far)),
                         weights=None, affine="none", io_iterations=0)


def test_a_slab_of_two_slices_warns_about_the_affine(pair, caplog):
    fixed, moving, _ = pair
    thin = Image(np.ascontiguousarray(moving.data[:, :, 10:12]),
                 Geometry((*moving.geometry.shape[:2], 2), moving.geometry.affine))
    with caplog.at_level("WARNING", logger="regpipe"):
        regpipe.register(fixed, thin, weights=None, io_iterations=0, evaluate=False)
    assert "only 2 voxels along one axis" in caplog.text


def test_the_symmetric_estimate_inverts_in_index_space_to_the_identity():
    """The inversion the symmetric estimate uses (GridTransform's, on an identity grid)."""
    from regpipe.transforms import GridTransform

    shape = (20, 18, 16)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    smooth = torch.stack([torch.sin(axes[1] / 5.0), 0.8 * torch.cos(axes[2] / 4.0),
                          0.6 * torch.sin(axes[0] / 6.0)])[None] * 1.5
    inverse = GridTransform(np.eye(4), smooth[0], np.eye(4)).inverse().displacement[None]
    # g + w(g) + v(g + w(g)) == g away from the edges, where the map leaves the grid
    where = torch.stack(axes)[None] + inverse
    scale = torch.tensor([2.0 / (n - 1) for n in shape]).view(1, 3, 1, 1, 1)
    grid = (where * scale - 1).permute(0, 2, 3, 4, 1).flip(-1)
    back = torch.nn.functional.grid_sample(smooth, grid, align_corners=True,
                                           padding_mode="border")
    residual = (inverse + back)[:, :, 3:-3, 3:-3, 3:-3].abs().max()
    assert residual < 1e-3 and float(smooth.abs().max()) > 1.0


def test_symmetric_estimate_cancels_what_the_network_does_to_any_pair(small_network):
    """Registering an image to itself: one pass keeps the (random) network's own drift; the
    mean with the inverse of the swapped pass cancels it."""
    geometry = Geometry((36, 32, 28), make_affine("RAS", (36, 32, 28)))
    image = Image(blob_image(geometry), geometry)
    drift = {}
    for symmetric in (False, True):
        result = regpipe.register(image, image, weights=small_network, affine="none",
                                  io_iterations=0, evaluate=False, symmetric=symmetric)
        assert result.settings["symmetric"] is symmetric
        drift[symmetric] = float(np.abs(result.forward_field().field).mean())
    assert drift[False] > 0.05 and drift[True] < 0.1 * drift[False]
    plain = regpipe.register(image, image, weights=None, io_iterations=0, evaluate=False)
    assert plain.settings["symmetric"] is False  # no network, nothing to symmetrise


def test_further_network_passes_compose_with_the_maps_before():
    """A network that always moves by the same shift: two passes move by twice it, and the
    second pass sees the moving image already shifted (warped by the first map)."""
    from regpipe.registration import _network_displacement

    shape = (16, 14, 12)
    seen = []

    class Shift(torch.nn.Module):
        def displacement(self, moving, fixed):
            seen.append(moving.clone())
            step = torch.tensor([1.5, -1.0, 0.5]) / torch.tensor([n - 1.0 for n in shape])
            return step.view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()

    moving = torch.rand((1, 1, *shape))
    one = _network_displacement(Shift(), moving, moving, passes=1)
    two = _network_displacement(Shift(), moving, moving, passes=2)
    assert torch.allclose(two[..., 4:-4, 4:-4, 4:-4], 2 * one[..., 4:-4, 4:-4, 4:-4], atol=1e-5)
    assert torch.allclose(one[0, :, 5, 5, 5], torch.tensor([1.5, -1.0, 0.5]), atol=1e-5)
    # the second pass registered the moving image resampled at x + (1.5, -1, 0.5)
    expected = torch.nn.functional.grid_sample(
        moving, (((torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)
                                                 for n in shape], indexing="ij"))[None]
                   + one) / torch.tensor([n - 1.0 for n in shape]).view(1, 3, 1, 1, 1) * 2 - 1)
                 .permute(0, 2, 3, 4, 1).flip(-1)), align_corners=True)
    assert torch.allclose(seen[-1], expected, atol=1e-5)

    # fields that vary, another per pass: the new map first, then the one before at the
    # point it moved to
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    first = torch.stack([torch.sin(axes[1] / 3), torch.cos(axes[2] / 4), axes[0] / 15])[None]
    second = torch.stack([axes[2] / 10, torch.sin(axes[0] / 2), torch.cos(axes[1] / 3)])[None]
    scale = torch.tensor([n - 1.0 for n in shape]).view(1, 3, 1, 1, 1)

    class Fields(torch.nn.Module):
        calls = 0

        def displacement(self, moving, fixed):
            self.calls += 1
            return (first if self.calls == 1 else second) / scale

    from regpipe.spaces import index_grid, sample_at_indices

    two = _network_displacement(Fields(), moving, moving, passes=2)
    manual = second + sample_at_indices(first, index_grid(shape) + second, padding="border")
    other_order = first + sample_at_indices(second, index_grid(shape) + first, padding="border")
    assert torch.allclose(two, manual, atol=1e-5)
    assert not torch.allclose(two, other_order, atol=1e-2)


def test_network_passes_are_recorded_and_checked(small_network):
    geometry = Geometry((36, 32, 28), make_affine("RAS", (36, 32, 28)))
    image = Image(blob_image(geometry), geometry)
    result = regpipe.register(image, image, weights=small_network, affine="none",
                              io_iterations=0, evaluate=False, network_passes=3)
    assert result.settings["network_passes"] == 3
    with pytest.raises(InputError, match="there is no network"):
        regpipe.register(image, image, weights=None, io_iterations=0, network_passes=3)
    with pytest.raises(InputError, match="single pass"):
        regpipe.register(image, image, weights=small_network, io_method="network",
                         io_iterations=1, network_passes=2)
    plain = regpipe.register(image, image, weights=None, io_iterations=0, evaluate=False)
    assert plain.settings["network_passes"] == 1
    for bad in (0, 11, 1.5, True, "2"):
        with pytest.raises(InputError, match="network_passes must be an integer"):
            regpipe.register(image, image, weights=None, io_iterations=0, network_passes=bad)


def test_a_slab_limits_fast_io_also_on_the_network_grid(small_network, caplog):
    """With the optimisation on the network's own grid (no regridding), the region is still
    cut to the slab's view: it is computed from the fixed image before the view masked it."""
    shape = (40, 40, 40)
    geometry = Geometry(shape, np.diag([2.0, 2.0, 2.0, 1.0]))
    data = blob_image(geometry)
    slab_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    slab_affine[2, 3] = 30.0
    moving = Image(np.ascontiguousarray(data[:, :, 15:23]), Geometry((40, 40, 8), slab_affine))
    with caplog.at_level("INFO", logger="regpipe"):
        regpipe.register(Image(data, geometry), moving, weights=small_network, affine="none",
                         grid_mode="isotropic", io_iterations=2, io_grid=40, evaluate=False,
                         progress=False)
    assert "instance optimisation compares them there only" in caplog.text


def test_network_instance_optimisation_is_not_recorded_as_symmetric(pair, small_network):
    fixed, moving, _ = pair
    result = regpipe.register(fixed, moving, weights=small_network, io_method="network",
                              io_iterations=1, evaluate=False, progress=False)
    assert result.settings["symmetric"] is False


def test_register_works_inside_no_grad_and_inference_mode(pair, small_network):
    """Notebooks wrap inference in them; the instance optimisation needs gradients."""
    fixed, moving, _ = pair
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            regpipe.register(fixed, moving, weights=small_network, io_iterations=2,
                             evaluate=False, progress=False)
            regpipe.register(fixed, moving, weights=small_network, io_method="network",
                             io_iterations=1, evaluate=False, progress=False)
        assert torch.is_grad_enabled()


def test_save_checks_folders_and_suffix_case_before_writing_anything(pair, tmp_path):
    fixed, moving, _ = pair
    result = regpipe.register(fixed, moving, weights=None, io_iterations=0, evaluate=False)
    with pytest.raises(InputError, match=r"folder .*missing does not exist"):
        result.save(tmp_path / "fwd.h5", warped_out=tmp_path / "missing" / "w.nii.gz")
    with pytest.raises(InputError, match="lower case"):
        result.save(tmp_path / "fwd.h5", warped_out=tmp_path / "w.MHA")
    assert list(tmp_path.iterdir()) == []


def test_apply_transform_takes_a_chain_keeps_the_space_code_and_refuses_other_types(
        pair, tmp_path):
    fixed, moving, _ = pair
    reference = nib.Nifti1Image(fixed.data, fixed.geometry.affine)
    reference.set_sform(fixed.geometry.affine, code=4)
    nib.save(reference, str(tmp_path / "ref.nii.gz"))
    shift = np.eye(4)
    shift[0, 3] = 2.0
    back = np.eye(4)
    back[0, 3] = -2.0
    out = regpipe.apply_transform(moving, [AffineTransform(shift), AffineTransform(back)],
                                  tmp_path / "ref.nii.gz", output=tmp_path / "w.nii.gz")
    plain = regpipe.apply_transform(moving, AffineTransform.identity(), tmp_path / "ref.nii.gz")
    assert np.allclose(out.data, plain.data, atol=1e-4)  # the chain cancels out
    assert int(nib.load(str(tmp_path / "w.nii.gz")).header["sform_code"]) == 4
    for wrong in (None, 3, []):
        with pytest.raises(InputError, match="transform"):
            regpipe.apply_transform(moving, wrong, tmp_path / "ref.nii.gz")
    assert "data=" not in repr(out)  # no array dump in a notebook


def test_the_package_lists_its_api_and_reaches_submodules_lazily():
    import subprocess
    import sys

    assert {"register", "apply_transform", "errors"} <= set(dir(regpipe))
    assert "os" not in dir(regpipe)
    code = "import regpipe, sys; print(regpipe.errors.InputError.__name__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["InputError", "False"]  # still no torch import
