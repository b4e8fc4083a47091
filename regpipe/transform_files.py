"""Transform files: read and write what ANTs, ITK, SimpleITK and nitransforms exchange.

Every file written here holds a **pull-back** transform, fixed -> moving, exactly like the
in-memory transforms of :mod:`regpipe.transforms`: resampling the moving image onto the fixed
grid samples ``moving`` at ``T(x)``. ITK and ANTs keep points, displacements and matrices in
**LPS+** millimetres; regpipe keeps them in **RAS+** millimetres; the conversion happens only
here (through :mod:`regpipe.spaces`).

Formats (see :func:`supported_formats`):

``itk-nifti-field`` (``.nii.gz``, ``.nii``)
    ANTs' displacement-field NIfTI: 5-D ``(X, Y, Z, 1, 3)`` float32, intent code 1007
    (``vector``), LPS mm displacements, on the field's grid (sform and qform, codes 1).
    Anything else (a 4-D ``(X, Y, Z, 3)`` array, intent 0) is what ANTs silently applies as
    the *identity*, so the reader refuses it unless ``allow_nonstandard=True``.
``itk-hdf5`` (``.h5``, ``.hdf5``)
    ITK's HDF5 transform file. Written as a ``CompositeTransform`` holding one
    ``DisplacementFieldTransform_double_3_3`` (or one ``AffineTransform_double_3_3`` for an
    affine given without a reference grid): the composite wrapper is what ANTs writes and what
    nitransforms (``nt.manip.load(..., fmt="h5")``, as fMRIPrep calls it) expects. Read: any
    composite of linear transforms and displacement fields that SimpleITK reads (ANTs'
    ``Composite.h5``; uniGradICON's ``CenteredAffineTransform`` + field +
    ``CenteredAffineTransform`` ``.hdf5``, whose linear parts SimpleITK has no class for and
    which are read by their point mapping).
``itk-affine`` (``.mat``, ``.txt``, ``.tfm``)
    ITK's MATLAB-v4 and text affine files, as ANTs' ``0GenericAffine.mat``. Written with centre
    ``0`` (translation = offset); read with any centre (ITK's ``FixedParameters``).

Grids with sheared (non-orthogonal) voxel axes cannot be stored as they are: ITK images have
orthonormal direction cosines only, and ITK silently falls back to the NIfTI qform (a
*different*, orthogonalised grid) when the sform is sheared. A field on such a grid (a CT with
gantry tilt) is written on the smallest orthogonal grid that covers it
(:func:`~regpipe.spaces.orthogonal_cover`: same voxel sizes, the field trilinearly resampled,
zero outside the original grid as ITK assumes there anyway), with a warning; pass an
orthogonal ``reference=`` to choose the grid yourself. Axes orthogonal to 1e-4 (float32
rounding in real headers) are accepted and written orthonormalised, so every tool reads the
same grid.

Example
-------
>>> from regpipe.transforms import AffineTransform
>>> write_transform(AffineTransform.identity(), "sub-01_from-T1w_to-MNI_xfm.mat")  # doctest: +SKIP
>>> read_transform("sub-01_from-T1w_to-MNI_xfm.mat").matrix  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from regpipe.atomic import atomic_write
from regpipe.errors import TransformFileError
from regpipe.imageio import sform_pixdim_mismatch
from regpipe.spaces import RAS_TO_LPS, Geometry, affine_ras_to_lps, orthogonal_cover
from regpipe.transforms import (
    AffineTransform,
    ComposedTransform,
    DisplacementField,
    Transform,
    compose,
)

PathLike = str | os.PathLike[str]

#: NIfTI intent code of a vector-valued image (``NIFTI_INTENT_VECTOR``), what ITK requires.
NIFTI_INTENT_VECTOR = 1007

#: Largest ``|D^T D - I|`` entry for voxel axes to count as orthogonal (float32 headers).
ORTHOGONALITY_TOLERANCE = 1e-4
LOGGER = logging.getLogger("regpipe")

#: Largest difference (mm, or matrix entry) tolerated between a NIfTI sform and its qform.
_FORM_TOLERANCE = 1e-3

#: ``diag(-1, -1, 1, 1)``: converts a voxel-to-RAS matrix to voxel-to-LPS (and back).
_FLIP4 = np.diag([-1.0, -1.0, 1.0, 1.0])

_IDENTITY_TRAP = (
    "ANTs (antsApplyTransforms, ants.apply_transforms) and ITK read a displacement field only "
    "as a 5-D (X, Y, Z, 1, 3) NIfTI with intent code 1007 (vector); any other form is "
    "silently applied as the identity transform, without an error."
)

Reader = Callable[[Path, bool], Transform]
Writer = Callable[[Transform, Path, Geometry | None], None]


@dataclass(frozen=True)
class _Format:
    """One row of the format table: a name, its file suffixes and its reader/writer."""

    name: str
    suffixes: tuple[str, ...]
    read: Reader
    write: Writer


# --------------------------------------------------------------------------- public API


def write_transform(
    transform: Transform, path: PathLike, reference: Geometry | None = None
) -> Path:
    """Write a fixed -> moving (pull-back) RAS+ transform to an ITK/ANTs file.

    The format follows the suffix (see :func:`supported_formats`). Field formats
    (``.nii.gz``, ``.nii``, ``.h5``, ``.hdf5``) store a dense LPS+ displacement field: a
    :class:`~regpipe.transforms.DisplacementField` is written on its own grid, or resampled
    onto ``reference`` when one is given; any other transform (affine, grid transform, chain)
    is densified on ``reference``. An :class:`~regpipe.transforms.AffineTransform` written to
    ``.h5`` without a reference is stored exactly, as an ITK affine. Affine formats (``.mat``,
    ``.txt``, ``.tfm``) take an affine or a chain of affines only.

    The write is atomic: the file appears complete or not at all (a temporary file in the same
    folder is renamed over ``path``), and an existing file is left untouched on failure.

    Parameters
    ----------
    transform
        Fixed -> moving transform in RAS+ mm.
    path
        Destination; its folder must exist.
    reference
        Grid (normally the fixed image's) on which to densify a non-field transform.

    Returns
    -------
    The path written.

    Raises
    ------
    TransformFileError
        Unknown suffix, missing folder, a transform the format cannot hold, a missing
        reference grid, non-finite values, or an I/O failure.
    """
    path = Path(path)
    fmt = _writable_format(path)
    parent = path.parent
    if not parent.is_dir():
        raise TransformFileError(f"cannot write {path}: folder {parent} does not exist")
    try:
        # the format's own (lower-case) suffix: ITK chooses its reader and writer by it
        return atomic_write(path, lambda tmp: fmt.write(transform, tmp, reference),
                            suffix=_matching_suffix(path, fmt))
    except OSError as exc:
        raise TransformFileError(f"cannot write {path}: {_short_message(exc)}") from exc


def read_transform(path: PathLike, *, allow_nonstandard: bool = False) -> Transform:
    """Read an ITK/ANTs transform file as a fixed -> moving (pull-back) RAS+ transform.

    Returns an :class:`~regpipe.transforms.AffineTransform`, a
    :class:`~regpipe.transforms.DisplacementField` (RAS+ mm displacements on the file's grid),
    or a :func:`~regpipe.transforms.compose` chain of them in application order (ITK applies
    the *last* element of a composite first; consecutive linear parts are merged).

    Parameters
    ----------
    path
        A file of one of :func:`supported_formats`.
    allow_nonstandard
        Also read displacement-field NIfTIs that ANTs would silently treat as the identity (4-D
        ``(X, Y, Z, 3)`` arrays, intent codes other than 1007, no usable sform), assuming they
        hold LPS mm displacements like a standard one. Rewrite them with
        :func:`write_transform` before giving them to ANTs.

    Raises
    ------
    TransformFileError
        Unknown suffix, missing or unreadable file, a non-standard field (see above), or an
        ITK transform type other than linear and displacement field.
    """
    path = Path(path)
    fmt = _format_for(path)
    if not path.is_file():
        raise TransformFileError(f"transform file {path} does not exist")
    if path.stat().st_size == 0:
        raise TransformFileError(f"transform file {path} is empty (0 bytes): a placeholder, "
                                 "or a run that did not finish writing it")
    return fmt.read(path, allow_nonstandard)


def supported_formats() -> dict[str, tuple[str, ...]]:
    """Format names and the file suffixes that select them, e.g. ``{"itk-hdf5": (".h5", ...)}``."""
    return {fmt.name: fmt.suffixes for fmt in _FORMATS}


# --------------------------------------------------------------------------- conversions


def _format_for(path: Path) -> _Format:
    for fmt in _FORMATS:
        if _matching_suffix(path, fmt):
            return fmt
    known = ", ".join(s for fmt in _FORMATS for s in fmt.suffixes)
    raise TransformFileError(f"unknown transform file type {path.name!r}; use one of: {known}")


def check_field_path(path: str | os.PathLike[str]) -> None:
    """Raise :class:`TransformFileError` unless ``path``'s suffix selects a format that holds
    a displacement field (NIfTI field or ITK HDF5; the ``.mat``/``.txt``/``.tfm`` ones hold
    affine transforms only)."""
    fmt = _writable_format(Path(path))
    if fmt.name == "itk-affine":
        raise TransformFileError(
            f"{Path(path).name}: {fmt.suffixes} files hold affine transforms only; a "
            f"registration's transform needs .nii.gz, .nii, .h5 or .hdf5"
        )


def _writable_format(path: Path) -> _Format:
    """The format a new file at ``path`` is written in; its suffix must be lower case, as ITK
    and nibabel read it back (``x.MAT`` would be written and then not read)."""
    fmt = _format_for(path)
    suffix = _matching_suffix(path, fmt)
    if not path.name.endswith(suffix):
        raise TransformFileError(f"{path.name}: write the suffix in lower case ({suffix}): "
                                 "ITK and nibabel choose the format by it, case-sensitively")
    return fmt


def _matching_suffix(path: Path, fmt: _Format) -> str:
    name = path.name.lower()
    return next((s for s in fmt.suffixes if name.endswith(s)), "")


def _short_message(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (where ITK puts the actual error)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _as_affine(transform: Transform) -> AffineTransform | None:
    """The transform as one affine (a chain of affines is multiplied out), else ``None``."""
    if isinstance(transform, AffineTransform):
        return transform
    if isinstance(transform, ComposedTransform):
        matrix = np.eye(4)
        for part in transform.transforms:
            affine = _as_affine(part)
            if affine is None:
                return None
            matrix = affine.matrix @ matrix
        return AffineTransform(matrix)
    return None


def _as_field(transform: Transform, reference: Geometry | None) -> DisplacementField:
    """The transform as a dense RAS+ displacement field on ``reference`` (or its own grid)."""
    if isinstance(transform, DisplacementField) and (
        reference is None or reference.same_as(transform.geometry, atol=1e-6)
    ):
        field = transform
    elif reference is None:
        raise TransformFileError(
            f"a {type(transform).__name__} must be densified to be written as a displacement "
            "field: pass reference= (normally the fixed image's Geometry)"
        )
    else:
        field = DisplacementField.from_transform(transform, reference)
    if not _is_orthogonal(field.geometry.affine):
        cover = orthogonal_cover(field.geometry)
        LOGGER.warning(
            "the displacement field's grid has sheared voxel axes, which ITK and ANTs cannot "
            "store: writing it on an orthogonal grid of %s voxels that covers it (same voxel "
            "sizes)", "x".join(str(n) for n in cover.shape))
        if field is transform:  # only the field is known: its edge values extend outwards
            field = DisplacementField.from_transform(_EdgeExtended(field), cover)
        else:  # the transform itself on the cover: exact at every voxel (a resampled field
            # would blend the zeros beyond the sheared grid into its outer voxels)
            field = DisplacementField.from_transform(transform, cover)
    if not np.all(np.isfinite(field.field)):
        raise TransformFileError("the displacement field holds NaN or infinite values")
    return field


@dataclass(frozen=True)
class _EdgeExtended:
    """A displacement field whose edge values extend beyond its grid (not ITK's zero), so
    that resampling it onto a grid covering it blends no zeros into its outer voxels."""

    field: DisplacementField

    def map_points(self, points: NDArray[np.floating]) -> NDArray[np.float64]:
        return self.field.map_points(points, outside="border")


def _itk_grid(
    geometry: Geometry,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ITK's view of a grid: LPS origin, spacing and orthonormal LPS direction (3x3).

    Raises :class:`TransformFileError` for sheared axes, which ITK cannot represent.
    """
    direction = geometry.direction_ras
    skew = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if skew > ORTHOGONALITY_TOLERANCE:
        raise TransformFileError(
            f"the grid's voxel axes are sheared (|D^T D - I| = {skew:.2g}): ITK, ANTs and "
            "SimpleITK images only have orthogonal axes (ITK would silently read the NIfTI "
            "qform, a different grid). Densify the transform on an orthogonal grid: "
            "write_transform(transform, path, reference=<Geometry with orthogonal axes>)"
        )
    u, _, vt = np.linalg.svd(direction)  # nearest orthonormal matrix (polar decomposition)
    direction_lps = RAS_TO_LPS @ (u @ vt)
    origin_lps = RAS_TO_LPS @ geometry.affine[:3, 3]
    return origin_lps, geometry.spacing.copy(), direction_lps


def _itk_affine(geometry: Geometry) -> NDArray[np.float64]:
    """Voxel -> RAS+ matrix of the grid exactly as ITK sees it (orthonormalised axes)."""
    origin_lps, spacing, direction_lps = _itk_grid(geometry)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction_lps * spacing
    affine_lps[:3, 3] = origin_lps
    return _FLIP4 @ affine_lps


def _geometry_from_itk(image: sitk.Image) -> Geometry:
    """Geometry (voxel -> RAS+) of a SimpleITK image (voxel -> LPS+)."""
    affine_lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine_lps[:3, 3] = image.GetOrigin()
    return Geometry(tuple(image.GetSize()), _FLIP4 @ affine_lps)


def _lps_displacements(field: DisplacementField, dtype: type[np.floating]) -> NDArray[np.floating]:
    """A copy of the field's displacements in LPS+ mm (the caller's array is not touched)."""
    data: NDArray[np.floating] = field.field.astype(dtype, copy=True)
    data[..., :2] *= -1
    return data


def _sitk_affine(affine: AffineTransform) -> sitk.Transform:
    """ITK affine (LPS+, centre 0, translation = offset) of a RAS+ affine."""
    matrix = affine_ras_to_lps(affine.matrix)
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]) or not np.all(np.isfinite(matrix)):
        raise TransformFileError(f"not a finite affine matrix: {affine.matrix!r}")
    return sitk.AffineTransform(
        matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist(), (0.0, 0.0, 0.0)
    )


def _specific(transform: sitk.Transform) -> sitk.Transform:
    """The SimpleITK class of ``transform``, or the transform as it is when SimpleITK has no
    class for its ITK type (``CenteredAffineTransform``, which uniGradICON writes; a
    ``MatrixOffsetTransformBase``): its point mapping is all a linear part needs."""
    try:
        return transform.Downcast()
    except (TypeError, RuntimeError):
        return transform


def _composite_parts(composite: sitk.CompositeTransform) -> list[sitk.Transform]:
    """The parts of an ITK composite, without converting them (see :func:`_specific`)."""
    nth = getattr(getattr(sitk, "_SimpleITK", None), "CompositeTransform_GetNthTransform", None)
    count = composite.GetNumberOfTransforms()
    if nth is None:  # another SimpleITK: its public getter converts each part
        return [composite.GetNthTransform(i) for i in range(count)]
    return [nth(composite, i) for i in range(count)]


def _from_sitk(transform: sitk.Transform, depth: int = 0) -> list[Transform]:
    """regpipe transforms (RAS+, application order) of an ITK transform (LPS+)."""
    transform = _specific(transform)
    if isinstance(transform, sitk.CompositeTransform):
        if depth > 8:
            raise TransformFileError("the ITK composite transform nests more than 8 levels")
        # ITK applies the last element of a composite's queue first.
        parts = _composite_parts(transform)
        return [leaf for part in reversed(parts) for leaf in _from_sitk(part, depth + 1)]
    if transform.IsLinear():
        origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
        matrix = np.eye(4)
        for axis, unit in enumerate(np.eye(3)):
            matrix[:3, axis] = np.asarray(transform.TransformPoint(unit.tolist())) - origin
        matrix[:3, 3] = origin
        return [AffineTransform(affine_ras_to_lps(matrix))]
    if isinstance(transform, sitk.DisplacementFieldTransform):
        image = transform.GetDisplacementField()
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
            raise TransformFileError("only 3-D displacement fields with 3 components are read")
        data = sitk.GetArrayFromImage(image).transpose(2, 1, 0, 3).astype(np.float32)
        _check_finite(data, "the ITK displacement-field transform")
        data[..., :2] *= -1  # LPS -> RAS
        return [DisplacementField(_geometry_from_itk(image), np.ascontiguousarray(data))]
    raise TransformFileError(
        f"unsupported ITK transform type {transform.GetName()!r}: regpipe reads linear "
        "transforms and displacement fields (convert B-splines to a displacement field first)"
    )


def _merge_linear(parts: list[Transform]) -> list[Transform]:
    """Multiply out consecutive affines of a chain (application order)."""
    merged: list[Transform] = []
    for part in parts:
        if (
            isinstance(part, AffineTransform)
            and merged
            and isinstance(merged[-1], AffineTransform)
        ):
            merged[-1] = AffineTransform(part.matrix @ merged[-1].matrix)
        else:
            merged.append(part)
    return merged


# --------------------------------------------------------------------------- NIfTI fields


def _write_nifti_field(transform: Transform, path: Path, reference: Geometry | None) -> None:
    """ANTs displacement field: 5-D (X, Y, Z, 1, 3) float32 LPS mm, intent 1007, sform=qform."""
    field = _as_field(transform, reference)
    affine = _itk_affine(field.geometry)
    data = _lps_displacements(field, np.float32)[:, :, :, np.newaxis, :]
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_intent(NIFTI_INTENT_VECTOR)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


def _read_nifti_field(path: Path, allow_nonstandard: bool) -> DisplacementField:
    """Read an ANTs displacement-field NIfTI (LPS mm) as a RAS+ :class:`DisplacementField`."""
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several unrelated types for corrupt files
        raise TransformFileError(f"cannot read {path}: {_short_message(exc)}") from exc
    if not isinstance(image, nib.Nifti1Image):
        raise TransformFileError(f"{path} is not a NIfTI-1 image")
    shape = image.shape
    intent = int(image.header["intent_code"])
    problems = []
    if len(shape) == 4 and shape[3] == 3:
        problems.append(f"a 4-D {shape} array (ITK needs (X, Y, Z, 1, 3))")
    elif not (len(shape) == 5 and shape[3] == 1 and shape[4] == 3):
        raise TransformFileError(
            f"{path} is not a 3-D displacement field: its shape is {shape}, "
            "ITK/ANTs need (X, Y, Z, 1, 3)"
        )
    if intent != NIFTI_INTENT_VECTOR:
        problems.append(f"intent code {intent} (ITK needs {NIFTI_INTENT_VECTOR}, vector)")
    if problems and not allow_nonstandard:
        raise TransformFileError(
            f"{path} is a non-standard displacement field: {'; '.join(problems)}. "
            f"{_IDENTITY_TRAP} To fix it, reshape the data to (X, Y, Z, 1, 3) and set "
            "header.set_intent('vector') in nibabel, or read it with "
            "read_transform(path, allow_nonstandard=True) (LPS mm displacements assumed) and "
            "write it again with write_transform."
        )
    affine = _itk_header_affine(image, path, allow_nonstandard)
    data = np.asarray(image.dataobj).astype(np.float32).reshape(*shape[:3], 3)
    _check_finite(data, path)
    data[..., :2] *= -1  # LPS -> RAS
    return DisplacementField(Geometry(shape[:3], affine), data)


def _check_finite(data: NDArray[np.float32], origin: object) -> None:
    """Refuse a field with NaN or infinite displacements (ITK reads them as none, which
    would warp those voxels by the identity without a word)."""
    bad = ~np.isfinite(data).all(axis=-1)
    if bad.any():
        raise TransformFileError(
            f"{origin} holds NaN or infinite displacements at {int(bad.sum())} of {bad.size} "
            "voxels (ITK and ANTs would read them as no displacement); replace them, e.g. "
            "numpy.nan_to_num, and write the field again")


def _itk_header_affine(
    image: nib.Nifti1Image, path: Path, allow_nonstandard: bool
) -> NDArray[np.float64]:
    """Voxel -> RAS+ matrix as ITK picks it: an orthogonal sform, else the qform."""
    sform, scode = image.header.get_sform(coded=True)
    qform, qcode = image.header.get_qform(coded=True)
    if scode and _is_orthogonal(sform):
        if qcode and not np.allclose(sform, qform, atol=_FORM_TOLERANCE) and not allow_nonstandard:
            raise TransformFileError(
                f"{path}: its sform and qform place the field differently; ITK uses the "
                "sform, other tools the qform. Rewrite the header with both set to the same "
                "matrix, or pass allow_nonstandard=True to use the sform as ITK does."
            )
        mismatch = sform_pixdim_mismatch(image.header)
        if mismatch is not None and not allow_nonstandard:
            raise TransformFileError(
                f"{path}: its sform has voxel sizes {mismatch[0]} but its header (pixdim) says "
                f"{mismatch[1]}; ITK and ANTs take pixdim, nibabel the sform, so they would "
                "place the field differently. Rewrite the header (nibabel: header.set_zooms), "
                "or pass allow_nonstandard=True to use the sform.")
        return np.asarray(sform, dtype=np.float64)
    if scode and not qcode:
        raise TransformFileError(
            f"{path}: its sform has sheared axes and there is no qform; ITK and ANTs cannot "
            "read it (they need orthogonal axes)"
        )
    if scode and not allow_nonstandard:
        raise TransformFileError(
            f"{path}: its sform has sheared axes, so ITK and ANTs silently use the qform "
            "instead; pass allow_nonstandard=True to read it the same way (qform)."
        )
    if qcode:
        return np.asarray(qform, dtype=np.float64)
    if not allow_nonstandard:
        raise TransformFileError(
            f"{path} has neither sform nor qform (codes 0): its position in space is unknown; "
            "pass allow_nonstandard=True to use the voxel sizes only."
        )
    return np.asarray(image.affine, dtype=np.float64)


def _is_orthogonal(affine: NDArray[np.floating]) -> bool:
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    direction = columns / np.linalg.norm(columns, axis=0)
    return bool(np.abs(direction.T @ direction - np.eye(3)).max() <= ORTHOGONALITY_TOLERANCE)


# --------------------------------------------------------------------------- ITK (SimpleITK)


def _write_itk_hdf5(transform: Transform, path: Path, reference: Geometry | None) -> None:
    """ITK HDF5: a composite holding one displacement field (or one exact affine)."""
    affine = _as_affine(transform)
    # A composite wrapper, as ANTs writes: nitransforms skips TransformGroup/0 unconditionally.
    if affine is not None and reference is None:
        _sitk_write(sitk.CompositeTransform([_sitk_affine(affine)]), path)
    else:
        _write_hdf5_field(_as_field(transform, reference), path)


#: ITK's names of the transforms :func:`_write_hdf5_field` writes.
_HDF5_TYPES = ("CompositeTransform_double_3_3", "DisplacementFieldTransform_double_3_3")


def _write_hdf5_field(field: DisplacementField, path: Path) -> None:
    """Write the layout ITK's ``HDF5TransformIO`` (and SimpleITK) write for a composite holding
    one ``DisplacementFieldTransform_double_3_3``, with the displacements compressed.

    ``TransformParameters`` holds the LPS+ mm displacements in ITK's order (x fastest, the
    three components of a voxel together), float64 as ITK stores them, in chunks
    byte-shuffled and deflated at level 1: the standard HDF5 filters every ITK, ANTs and
    h5py build reads, about a third of SimpleITK's uncompressed size for a registration's
    smooth field. ``TransformFixedParameters``: size, origin, spacing, direction (row-major).
    """
    import platform

    import h5py

    origin, spacing, direction = _itk_grid(field.geometry)
    size = np.asarray(field.geometry.shape, dtype=np.float64)
    fixed = np.concatenate([size, origin, spacing, direction.ravel()])
    parameters = np.ascontiguousarray(
        _lps_displacements(field, np.float64).transpose(2, 1, 0, 3)
    ).reshape(-1)
    text = h5py.string_dtype("ascii")

    def strings(handle: h5py.Group, name: str, value: str) -> None:
        handle.create_dataset(name, data=np.array([value.encode("ascii", "replace")], text))

    with h5py.File(path, "w") as handle:
        strings(handle, "HDFVersion", f"HDF5 library version: {h5py.version.hdf5_version}")
        strings(handle, "ITKVersion", sitk.Version.ITKVersionString())
        strings(handle, "OSName", platform.system())
        strings(handle, "OSVersion", platform.release())
        strings(handle, "TransformGroup/0/TransformType", _HDF5_TYPES[0])
        strings(handle, "TransformGroup/1/TransformType", _HDF5_TYPES[1])
        handle.create_dataset("TransformGroup/1/TransformFixedParameters", data=fixed)
        handle.create_dataset("TransformGroup/1/TransformParameters", data=parameters,
                              chunks=(min(parameters.size, 1 << 18),), shuffle=True,
                              compression="gzip", compression_opts=1)


def _write_itk_affine(transform: Transform, path: Path, reference: Geometry | None) -> None:
    """ITK affine file (MATLAB v4 ``.mat`` or text), LPS+, centre 0."""
    affine = _as_affine(transform)
    if affine is None:
        raise TransformFileError(
            f"{path.suffix} files hold affine transforms only; write a "
            f"{type(transform).__name__} to .nii.gz or .h5 (with reference=) instead"
        )
    _sitk_write(_sitk_affine(affine), path)


def _sitk_write(transform: sitk.Transform, path: Path) -> None:
    try:
        sitk.WriteTransform(transform, str(path))
    except RuntimeError as exc:  # SimpleITK reports every ITK exception as RuntimeError
        raise OSError(_short_message(exc)) from exc


def _read_itk(path: Path, allow_nonstandard: bool) -> Transform:
    """Any SimpleITK-readable file of linear transforms and displacement fields."""
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise TransformFileError(f"cannot read {path}: {_short_message(exc)}") from exc
    try:
        parts = _merge_linear(_from_sitk(transform))
    except RuntimeError as exc:  # an ITK type SimpleITK cannot map points with
        raise TransformFileError(f"cannot read {path}: {_short_message(exc)}") from exc
    except TransformFileError as exc:
        raise TransformFileError(f"{path}: {exc}") from None
    if not parts:
        return AffineTransform.identity()
    return parts[0] if len(parts) == 1 else compose(*parts)


_FORMATS: tuple[_Format, ...] = (
    _Format("itk-nifti-field", (".nii.gz", ".nii"), _read_nifti_field, _write_nifti_field),
    _Format("itk-hdf5", (".h5", ".hdf5"), _read_itk, _write_itk_hdf5),
    _Format("itk-affine", (".mat", ".txt", ".tfm"), _read_itk, _write_itk_affine),
)
