"""Reading and writing images, with the checks that keep bad input out of a registration.

Everything that comes back is an :class:`Image`: an array in nibabel voxel order ``(i, j, k)``
and its :class:`~regpipe.spaces.Geometry` (RAS+ mm). NIfTI and Analyze files are read with
nibabel; other formats ITK reads (``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``) with SimpleITK,
converting ITK's LPS geometry to RAS.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from regpipe.atomic import atomic_write
from regpipe.errors import InputError
from regpipe.spaces import Geometry

LOGGER = logging.getLogger("regpipe")
ImageKind = Literal["image", "mask", "labels", "any"]
_ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


@dataclass(frozen=True, eq=False)
class Image:
    """A 3-D image: ``data[i, j, k]`` on ``geometry``; ``path`` when it came from a file."""

    data: NDArray[np.generic] = field(repr=False)  # a notebook's repr: no array dump
    geometry: Geometry
    path: Path | None = None
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "<in-memory image>"

    @property
    def xform_code(self) -> int:
        """NIfTI code of the space the grid is in: the source header's sform (else qform)
        code, such as 4 (MNI) for a TemplateFlow template; 1 (scanner) without one."""
        if self.header is not None:
            for key in ("sform_code", "qform_code"):
                code = int(self.header[key])
                if code > 0:
                    return code
        return 1

    def to_nifti(self, dtype: np.dtype | None = None) -> nib.Nifti1Image:
        """A NIfTI image with this data and geometry (sform and qform codes
        :attr:`xform_code`: outputs on a template's grid keep the template's space code)."""
        data = self.data if dtype is None else self.data.astype(dtype)
        data = _nifti_storable(np.asarray(data))
        image = nib.Nifti1Image(data, self.geometry.affine)
        image.set_sform(self.geometry.affine, code=self.xform_code)
        image.set_qform(self.geometry.affine, code=self.xform_code)
        image.header.set_xyzt_units("mm")
        return image


def _nifti_storable(data: NDArray[np.generic]) -> NDArray[np.generic]:
    """``data`` in a type NIfTI files hold: booleans as uint8, 64-bit integers (numpy's default
    for label maps) as int32 or uint32 when the values fit, else float64."""
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
        for kind in (np.int32, np.uint32):
            info = np.iinfo(kind)
            if info.min <= low and high <= info.max:
                return data.astype(kind)
        return data.astype(np.float64)
    return data


ImageLike = str | os.PathLike | nib.spatialimages.SpatialImage | Image


def check_readable_file(path: Path, what: str = "image") -> None:
    """Fail clearly on missing, empty, dangling-link and git-annex placeholder files."""
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        hint = (" (a git-annex file whose content is not present: run `datalad get` or "
                "`git annex get`)") if "annex" in target else ""
        raise InputError(f"{what} {path} is a dangling symbolic link to {target}{hint}")
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{what} {path} is empty (0 bytes): a placeholder, not an image")
    if size < 1024:
        head = path.read_bytes()[:512]
        if b"annex/objects" in head:
            raise InputError(
                f"{what} {path} is a git-annex pointer file, not an image: fetch its content "
                "with `datalad get` or `git annex get`"
            )
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permissions)")


def load_image(source: ImageLike, kind: ImageKind = "image", what: str | None = None) -> Image:
    """Load and validate a 3-D image.

    Parameters
    ----------
    source
        A path, a nibabel image or an :class:`Image`.
    kind
        ``"image"`` (float intensities; must be finite and non-constant), ``"mask"`` (any
        values, non-zero = inside; must not be empty), ``"labels"`` (integer labels) or
        ``"any"`` (any 3-D content: what resampling accepts).
    what
        Name used in error messages (``"fixed image"``, ``"moving mask"``...).

    Raises
    ------
    InputError
        For anything regpipe cannot register, with the reason in the message.
    """
    what = what or kind
    if isinstance(source, Image):
        image = source
    elif isinstance(source, nib.spatialimages.SpatialImage):
        try:
            header = source.header if isinstance(source, nib.Nifti1Image) else None
            image = Image(np.asanyarray(source.dataobj), Geometry.from_image(source),
                          header=header)  # its space codes go on to the outputs
        except ValueError as error:  # a 2-D image, no affine...
            raise InputError(f"{what}: {error}") from None
        if image.header is not None:
            _warn_forms_differ(image.header, f"{what} (in memory)")
    elif isinstance(source, (str, os.PathLike)):
        image = _read_file(Path(source), what)
    else:
        raise InputError(
            f"{what} must be a file path, a nibabel image or a regpipe Image, not "
            f"{type(source).__name__}"
            + (" (wrap an array with its grid: regpipe.imageio.Image(data, Geometry(shape, "
               "affine)))" if isinstance(source, np.ndarray) else "")
        )
    return _validate(image, kind, what)


def _read_file(path: Path, what: str) -> Image:
    check_readable_file(path, what)
    name = path.name.lower()
    try:
        if name.endswith(_ITK_SUFFIXES):
            return _read_itk(path)
        loaded = nib.load(str(path))
        if not isinstance(loaded, nib.spatialimages.SpatialImage):
            raise TypeError(f"{type(loaded).__name__} is not a spatial image")
        data = np.asanyarray(loaded.dataobj)
    except InputError:
        raise
    except Exception as error:  # nibabel and zlib raise many unrelated types
        raise InputError(f"{what} {path} cannot be read as an image: {error}") from error
    try:
        geometry = Geometry.from_image(loaded)
    except ValueError as error:  # a 2-D image
        raise InputError(f"{what} {path}: {error}") from None
    header = loaded.header if isinstance(loaded, nib.Nifti1Image) else None
    if header is not None:  # a 3-D grid, checked just above
        _warn_forms_differ(header, path)
    return Image(np.asarray(data), geometry, path, header)


def _warn_forms_differ(header: nib.Nifti1Header, path: Path | str) -> None:
    """A NIfTI whose sform and qform place the image differently: regpipe (like nibabel) uses
    the sform, ITK-based tools may use the qform, so they would disagree about this image; or
    that has neither (both codes 0), which nibabel and ITK place differently."""
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if not scode and not qcode:
        LOGGER.warning(
            "%s: neither its sform nor its qform is set (codes 0): nibabel and regpipe place it "
            "centred on the origin with its voxel sizes, ITK and ANTs at origin 0 along LPS, "
            "so transforms applied to it by those tools would not match: set its sform", path)
    if scode and qcode and sform is not None and qform is not None:
        corners = np.array([[i, j, k, 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        corners[:, :3] *= np.asarray(header.get_data_shape()[:3], dtype=np.float64) - 1
        gap = float(np.abs((sform - qform) @ corners.T).max())
        if gap > 0.01:
            LOGGER.warning(
                "%s: its sform and qform place the image up to %.3g mm apart; regpipe uses the "
                "sform (as nibabel does), ITK and ANTs may use the qform, so transforms "
                "applied to it by those tools would not match: set both to the same matrix",
                path, gap)
    mismatch = sform_pixdim_mismatch(header)
    if mismatch is not None:
        LOGGER.warning(
            "%s: its sform has voxel sizes %s but its header (pixdim) says %s; regpipe uses "
            "the sform (as nibabel does), ITK and ANTs use pixdim, so they would place the "
            "image differently: fix the header", path, *mismatch)


def sform_pixdim_mismatch(header: nib.Nifti1Header) -> tuple[list[float], list[float]] | None:
    """``(sform voxel sizes, pixdim)`` of a NIfTI header whose coded sform has other voxel
    sizes than its ``pixdim`` (ITK takes the sizes from ``pixdim`` and only the directions from
    the sform; nibabel the sform), else ``None``."""
    sform, scode = header.get_sform(coded=True)
    if not scode or sform is None:
        return None
    columns = np.linalg.norm(sform[:3, :3], axis=0)
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    if np.all(np.abs(columns - zooms) <= 0.01 * np.maximum(zooms, 1e-6)):
        return None
    return np.round(columns, 4).tolist(), np.round(zooms, 4).tolist()


def _read_itk(path: Path) -> Image:
    import SimpleITK as sitk

    itk_image = sitk.ReadImage(str(path))
    if itk_image.GetDimension() == 4 and itk_image.GetSize()[3] == 1:  # one volume, as NIfTI
        itk_image = sitk.Extract(itk_image, [*itk_image.GetSize()[:3], 0], [0, 0, 0, 0])
    if itk_image.GetDimension() != 3 or itk_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} is not a scalar 3-D image")
    data = sitk.GetArrayFromImage(itk_image).transpose(2, 1, 0)
    return Image(np.ascontiguousarray(data), Geometry(data.shape, _ras_affine(itk_image)), path)


def _ras_affine(itk_image) -> NDArray[np.float64]:
    """Voxel -> RAS+ matrix of a SimpleITK image or image file reader (LPS direction)."""
    n = itk_image.GetDimension()  # the first three axes of a 4-D (one-volume) image too
    direction = np.asarray(itk_image.GetDirection()).reshape(n, n)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(itk_image.GetSpacing()[:3])
    affine[:3, 3] = itk_image.GetOrigin()[:3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS


def read_grid(path: str | os.PathLike, what: str = "image") -> Geometry:
    """The voxel grid of a 3-D image file, from its header alone (no voxel data is read).

    For checking many inputs before any work (the BIDS App does, for every selected file):
    raises :class:`InputError` for what :func:`load_image` would refuse without reading the
    data: a missing, empty, dangling-link or git-annex placeholder file, an unreadable header,
    a 2-D image or a 4-D series.
    """
    path = Path(path)
    check_readable_file(path, what)
    try:
        if path.name.lower().endswith(_ITK_SUFFIXES):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            if reader.GetNumberOfComponents() != 1:
                raise InputError(f"{what} {path} is not a scalar image")
            shape = tuple(int(n) for n in reader.GetSize())
            affine = _ras_affine(reader) if len(shape) >= 3 else np.eye(4)
        else:
            loaded = nib.load(str(path))
            if not isinstance(loaded, nib.spatialimages.SpatialImage):
                raise TypeError(f"{type(loaded).__name__} is not a spatial image")
            shape = tuple(int(n) for n in loaded.shape)
            affine = loaded.affine
    except InputError:
        raise
    except Exception as error:  # nibabel, SimpleITK and zlib raise many unrelated types
        raise InputError(f"{what} {path} cannot be read as an image: {error}") from error
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise InputError(
            f"{what} {path} has shape {shape}: regpipe registers 3-D images; select one "
            "volume of a 4-D series first (e.g. `fslroi` or nibabel slicing)"
        )
    if min(shape[:3]) < 2:
        raise InputError(f"{what} {path} has shape {shape}: regpipe registers 3-D volumes "
                         "with at least 2 voxels along each axis (not single slices)")
    try:
        return Geometry((shape[0], shape[1], shape[2]), np.asarray(affine, dtype=np.float64))
    except ValueError as error:
        raise InputError(f"{what} {path}: {error}") from None


def _validate(image: Image, kind: ImageKind, what: str) -> Image:
    data = np.asarray(image.data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3:] == (1, 1):
        data = data[..., 0, 0]
    if data.ndim != 3:
        raise InputError(
            f"{what} {image.name} has shape {data.shape}: regpipe registers 3-D images; "
            "select one volume of a 4-D series first (e.g. `fslroi` or nibabel slicing)"
        )
    if data.shape != tuple(image.geometry.shape):
        raise InputError(f"{what} {image.name}: its data has shape {data.shape} but its grid "
                         f"{tuple(image.geometry.shape)}")
    if min(data.shape) < 2:
        raise InputError(f"{what} {image.name} has shape {data.shape}: regpipe registers 3-D "
                         "volumes with at least 2 voxels along each axis (not single slices)")
    if data.dtype.kind not in "biuf":
        raise InputError(f"{what} {image.name} has unsupported voxel type {data.dtype}")
    if kind == "labels":
        if data.dtype.kind == "f":
            if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
                raise InputError(f"{what} {image.name} holds non-integer values: not a label map")
            data = data.astype(np.int32)
    elif kind == "any":
        pass
    elif kind == "mask":
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            # NaN != 0 would count as inside: a mask saved with a NaN background would cover
            # the whole image
            LOGGER.warning("%s %s holds %d NaN or infinite voxels: counted as outside", what,
                           image.name, int(np.size(data) - np.count_nonzero(np.isfinite(data))))
            data = np.where(np.isfinite(data), data, 0)
        if not np.any(data):
            raise InputError(f"{what} {image.name} is empty (no non-zero voxel)")
    else:
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            raise InputError(f"{what} {image.name} contains {bad} NaN or infinite voxels")
        if data.size and float(data.max()) == float(data.min()):
            raise InputError(f"{what} {image.name} is constant ({data.flat[0]}): nothing to align")
    return Image(data, image.geometry, image.path, image.header)


def check_same_grid(image: Image, mask: Image, what: str) -> None:
    """A mask must share its image's voxel grid."""
    if not image.geometry.same_as(mask.geometry, atol=1e-3):
        raise InputError(
            f"{what} {mask.name} is on a different grid ({mask.geometry.shape}) than its image "
            f"{image.name} ({image.geometry.shape}); resample it onto the image first"
        )


#: Suffixes images are written with: NIfTI (the native one) and MGH through nibabel, and the
#: single-file ITK formats MetaImage and NRRD through SimpleITK, as ``unigradicon-register``
#: writes them (``.mhd``/``.nhdr`` keep their voxels in a second file and are not written).
OUTPUT_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".mha", ".nrrd")
_ITK_OUTPUT_SUFFIXES = (".mha", ".nrrd")


def check_image_path(path: str | os.PathLike, geometry: Geometry | None = None) -> None:
    """Raise :class:`InputError` unless ``path`` ends with one of :data:`OUTPUT_IMAGE_SUFFIXES`
    and, given the ``geometry`` the image will have, that format can hold it (ITK's ``.mha``
    and ``.nrrd`` cannot hold a sheared grid)."""
    name = Path(path).name
    if not name.lower().endswith(OUTPUT_IMAGE_SUFFIXES):
        raise InputError(f"{path}: images are written as {', '.join(OUTPUT_IMAGE_SUFFIXES)}")
    if not name.endswith(OUTPUT_IMAGE_SUFFIXES):
        raise InputError(f"{path}: write the suffix in lower case (nibabel and ITK choose the "
                         "format by it, case-sensitively, and could not read the file back)")
    if geometry is not None and name.endswith(_ITK_OUTPUT_SUFFIXES) and _sheared(geometry):
        raise InputError(f"{path}: the image's grid has sheared voxel axes, which ITK images "
                         "(.mha, .nrrd) cannot hold; write it as .nii.gz")


def _sheared(geometry: Geometry) -> bool:
    linear = np.asarray(geometry.affine, dtype=np.float64)[:3, :3]
    direction = linear / np.linalg.norm(linear, axis=0)
    return not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6)


def save_image(image: Image, path: str | os.PathLike, dtype: np.dtype | None = None) -> Path:
    """Write ``image`` atomically as NIfTI, MGH, MetaImage (``.mha``) or NRRD, by the suffix."""
    check_image_path(path)
    if Path(path).name.lower().endswith(_ITK_OUTPUT_SUFFIXES):
        itk_image = _itk_image(image, dtype)
        import SimpleITK as sitk

        return atomic_write(path, lambda tmp: sitk.WriteImage(itk_image, str(tmp), True))
    nifti = image.to_nifti(dtype)
    return atomic_write(path, lambda tmp: nib.save(nifti, str(tmp)))


def _itk_image(image: Image, dtype: np.dtype | None = None):
    """A SimpleITK image (LPS geometry) of ``image``; sheared grids, which ITK images cannot
    hold, are refused."""
    import SimpleITK as sitk

    data = np.asarray(image.data if dtype is None else image.data.astype(dtype))
    data = _nifti_storable(data)  # no int64 or bool voxels, as in NIfTI
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.geometry.affine  # RAS -> LPS
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    if _sheared(image.geometry):
        raise InputError(f"{image.name}: its voxel axes are sheared, which ITK images (.mha, "
                         ".nrrd) cannot hold; write it as .nii.gz")
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    itk_image.SetSpacing(spacing.tolist())
    itk_image.SetDirection(direction.ravel().tolist())
    itk_image.SetOrigin(affine[:3, 3].tolist())
    return itk_image
