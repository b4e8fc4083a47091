"""Transform files: round trips and cross-checks against ANTs, SimpleITK and nitransforms.

Every transform here is fixed -> moving (pull-back) in RAS+ mm; the toolkits work in LPS+ mm.
Grids are small (24 x 20 x 16) and parametrised over orientations: RAS, LPS, LIA (permuted
axes), oblique (rotated direction cosines) and anisotropic voxels.

Tolerances (measured values are recorded as test properties: run with ``--junitxml=FILE
-o junit_family=legacy``):

* points mapped through a written field or affine: 1e-4 mm (float32 storage, linear
  interpolation everywhere); nitransforms off the grid uses cubic splines: 0.05 mm;
* resampled smooth images (values within about +-2.5): 1e-3 on interior voxels (one voxel from
  the fixed grid's edge, mapped points one voxel inside the moving grid), where edge and
  boundary conventions of the toolkits cannot differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ants
import h5py
import nibabel as nib
import nitransforms as nt
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nitransforms.nonlinear import DenseFieldTransform
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from regpipe import transform_files
from regpipe.errors import TransformFileError
from regpipe.spaces import (
    Geometry,
    apply_affine,
    lps_to_ras,
    network_grid,
    orthogonal_cover,
    ras_to_lps,
)
from regpipe.transform_files import read_transform, supported_formats, write_transform
from regpipe.transforms import (
    AffineTransform,
    ComposedTransform,
    DisplacementField,
    GridTransform,
    compose,
)
from regpipe.warp import warp_array

SHAPE = (24, 20, 16)
POINT_TOL = 1e-4  # mm
CUBIC_TOL = 0.05  # mm, nitransforms' cubic spline against linear interpolation
IMAGE_TOL = 1e-3  # intensity, images of amplitude about 2.5
FIELD_SUFFIXES = (".nii.gz", ".nii", ".h5", ".hdf5")
AFFINE_SUFFIXES = (".mat", ".txt", ".tfm")


# --------------------------------------------------------------------------- test data


def _rotation(*degrees: float) -> NDArray[np.float64]:
    return Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()


def _grid(linear: NDArray[np.floating], offset: tuple[float, float, float], shape=SHAPE):
    """Grid whose centre sits at ``offset`` (RAS+ mm), voxel axes ``linear`` (3x3)."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(offset) - linear @ ((np.asarray(shape) - 1) / 2)
    return Geometry(shape, affine)


GEOMETRIES: dict[str, Geometry] = {
    "RAS": _grid(np.diag([1.5, 1.5, 1.5]), (2.0, -3.0, 4.0)),
    "LPS": _grid(np.diag([-1.5, -1.5, 1.5]), (-1.0, 2.0, -2.0)),
    # i -> Left, j -> Inferior, k -> Anterior
    "LIA": _grid(np.array([[-1.4, 0, 0], [0, 0, 1.5], [0, -1.6, 0]]), (1.0, 1.0, -1.0)),
    "oblique": _grid(_rotation(15, -20, 30) * 1.5, (0.5, -1.0, 1.5)),
    "anisotropic": _grid(np.diag([0.8, 1.3, 2.6]), (-2.0, 1.0, 0.0)),
}
#: The moving image's grid: larger, mildly oblique, covering every fixed grid.
MOVING = _grid(_rotation(0, 0, 8) * 1.4, (0.0, 0.0, 0.0), shape=(44, 44, 40))


@dataclass(frozen=True)
class SmoothTransform:
    """``T(x) = A x + d(x)``: an affine plus a smooth analytic displacement (RAS+ mm)."""

    matrix: NDArray[np.float64]
    amplitude: float = 2.0

    def map_points(self, points: NDArray[np.floating]) -> NDArray[np.float64]:
        p = np.asarray(points, dtype=np.float64)
        wave = np.stack(
            [np.sin(p[..., 1] / 8 + 0.3), np.cos(p[..., 2] / 9), np.sin(p[..., 0] / 7 - 0.2)],
            axis=-1,
        )
        return apply_affine(self.matrix, p) + self.amplitude * wave


def _affine_matrix() -> NDArray[np.float64]:
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(2, -3, 4) * 1.03
    matrix[:3, 3] = [1.5, -1.0, 2.0]
    return matrix


TRANSFORM = SmoothTransform(_affine_matrix())


def _field(name: str) -> DisplacementField:
    return DisplacementField.from_transform(TRANSFORM, GEOMETRIES[name])


def _smooth_image(geometry: Geometry) -> NDArray[np.float32]:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), -1)
    x, y, z = np.moveaxis(geometry.voxel_to_world(ijk), -1, 0)
    return (np.sin(x / 6) + 0.7 * np.cos(y / 8) + 0.5 * np.sin(z / 5 + 0.5)).astype(np.float32)


MOVING_DATA = _smooth_image(MOVING)


def _voxel_centres(geometry: Geometry) -> NDArray[np.float64]:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), -1)
    return geometry.voxel_to_world(ijk.astype(np.float64))


def _interior_points(
    geometry: Geometry, n: int = 300, seed: int = 0, margin: float = 1.0
) -> NDArray[np.float64]:
    """Random off-grid points at least ``margin`` voxels inside the grid (RAS+ mm)."""
    rng = np.random.default_rng(seed)
    ijk = rng.uniform(margin, np.asarray(geometry.shape) - 1.0 - margin, size=(n, 3))
    return geometry.voxel_to_world(ijk)


def _interior_mask(fixed: Geometry, transform, moving: Geometry = MOVING) -> NDArray[np.bool_]:
    """Fixed voxels one voxel from the edge whose image lies one voxel inside the moving grid."""
    mask = np.zeros(fixed.shape, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    vox = moving.world_to_voxel(transform.map_points(_voxel_centres(fixed)))
    inside = np.all((vox >= 1) & (vox <= np.asarray(moving.shape) - 2), axis=-1)
    return mask & inside


def _save_image(data: NDArray, geometry: Geometry, path: Path) -> Path:
    image = nib.Nifti1Image(data, geometry.affine)
    image.set_sform(geometry.affine, code=1)
    image.set_qform(geometry.affine, code=1)
    nib.save(image, path)
    return path


def _ants_apply(
    tmp_path: Path, fixed: Geometry, transform_file: Path, moving=MOVING_DATA, **kwargs
) -> NDArray:
    fixed_img = ants.image_read(
        str(_save_image(np.zeros(fixed.shape, np.float32), fixed, tmp_path / "fixed.nii.gz"))
    )
    moving_img = ants.image_read(str(_save_image(moving, MOVING, tmp_path / "moving.nii.gz")))
    warped = ants.apply_transforms(
        fixed_img, moving_img, [str(transform_file)], whichtoinvert=[False], **kwargs
    )
    return warped.numpy()


def _sitk_image(data: NDArray, geometry: Geometry, path: Path) -> sitk.Image:
    return sitk.ReadImage(str(_save_image(data, geometry, path)), sitk.sitkFloat32)


def _sitk_transform(path: Path) -> sitk.Transform:
    if path.name.endswith((".nii.gz", ".nii")):
        field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(field)
    return sitk.ReadTransform(str(path))


def _sitk_map(transform: sitk.Transform, points_ras: NDArray[np.float64]) -> NDArray[np.float64]:
    lps = ras_to_lps(points_ras)
    return lps_to_ras(np.array([transform.TransformPoint(p.tolist()) for p in lps]))


def _max(values: NDArray) -> float:
    return float(np.max(np.abs(values))) if np.size(values) else 0.0


# --------------------------------------------------------------------------- round trips


def test_supported_formats_lists_every_suffix() -> None:
    formats = supported_formats()
    assert set(formats) == {"itk-nifti-field", "itk-hdf5", "itk-affine"}
    suffixes = {s for group in formats.values() for s in group}
    assert suffixes == set(FIELD_SUFFIXES) | set(AFFINE_SUFFIXES)


@pytest.mark.parametrize("suffix", FIELD_SUFFIXES)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_field_round_trip_maps_points_identically(
    tmp_path: Path, name: str, suffix: str, record_property
) -> None:
    fixed = GEOMETRIES[name]
    path = write_transform(TRANSFORM, tmp_path / f"xfm{suffix}", reference=fixed)
    read = read_transform(path)
    assert isinstance(read, DisplacementField)
    assert read.geometry.same_as(fixed, atol=1e-4)
    expected = _field(name)
    points = np.concatenate([_interior_points(fixed), _voxel_centres(fixed).reshape(-1, 3)])
    error = _max(read.map_points(points) - expected.map_points(points))
    record_property("max_mm", error)
    assert error < POINT_TOL


@pytest.mark.parametrize("suffix", (*AFFINE_SUFFIXES, ".h5"))
def test_affine_round_trip_is_exact(tmp_path: Path, suffix: str) -> None:
    affine = AffineTransform(_affine_matrix())
    read = read_transform(write_transform(affine, tmp_path / f"xfm{suffix}"))
    assert isinstance(read, AffineTransform)
    np.testing.assert_allclose(read.matrix, affine.matrix, atol=1e-12)


def test_grid_transform_is_densified_on_the_reference(tmp_path: Path) -> None:
    fixed = GEOMETRIES["oblique"]
    rng = np.random.default_rng(1)
    noise = gaussian_filter(rng.standard_normal((3, 8, 10, 12)), sigma=(0, 2, 2, 2))
    displacement = torch.from_numpy((noise * 1.5 / np.abs(noise).max()).astype(np.float32))
    grid_in = network_grid(fixed, (8, 10, 12))
    grid = GridTransform(grid_in, displacement, _affine_matrix() @ grid_in)
    read = read_transform(write_transform(grid, tmp_path / "xfm.nii.gz", reference=fixed))
    centres = _voxel_centres(fixed).reshape(-1, 3)
    assert _max(read.map_points(centres) - grid.map_points(centres)) < POINT_TOL


def test_writing_does_not_modify_the_callers_field(tmp_path: Path) -> None:
    field = _field("LPS")
    before = field.field.copy()
    for suffix in (".nii.gz", ".h5"):
        write_transform(field, tmp_path / f"xfm{suffix}")
    np.testing.assert_array_equal(field.field, before)


def test_field_on_another_reference_is_resampled(tmp_path: Path) -> None:
    field = _field("RAS")
    reference = GEOMETRIES["oblique"]
    read = read_transform(write_transform(field, tmp_path / "xfm.h5", reference=reference))
    assert read.geometry.same_as(reference, atol=1e-6)
    centres = _voxel_centres(reference).reshape(-1, 3)  # where the resampled field is exact
    vox = GEOMETRIES["RAS"].world_to_voxel(centres)
    inside = np.all((vox >= 0) & (vox <= np.asarray(SHAPE) - 1), axis=-1)
    assert inside.mean() > 0.3
    expected = TRANSFORM.map_points(centres[inside])  # up to the RAS field's interpolation
    assert _max(read.map_points(centres[inside]) - expected) < 0.05


# --------------------------------------------------------------------------- ANTs / SimpleITK


@pytest.mark.parametrize("suffix", (".nii.gz", ".h5"))
@pytest.mark.parametrize("name", GEOMETRIES)
def test_ants_resamples_our_field_like_regpipe(
    tmp_path: Path, name: str, suffix: str, record_property
) -> None:
    fixed = GEOMETRIES[name]
    path = write_transform(TRANSFORM, tmp_path / f"xfm{suffix}", reference=fixed)
    field = _field(name)
    ours = warp_array(MOVING_DATA, MOVING, field, fixed)
    theirs = _ants_apply(tmp_path, fixed, path)
    mask = _interior_mask(fixed, field)
    assert mask.mean() > 0.5
    error = _max(ours[mask] - theirs[mask])
    record_property("max_intensity", error)
    assert error < IMAGE_TOL


@pytest.mark.parametrize("suffix", (".nii.gz", ".h5"))
@pytest.mark.parametrize("name", GEOMETRIES)
def test_simpleitk_resamples_and_maps_like_regpipe(
    tmp_path: Path, name: str, suffix: str, record_property
) -> None:
    fixed = GEOMETRIES[name]
    path = write_transform(TRANSFORM, tmp_path / f"xfm{suffix}", reference=fixed)
    field = _field(name)
    transform = _sitk_transform(path)
    warped = sitk.Resample(
        _sitk_image(MOVING_DATA, MOVING, tmp_path / "moving.nii.gz"),
        _sitk_image(np.zeros(SHAPE, np.float32), fixed, tmp_path / "fixed.nii.gz"),
        transform,
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    theirs = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
    ours = warp_array(MOVING_DATA, MOVING, field, fixed)
    mask = _interior_mask(fixed, field)
    image_error = _max(ours[mask] - theirs[mask])
    points = _interior_points(fixed)
    point_error = _max(_sitk_map(transform, points) - field.map_points(points))
    record_property("max_intensity", image_error)
    record_property("max_mm", point_error)
    assert image_error < IMAGE_TOL
    assert point_error < POINT_TOL


@pytest.mark.parametrize("name", GEOMETRIES)
def test_toolkits_read_the_grid_we_wrote(tmp_path: Path, name: str) -> None:
    fixed = GEOMETRIES[name]
    path = write_transform(TRANSFORM, tmp_path / "xfm.nii.gz", reference=fixed)
    expected_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ fixed.affine
    as_sitk = sitk.ReadImage(str(path))
    as_ants = ants.image_read(str(path))
    for origin, spacing, direction in (
        (as_sitk.GetOrigin(), as_sitk.GetSpacing(), as_sitk.GetDirection()),
        (as_ants.origin, as_ants.spacing, as_ants.direction),
    ):
        direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        np.testing.assert_allclose(origin, expected_lps[:3, 3], atol=1e-4)
        np.testing.assert_allclose(
            direction * np.asarray(spacing), expected_lps[:3, :3], atol=1e-5
        )
    header = nib.load(path).header
    assert nib.load(path).shape == (*SHAPE, 1, 3)
    assert int(header["intent_code"]) == 1007
    assert header.get_data_dtype() == np.float32
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-5)


# --------------------------------------------------------------------------- nitransforms


@pytest.mark.parametrize("suffix", (".nii.gz", ".h5"))
@pytest.mark.parametrize("name", GEOMETRIES)
def test_nitransforms_maps_points_like_regpipe(
    tmp_path: Path, name: str, suffix: str, record_property
) -> None:
    fixed = GEOMETRIES[name]
    path = write_transform(TRANSFORM, tmp_path / f"xfm{suffix}", reference=fixed)
    field = _field(name)
    if suffix == ".h5":
        theirs = nt.manip.load(str(path), fmt="h5")
    else:
        theirs = DenseFieldTransform.from_filename(str(path), fmt="itk")
    centres = _voxel_centres(fixed).reshape(-1, 3)
    on_grid = _max(theirs.map(centres) - field.map_points(centres))
    # nitransforms' spline prefilter assumes zeros beyond the edge: stay 3 voxels inside.
    points = _interior_points(fixed, margin=3.0)
    off_grid = _max(theirs.map(points) - field.map_points(points))
    record_property("on_grid_mm", on_grid)
    record_property("off_grid_mm", off_grid)
    assert on_grid < POINT_TOL
    assert off_grid < CUBIC_TOL


# --------------------------------------------------------------------------- identity trap


def _nonstandard_field(field: DisplacementField, form: str, path: Path) -> Path:
    """The field's LPS data saved the way ANTs silently ignores: 4-D or without intent."""
    lps = field.field.copy()
    lps[..., :2] *= -1
    data = lps if form == "4-D" else lps[:, :, :, None, :]
    image = nib.Nifti1Image(data, field.geometry.affine)
    image.set_sform(field.geometry.affine, code=1)
    image.set_qform(field.geometry.affine, code=1)
    if form == "4-D":
        image.header.set_intent("vector")
    nib.save(image, path)
    return path


@pytest.mark.parametrize("form", ["4-D", "intent 0"])
def test_ants_silently_applies_nonstandard_fields_as_identity(
    tmp_path: Path, form: str, record_property
) -> None:
    """The trap: no error, and ANTs resamples (almost everywhere) with the identity.

    antspyx 0.6.3 reads the array as a scalar image: ~98% of voxels are resampled exactly as
    with the identity and a few voxels in one corner get meaningless displacements.
    """
    fixed = GEOMETRIES["oblique"]
    field = _field("oblique")
    bad = _nonstandard_field(field, form, tmp_path / "bad.nii.gz")
    good = write_transform(field, tmp_path / "good.nii.gz")
    identity = warp_array(MOVING_DATA, MOVING, AffineTransform.identity(), fixed)
    warped = warp_array(MOVING_DATA, MOVING, field, fixed)
    mask = _interior_mask(fixed, field) & _interior_mask(fixed, AffineTransform.identity())
    from_bad = _ants_apply(tmp_path, fixed, bad)
    from_good = _ants_apply(tmp_path, fixed, good)
    as_identity = float(np.mean(np.abs(from_bad[mask] - identity[mask]) < IMAGE_TOL))
    as_warp = float(np.mean(np.abs(from_bad[mask] - warped[mask]) < IMAGE_TOL))
    record_property("fraction_as_identity", as_identity)
    assert as_identity > 0.9
    assert as_warp < 0.1
    # Our writer's output is applied as the transform it holds.
    assert _max(from_good[mask] - warped[mask]) < IMAGE_TOL


@pytest.mark.parametrize("form", ["4-D", "intent 0"])
def test_reader_refuses_nonstandard_fields(tmp_path: Path, form: str) -> None:
    field = _field("oblique")
    bad = _nonstandard_field(field, form, tmp_path / "bad.nii.gz")
    with pytest.raises(TransformFileError, match="identity"):
        read_transform(bad)
    read = read_transform(bad, allow_nonstandard=True)
    points = _interior_points(field.geometry)
    assert _max(read.map_points(points) - field.map_points(points)) < POINT_TOL


def test_reader_refuses_a_field_that_is_not_a_vector_image(tmp_path: Path) -> None:
    path = _save_image(np.zeros(SHAPE, np.float32), GEOMETRIES["RAS"], tmp_path / "x.nii.gz")
    with pytest.raises(TransformFileError, match="not a 3-D displacement field"):
        read_transform(path, allow_nonstandard=True)


# --------------------------------------------------------------------------- label maps


def test_label_map_nearest_keeps_dtype_and_values(tmp_path: Path, record_property) -> None:
    fixed = GEOMETRIES["oblique"]
    labels = np.digitize(MOVING_DATA, [-1.0, 0.0, 0.8, 1.5]).astype(np.int16)
    labels = np.array([0, 3, 7, 12, 1000], dtype=np.int16)[labels]
    path = write_transform(TRANSFORM, tmp_path / "xfm.nii.gz", reference=fixed)
    read = read_transform(path)
    ours = warp_array(labels, MOVING, read, fixed, interpolation="nearest")
    assert ours.dtype == np.int16
    assert set(np.unique(ours)) <= set(np.unique(labels))
    theirs = _ants_apply(
        tmp_path, fixed, path, moving=labels.astype(np.float32), interpolator="nearestNeighbor"
    )
    mask = _interior_mask(fixed, read)
    agreement = float(np.mean(ours[mask] == theirs[mask]))
    record_property("agreement", agreement)
    assert agreement > 0.99  # ties at exactly half-voxel positions may round differently


# --------------------------------------------------------------------------- affines


@pytest.mark.parametrize("name", GEOMETRIES)
def test_ants_reads_and_applies_our_affine(tmp_path: Path, name: str, record_property) -> None:
    fixed = GEOMETRIES[name]
    affine = AffineTransform(_affine_matrix())
    path = write_transform(affine, tmp_path / "xfm.mat")
    ants_transform = ants.read_transform(str(path))
    points = _interior_points(fixed)
    theirs = lps_to_ras(
        np.array([ants_transform.apply_to_point(tuple(p)) for p in ras_to_lps(points)])
    )
    point_error = _max(theirs - affine.map_points(points))
    warped = _ants_apply(tmp_path, fixed, path)
    ours = warp_array(MOVING_DATA, MOVING, affine, fixed)
    mask = _interior_mask(fixed, affine)
    image_error = _max(ours[mask] - warped[mask])
    record_property("max_mm", point_error)
    record_property("max_intensity", image_error)
    assert point_error < POINT_TOL  # antspyx reads in float precision
    assert image_error < IMAGE_TOL


@pytest.mark.parametrize("suffix", AFFINE_SUFFIXES)
def test_simpleitk_and_nitransforms_read_our_affine(tmp_path: Path, suffix: str) -> None:
    affine = AffineTransform(_affine_matrix())
    path = write_transform(affine, tmp_path / f"xfm{suffix}")
    points = _interior_points(GEOMETRIES["RAS"])
    sitk_points = _sitk_map(sitk.ReadTransform(str(path)), points)
    np.testing.assert_allclose(sitk_points, affine.map_points(points), atol=1e-9)
    nt_affine = nt.linear.load(str(path), fmt="itk")
    np.testing.assert_allclose(nt_affine.matrix, affine.matrix, atol=1e-5)  # float32 inside


def _tiny_pair(tmp_path: Path) -> tuple[Geometry, Geometry, ants.ANTsImage, ants.ANTsImage]:
    """Two smooth blobs, offset from each other, on oblique grids, as ANTs images.

    The moving grid covers the fixed one whatever affine ANTs finds (its runs are not
    deterministic), so the comparisons below always have most voxels to compare.
    """
    fixed, moving = GEOMETRIES["oblique"], MOVING

    def blob(geometry: Geometry, centre: tuple[float, float, float]) -> NDArray[np.float32]:
        d = _voxel_centres(geometry) - np.asarray(centre)
        return np.exp(-(d**2 / np.array([60.0, 40.0, 30.0])).sum(-1)).astype(np.float32)

    fixed_img = ants.image_read(
        str(_save_image(blob(fixed, (0, 0, 0)), fixed, tmp_path / "f.nii.gz"))
    )
    moving_img = ants.image_read(
        str(_save_image(blob(moving, (1.5, -1.0, 2.0)), moving, tmp_path / "m.nii.gz"))
    )
    return fixed, moving, fixed_img, moving_img


def test_ants_registration_affine_is_read_as_the_same_mapping(tmp_path: Path) -> None:
    fixed, moving, fixed_img, moving_img = _tiny_pair(tmp_path)
    result = ants.registration(
        fixed_img, moving_img, type_of_transform="Affine", outprefix=str(tmp_path / "reg_")
    )
    path = Path(result["fwdtransforms"][0])
    ours = read_transform(path)
    assert isinstance(ours, AffineTransform)
    ants_transform = ants.read_transform(str(path))
    points = _interior_points(fixed)
    theirs = lps_to_ras(
        np.array([ants_transform.apply_to_point(tuple(p)) for p in ras_to_lps(points)])
    )
    assert _max(theirs - ours.map_points(points)) < POINT_TOL
    data = moving_img.numpy()
    warped = ants.apply_transforms(fixed_img, moving_img, [str(path)], whichtoinvert=[False])
    mask = _interior_mask(fixed, ours, moving)
    assert mask.mean() > 0.5
    ours_warped = warp_array(data, moving, ours, fixed)
    assert _max(ours_warped[mask] - warped.numpy()[mask]) < IMAGE_TOL


def test_ants_syn_composite_is_read_in_itk_order(tmp_path: Path, record_property) -> None:
    fixed, moving, fixed_img, moving_img = _tiny_pair(tmp_path)
    result = ants.registration(
        fixed_img,
        moving_img,
        type_of_transform="SyN",
        write_composite_transform=True,
        outprefix=str(tmp_path / "syn_"),
    )
    path = Path(result["fwdtransforms"])
    ours = read_transform(path)
    assert isinstance(ours, ComposedTransform)
    assert [type(t) for t in ours.transforms] == [DisplacementField, AffineTransform]
    points = _interior_points(fixed)
    point_error = _max(_sitk_map(sitk.ReadTransform(str(path)), points) - ours.map_points(points))
    warped = ants.apply_transforms(fixed_img, moving_img, [str(path)], whichtoinvert=[False])
    mask = _interior_mask(fixed, ours, moving)
    assert mask.mean() > 0.5
    ours_warped = warp_array(moving_img.numpy(), moving, ours, fixed)
    image_error = _max(ours_warped[mask] - warped.numpy()[mask])
    record_property("max_mm", point_error)
    record_property("max_intensity", image_error)
    assert point_error < POINT_TOL
    assert image_error < IMAGE_TOL


# --------------------------------------------------------------------------- composites


def _sitk_field_transform(field: DisplacementField) -> sitk.Transform:
    """A field built independently of regpipe's writer: SimpleITK from LPS data."""
    lps = field.field.astype(np.float64)
    lps[..., :2] *= -1
    image = sitk.GetImageFromArray(lps.transpose(2, 1, 0, 3).copy(), isVector=True)
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ field.geometry.affine
    spacing = field.geometry.spacing
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine_lps[:3, 3].tolist())
    image.SetDirection((affine_lps[:3, :3] / spacing).ravel().tolist())
    return sitk.DisplacementFieldTransform(image)


def test_ants_like_composite_respects_itk_order(tmp_path: Path) -> None:
    fixed = GEOMETRIES["oblique"]
    field = _field("oblique")
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((_rotation(5, 0, -6) * 1.05).ravel().tolist())
    affine.SetTranslation((3.0, -2.0, 1.0))
    affine.SetCenter((10.0, 5.0, -4.0))
    composite = sitk.CompositeTransform([affine, _sitk_field_transform(field)])
    path = tmp_path / "Composite.h5"
    sitk.WriteTransform(composite, str(path))
    ours = read_transform(path)
    assert [type(t) for t in ours.transforms] == [DisplacementField, AffineTransform]
    points = _interior_points(fixed)
    expected = _sitk_map(composite, points)
    assert _max(ours.map_points(points) - expected) < POINT_TOL
    wrong_order = compose(*reversed(ours.transforms))
    assert _max(wrong_order.map_points(points) - expected) > 0.5
    chain = nt.manip.load(str(path), fmt="h5")
    points = _interior_points(fixed, margin=3.0)  # nitransforms' spline: away from the edge
    assert _max(chain.map(points) - _sitk_map(composite, points)) < CUBIC_TOL


def test_unigradicon_like_hdf5_composite_is_read(tmp_path: Path) -> None:
    """Versor/affine -> field on a unit network grid -> affine, as uniGradICON writes it."""
    fixed = GEOMETRIES["oblique"]
    n = (10, 9, 8)
    rng = np.random.default_rng(2)
    net = gaussian_filter(rng.standard_normal((*n, 3)), sigma=(2, 2, 2, 0))
    net *= 1.2 / np.abs(net).max()
    net_field = DisplacementField(
        Geometry(n, np.diag([-1.0, -1.0, 1.0, 1.0])), net.astype(np.float32)
    )  # RAS affine of ITK's identity grid (origin 0, spacing 1, identity LPS direction)
    to_network = sitk.VersorRigid3DTransform(
        (0.0, 0.0, np.sin(0.1), np.cos(0.1)), (-2.0, 3.0, 1.0), (4.0, 4.0, 3.5)
    )
    similarity = sitk.Similarity3DTransform(
        0.4, (0.0, 0.1, 0.0, np.cos(0.05)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    )
    from_network = sitk.AffineTransform(3)
    from_network.SetMatrix((_rotation(0, 10, 0) @ np.diag([2.2, 2.0, 2.4])).ravel().tolist())
    from_network.SetCenter((4.5, 4.0, 3.5))
    from_network.SetTranslation((-3.0, 1.0, 2.0))
    composite = sitk.CompositeTransform(
        [from_network, _sitk_field_transform(net_field), similarity, to_network]
    )  # ITK files hold one flat composite: applied versor, similarity, field, affine
    path = tmp_path / "unigradicon.hdf5"
    sitk.WriteTransform(composite, str(path))
    ours = read_transform(path)
    assert [type(t) for t in ours.transforms] == [
        AffineTransform,
        DisplacementField,
        AffineTransform,
    ]
    points = _interior_points(fixed, n=1000)
    # Keep points whose network position is a voxel inside the field's grid: within one voxel
    # of its edge regpipe's DisplacementField fades to zero where ITK clamps to the edge value.
    network = net_field.geometry.world_to_voxel(ours.transforms[0].map_points(points))
    inside = np.all((network >= 1) & (network <= np.asarray(n) - 2), axis=-1)
    assert inside.sum() > 50
    points = points[inside]
    assert _max(ours.map_points(points) - _sitk_map(composite, points)) < POINT_TOL


def test_centered_affine_composite_as_unigradicon_writes_it_is_read(tmp_path: Path) -> None:
    """uniGradICON 1.0.6 writes CenteredAffineTransform + field + CenteredAffineTransform,
    a linear type SimpleITK has no class for: it is read by its point mapping."""
    itk = pytest.importorskip("itk")
    n = (10, 9, 8)
    rng = np.random.default_rng(3)
    net = gaussian_filter(rng.standard_normal((*n, 3)), sigma=(2, 2, 2, 0))
    net_field = DisplacementField(Geometry(n, np.diag([-1.0, -1.0, 1.0, 1.0])),
                                  (net * 1.2 / np.abs(net).max()).astype(np.float32))
    field_file = tmp_path / "field.h5"
    sitk.WriteTransform(_sitk_field_transform(net_field), str(field_file))
    (field,) = itk.transformread(str(field_file))

    def centered(matrix: np.ndarray, center, translation):
        transform = itk.CenteredAffineTransform[itk.D, 3].New()
        transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(matrix, np.float64)))
        transform.SetCenter(center)
        transform.SetTranslation(translation)
        return transform

    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(centered(_rotation(0, 10, 0) @ np.diag([2.2, 2.0, 2.4]),
                                    (4.5, 4.0, 3.5), (-3.0, 1.0, 2.0)))
    composite.AddTransform(field)
    composite.AddTransform(centered(_rotation(5, 0, 8) * 0.45, (1.0, 2.0, 0.5),
                                    (4.0, 3.0, 3.0)))
    path = tmp_path / "unigradicon.hdf5"
    itk.transformwrite([composite], str(path))
    assert b"CenteredAffineTransform_double_3_3" in path.read_bytes()
    ours = read_transform(path)
    assert [type(t) for t in ours.transforms] == [AffineTransform, DisplacementField,
                                                  AffineTransform]
    fixed = GEOMETRIES["oblique"]
    points = _interior_points(fixed, n=1000)
    network = net_field.geometry.world_to_voxel(ours.transforms[0].map_points(points))
    points = points[np.all((network >= 1) & (network <= np.asarray(n) - 2), axis=-1)]
    assert len(points) > 50
    lps = points * [-1, -1, 1]
    expected = np.array([composite.TransformPoint(p.tolist()) for p in lps]) * [-1, -1, 1]
    assert _max(ours.map_points(points) - expected) < POINT_TOL


def test_empty_transform_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty.h5").touch()
    with pytest.raises(TransformFileError, match=r"empty\.h5 is empty \(0 bytes\)"):
        read_transform(tmp_path / "empty.h5")


def test_unsupported_itk_transform_is_refused(tmp_path: Path) -> None:
    reference = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    bspline = sitk.BSplineTransformInitializer(reference, [3, 3, 3])
    path = tmp_path / "bspline.h5"
    sitk.WriteTransform(sitk.CompositeTransform([bspline]), str(path))
    with pytest.raises(TransformFileError, match="BSpline"):
        read_transform(path)


def test_chain_of_affines_is_multiplied_out(tmp_path: Path) -> None:
    first = AffineTransform(_affine_matrix())
    second = AffineTransform(np.diag([1.1, 0.9, 1.0, 1.0]))
    chain = compose(first, second)
    read = read_transform(write_transform(chain, tmp_path / "xfm.txt"))
    np.testing.assert_allclose(read.matrix, second.matrix @ first.matrix, atol=1e-12)


# --------------------------------------------------------------------------- refusals


def test_non_field_transform_needs_a_reference(tmp_path: Path) -> None:
    with pytest.raises(TransformFileError, match="reference"):
        write_transform(TRANSFORM, tmp_path / "xfm.nii.gz")
    with pytest.raises(TransformFileError, match="reference"):
        write_transform(AffineTransform(_affine_matrix()), tmp_path / "xfm.nii.gz")
    assert os.listdir(tmp_path) == []


def test_affine_file_refuses_a_field(tmp_path: Path) -> None:
    with pytest.raises(TransformFileError, match="affine transforms only"):
        write_transform(_field("RAS"), tmp_path / "xfm.mat")
    assert os.listdir(tmp_path) == []


def test_non_finite_field_is_refused(tmp_path: Path) -> None:
    field = _field("RAS")
    data = field.field.copy()
    data[3, 4, 5, 1] = np.nan
    with pytest.raises(TransformFileError, match="NaN"):
        write_transform(DisplacementField(field.geometry, data), tmp_path / "xfm.h5")


def test_sheared_grid_is_written_on_an_orthogonal_grid_that_covers_it(tmp_path: Path,
                                                                     caplog) -> None:
    """ITK cannot store sheared axes (a CT with gantry tilt): the field goes on the smallest
    orthogonal grid around it, with the same values wherever the sheared grid has voxels,
    its outermost ones included (applying the file interpolates the cover there too)."""
    sheared_affine = GEOMETRIES["RAS"].affine.copy()
    sheared_affine[0, 1] = 0.3
    sheared = Geometry(SHAPE, sheared_affine)
    field = DisplacementField.from_transform(TRANSFORM, sheared)
    index = np.argwhere(np.ones(SHAPE, bool))
    border = ((index == 0) | (index == np.array(SHAPE) - 1)).any(axis=1)
    inside = sheared.voxel_to_world(index[border | (np.arange(len(index)) % 7 == 0)]
                                    .astype(float))
    # the transform itself, densified on the cover: as close as trilinear interpolation of
    # its values on the cover allows, at every voxel centre
    path = write_transform(TRANSFORM, tmp_path / "exact.h5", reference=sheared)
    np.testing.assert_allclose(read_transform(path).map_points(inside),
                               TRANSFORM.map_points(inside), atol=0.02)
    for suffix in (".nii.gz", ".h5"):  # only the field: its edge values extend outwards
        caplog.clear()
        path = write_transform(field, tmp_path / f"xfm{suffix}")
        assert "sheared" in caplog.text
        read = read_transform(path)
        assert read.geometry.same_as(orthogonal_cover(sheared), atol=1e-4)
        axes = read.geometry.direction_ras
        np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-6)
        # resampled twice (onto the cover, then at the centres): within 0.1 mm of this
        # curved transform (zeros blended in at the border gave errors of millimetres)
        np.testing.assert_allclose(read.map_points(inside), field.map_points(inside), atol=0.1)
        # the same through ITK: SimpleITK reads the grid regpipe wrote
        itk = sitk.ReadImage(str(path)) if suffix == ".nii.gz" else None
        if itk is not None:
            assert itk.GetSize() == read.geometry.shape
    path = write_transform(TRANSFORM, tmp_path / "ref.nii.gz", reference=GEOMETRIES["RAS"])
    assert read_transform(path).geometry.same_as(GEOMETRIES["RAS"], atol=1e-4)


def test_orthogonal_cover_holds_every_voxel_centre() -> None:
    affine = np.array([[0.9, 0.0, 0.0, -40.0], [0.0, 1.0, 0.35, 10.0],
                       [0.0, 0.0, 2.5, -60.0], [0, 0, 0, 1]])
    sheared = Geometry((40, 50, 20), affine)
    cover = orthogonal_cover(sheared)
    np.testing.assert_allclose(cover.spacing, sheared.spacing)
    np.testing.assert_allclose(cover.direction_ras.T @ cover.direction_ras, np.eye(3),
                               atol=1e-12)
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in sheared.shape],
                                   indexing="ij")).reshape(3, -1).T
    index = cover.world_to_voxel(sheared.voxel_to_world(corners.astype(float)))
    assert index.min() >= -1e-6 and (index <= np.array(cover.shape) - 1 + 1e-6).all()
    # and is the smallest: one voxel less on any side would leave a corner out
    assert (index.min(axis=0) < 1).all() and (index.max(axis=0) > np.array(cover.shape) - 2).all()
    assert orthogonal_cover(cover) is cover


def test_reader_refuses_a_sheared_sform(tmp_path: Path) -> None:
    """ITK reads the qform when the sform is sheared; nibabel would read the sform."""
    path = write_transform(_field("RAS"), tmp_path / "xfm.nii.gz")
    image = nib.load(path)
    sform = image.affine.copy()
    sform[0, 1] = 0.3
    image = nib.Nifti1Image(np.asarray(image.dataobj), sform, image.header)
    image.set_sform(sform, code=1)
    image.set_qform(GEOMETRIES["RAS"].affine, code=1)  # nibabel dropped it (sheared affine)
    nib.save(image, tmp_path / "sheared.nii.gz")
    with pytest.raises(TransformFileError, match="qform"):
        read_transform(tmp_path / "sheared.nii.gz")
    read = read_transform(tmp_path / "sheared.nii.gz", allow_nonstandard=True)
    as_itk = sitk.ReadImage(str(tmp_path / "sheared.nii.gz"))
    np.testing.assert_allclose(
        np.asarray(as_itk.GetOrigin()), ras_to_lps(read.geometry.affine[:3, 3]), atol=1e-4
    )
    np.testing.assert_allclose(read.geometry.affine, GEOMETRIES["RAS"].affine, atol=1e-5)


def test_reader_refuses_sform_voxel_sizes_that_differ_from_pixdim(tmp_path: Path) -> None:
    """ITK takes the voxel sizes from pixdim, nibabel from the sform: refused (ITK's reading
    with allow_nonstandard=False would place the field elsewhere)."""
    path = write_transform(_field("RAS"), tmp_path / "xfm.nii.gz")
    image = nib.load(path)
    image.set_qform(None, code=0)  # the sform alone places it
    image.header["pixdim"][1:4] *= 0.5
    nib.save(image, tmp_path / "half.nii.gz")
    spacing = sitk.ReadImage(str(tmp_path / "half.nii.gz")).GetSpacing()
    np.testing.assert_allclose(spacing, GEOMETRIES["RAS"].spacing * 0.5)  # ITK: pixdim
    with pytest.raises(TransformFileError, match=r"but its header \(pixdim\) says"):
        read_transform(tmp_path / "half.nii.gz")
    read = read_transform(tmp_path / "half.nii.gz", allow_nonstandard=True)
    np.testing.assert_allclose(read.geometry.affine, GEOMETRIES["RAS"].affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".h5"])
def test_reader_refuses_non_finite_displacements(tmp_path: Path, suffix: str) -> None:
    """ITK reads NaN displacements as none: those voxels would be warped by the identity."""
    path = write_transform(_field("RAS"), tmp_path / "xfm.nii.gz")
    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    data[:3, ..., 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine, image.header), tmp_path / "nan.nii.gz")
    if suffix == ".h5":  # a field in an ITK transform file, written by SimpleITK
        vectors = np.zeros((6, 5, 4, 3))  # SimpleITK's (z, y, x, component) order
        vectors[0, 0, 0] = np.nan
        field = sitk.GetImageFromArray(vectors, isVector=True)
        sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(tmp_path / "nan.h5"))
    with pytest.raises(TransformFileError, match=r"nan\.\S+ .*NaN or infinite displacements "
                                                 r"at \d+ of"):
        read_transform(tmp_path / f"nan{suffix}")


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransformFileError, match="unknown transform file type"):
        write_transform(AffineTransform.identity(), tmp_path / "xfm.json")
    with pytest.raises(TransformFileError, match="unknown transform file type"):
        read_transform(tmp_path / "xfm.json")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TransformFileError, match="does not exist"):
        read_transform(tmp_path / "absent.h5")


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TransformFileError, match=r"folder .* does not exist"):
        write_transform(AffineTransform.identity(), tmp_path / "absent" / "xfm.mat")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- atomic writes


def _fail_after_partial_write(path_argument_index: int):
    def failing(*args, **kwargs):
        Path(str(args[path_argument_index])).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    return failing


@pytest.mark.parametrize(
    ("suffix", "module", "name", "index"),
    [
        (".nii.gz", nib, "save", 1),
        (".h5", h5py, "File", 0),
        (".mat", transform_files.sitk, "WriteTransform", 1),
    ],
)
def test_failed_write_leaves_no_partial_or_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, module, name: str, index: int
) -> None:
    target = tmp_path / f"xfm{suffix}"
    target.write_bytes(b"previous")
    monkeypatch.setattr(module, name, _fail_after_partial_write(index))
    transform = AffineTransform(_affine_matrix())
    with pytest.raises(TransformFileError, match="disk full"):
        write_transform(transform, target, reference=GEOMETRIES["RAS"])
    assert os.listdir(tmp_path) == [target.name]
    assert target.read_bytes() == b"previous"


def test_successful_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "xfm.h5"
    target.write_bytes(b"previous")
    write_transform(_field("LIA"), target)
    assert os.listdir(tmp_path) == [target.name]
    assert isinstance(read_transform(target), DisplacementField)


def test_upper_case_suffixes_are_refused_for_writing(tmp_path: Path) -> None:
    with pytest.raises(TransformFileError, match="lower case"):
        write_transform(AffineTransform(np.eye(4)), tmp_path / "x.MAT")
    assert list(tmp_path.iterdir()) == []
