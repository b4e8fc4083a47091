"""Image loading: geometry from every format, and clear refusals of bad input."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regpipe.errors import InputError
from regpipe.imageio import Image, load_image, read_grid, save_image
from regpipe.spaces import Geometry
from tests.conftest import make_affine


def write_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def test_nifti_geometry_is_kept(tmp_path):
    affine = make_affine("oblique")
    data = np.random.default_rng(0).random((24, 20, 16)).astype(np.float32)
    image = load_image(write_nifti(tmp_path / "a.nii.gz", data, affine))
    assert np.allclose(image.geometry.affine, affine, atol=1e-5)
    assert np.array_equal(image.data, data)


def test_itk_formats_convert_lps_to_ras(tmp_path):
    affine = make_affine("anisotropic")
    data = np.random.default_rng(0).random((24, 20, 16)).astype(np.float32)
    write_nifti(tmp_path / "a.nii.gz", data, affine)
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")), str(tmp_path / "a.mha"))
    image = load_image(tmp_path / "a.mha")
    assert np.allclose(image.geometry.affine, affine, atol=1e-4)
    assert np.allclose(image.data, data)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_are_written_with_their_lps_geometry(tmp_path, suffix):
    affine = make_affine("oblique") @ np.diag([1.0, 1.5, 2.5, 1.0])
    data = np.random.default_rng(0).integers(-500, 500, (24, 20, 16)).astype(np.int16)
    path = save_image(Image(data, Geometry(data.shape, affine)), tmp_path / f"a{suffix}")
    back = load_image(path)
    assert np.allclose(back.geometry.affine, affine, atol=1e-5)
    assert np.array_equal(back.data, data) and back.data.dtype == np.int16
    # what ITK itself reads from it equals what it reads from the same image as NIfTI
    write_nifti(tmp_path / "a.nii.gz", data, affine)
    ours, nifti = sitk.ReadImage(str(path)), sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert np.allclose(ours.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
    assert np.allclose(ours.GetDirection(), nifti.GetDirection(), atol=1e-5)
    assert np.allclose(ours.GetSpacing(), nifti.GetSpacing(), atol=1e-5)
    sheared = affine.copy()
    sheared[0, 1] += 0.4
    with pytest.raises(InputError, match="sheared"):
        save_image(Image(data, Geometry(data.shape, sheared)), tmp_path / f"b{suffix}")
    assert not (tmp_path / f"b{suffix}").exists()


def test_read_grid_reads_headers_like_load_image(tmp_path):
    affine = make_affine("oblique")
    data = np.random.default_rng(0).random((24, 20, 16)).astype(np.float32)
    path = write_nifti(tmp_path / "a.nii.gz", data, affine)
    assert read_grid(path).same_as(load_image(path).geometry, atol=1e-6)
    sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp_path / "a.mha"))
    assert read_grid(tmp_path / "a.mha").same_as(load_image(tmp_path / "a.mha").geometry,
                                                 atol=1e-6)
    one_volume = write_nifti(tmp_path / "b.nii.gz", data[..., None], affine)
    assert read_grid(one_volume).shape == (24, 20, 16)
    with pytest.raises(InputError, match="4-D series"):
        read_grid(write_nifti(tmp_path / "c.nii.gz", np.stack([data, data], -1), affine))
    with pytest.raises(InputError, match="shape"):
        read_grid(write_nifti(tmp_path / "d.nii.gz", data[:, :, 0], affine))
    (tmp_path / "e.nii.gz").symlink_to(".git/annex/objects/x/y.nii.gz")
    with pytest.raises(InputError, match="datalad get"):
        read_grid(tmp_path / "e.nii.gz", "moving image")
    (tmp_path / "f.nii.gz").write_bytes(b"\x1f\x8b not an image at all")
    with pytest.raises(InputError, match="cannot be read as an image"):
        read_grid(tmp_path / "f.nii.gz")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "nope.nii.gz", what="fixed image")


def test_empty_placeholder(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="0 bytes"):
        load_image(tmp_path / "empty.nii.gz")


def test_dangling_annex_link(tmp_path):
    link = tmp_path / "sub-01_T1w.nii.gz"
    os.symlink("../.git/annex/objects/XX/YY/SHA256E-s1--abc.nii.gz", link)
    with pytest.raises(InputError, match="git-annex"):
        load_image(link)


def test_annex_pointer_file(tmp_path):
    path = tmp_path / "a.nii.gz"
    path.write_text("/annex/objects/SHA256E-s1234--deadbeef.nii.gz\n")
    with pytest.raises(InputError, match="git-annex"):
        load_image(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "a.nii.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(4000))
    with pytest.raises(InputError, match="cannot be read"):
        load_image(path)


def test_4d_image_refused(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", np.random.default_rng(0).random((8, 8, 8, 3)))
    with pytest.raises(InputError, match="3-D"):
        load_image(path)


def test_singleton_4th_axis_accepted(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", np.random.default_rng(0).random((8, 8, 8, 1)))
    assert load_image(path).data.shape == (8, 8, 8)


def test_constant_image_refused(tmp_path):
    with pytest.raises(InputError, match="constant"):
        load_image(write_nifti(tmp_path / "a.nii.gz", np.ones((8, 8, 8), np.float32)))


def test_nan_image_refused(tmp_path):
    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.inf
    with pytest.raises(InputError, match="2 NaN or infinite"):
        load_image(write_nifti(tmp_path / "a.nii.gz", data))


def test_empty_mask_refused(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_image(write_nifti(tmp_path / "m.nii.gz", np.zeros((8, 8, 8), np.uint8)), "mask")


def test_a_mask_with_a_nan_background_counts_it_as_outside(tmp_path, caplog):
    data = np.full((8, 8, 8), np.nan, np.float32)
    data[2:4, 2:4, 2:4] = 1.0
    with caplog.at_level("WARNING", logger="regpipe"):
        mask = load_image(write_nifti(tmp_path / "m.nii.gz", data), "mask")
    assert np.count_nonzero(mask.data) == 8  # not 512: NaN != 0 is True
    assert "holds 504 NaN or infinite voxels: counted as outside" in caplog.text


def test_an_image_without_sform_or_qform_is_warned_about(tmp_path, caplog):
    image = nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 8)).astype(np.float32), None)
    nib.save(image, tmp_path / "nocode.nii.gz")
    with caplog.at_level("WARNING", logger="regpipe"):
        load_image(tmp_path / "nocode.nii.gz")
    assert "neither its sform nor its qform is set" in caplog.text


def test_a_nibabel_image_in_memory_keeps_its_header():
    image = nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 8)).astype(np.float32),
                            np.diag([2.0, 2.0, 2.0, 1.0]))
    image.set_sform(image.affine, code=4)  # MNI space: the outputs keep the code
    loaded = load_image(image)
    assert loaded.header is not None and int(loaded.header["sform_code"]) == 4


def test_float_labels_must_be_integral(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[2, 2, 2] = 1.5
    with pytest.raises(InputError, match="non-integer"):
        load_image(write_nifti(tmp_path / "s.nii.gz", data), "labels")


def test_save_image_round_trip(tmp_path):
    geometry = Geometry((6, 5, 4), make_affine("LIA", (6, 5, 4)))
    data = np.arange(120, dtype=np.int16).reshape(6, 5, 4)
    save_image(Image(data, geometry), tmp_path / "x.nii.gz")
    back = load_image(tmp_path / "x.nii.gz", "labels")
    assert back.data.dtype == np.int16 and np.array_equal(back.data, data)
    assert back.geometry.same_as(geometry)


@pytest.mark.parametrize(("data", "stored"), [
    (np.arange(24, dtype=np.int64).reshape(2, 3, 4) * 1000, np.int32),
    (np.ones((2, 3, 4), dtype=bool), np.uint8),
    (np.full((2, 3, 4), 2**40, dtype=np.int64), np.float64),
])
def test_label_maps_of_any_integer_type_are_saved(tmp_path, data, stored):
    """numpy's int64 (and bool masks) are not NIfTI types: stored losslessly in one that is."""
    geometry = Geometry((2, 3, 4), np.eye(4))
    path = save_image(Image(data, geometry), tmp_path / "labels.nii.gz")
    back = nib.load(path)
    assert back.get_data_dtype() == stored
    assert np.array_equal(np.asarray(back.dataobj), data.astype(stored))


def test_sform_and_qform_that_disagree_are_warned_about(tmp_path, caplog):
    data = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    image = nib.Nifti1Image(data, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 10.0
    image.set_sform(np.eye(4), code=2)
    image.set_qform(shifted, code=1)
    nib.save(image, tmp_path / "two_forms.nii.gz")
    load_image(tmp_path / "two_forms.nii.gz")
    assert "sform and qform place the image up to 10 mm apart" in caplog.text
    caplog.clear()
    load_image(write_nifti(tmp_path / "one.nii.gz", data))
    assert "sform and qform" not in caplog.text


def test_single_volume_4d_itk_image_reads_like_the_nifti_one(tmp_path):
    volume = np.random.default_rng(0).random((1, 5, 6, 7)).astype(np.float32)
    image = sitk.GetImageFromArray(volume, isVector=False)
    image.SetSpacing((2.0, 3.0, 4.0, 1.0))
    image.SetOrigin((10.0, 20.0, 30.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "one_volume.mha"))
    loaded = load_image(tmp_path / "one_volume.mha")
    assert loaded.data.shape == (7, 6, 5)
    assert read_grid(tmp_path / "one_volume.mha").same_as(loaded.geometry, atol=1e-9)
    np.testing.assert_allclose(loaded.geometry.spacing, [2.0, 3.0, 4.0])


def test_sform_voxel_sizes_that_pixdim_contradicts_are_warned(tmp_path, caplog):
    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    image.set_qform(None, code=0)
    image.header.set_zooms((1.0, 1.0, 1.0))  # what ITK reads
    nib.save(image, str(tmp_path / "a.nii.gz"))
    with caplog.at_level("WARNING", logger="regpipe"):
        loaded = load_image(tmp_path / "a.nii.gz")
    assert np.allclose(loaded.geometry.spacing, 2.0)
    assert "sizes [2.0, 2.0, 2.0] but its header (pixdim) says [1.0, 1.0, 1.0]" in caplog.text


def test_a_single_slice_is_refused_saying_what_is_needed(tmp_path):
    write_nifti(tmp_path / "s.nii.gz", np.ones((20, 20, 1), np.float32))
    with pytest.raises(InputError, match="3-D volumes with at least 2 voxels along each axis"):
        load_image(tmp_path / "s.nii.gz")
