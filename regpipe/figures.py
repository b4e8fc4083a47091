"""Quality-control figures of registrations: SVG files for the reports in :mod:`regpipe.reports`.

Subject figures show the fixed image's world (RAS+ mm) space in three orthogonal views (axial,
sagittal, coronal) of a few slices each, cut through the fixed image's foreground. Every
function writes one SVG file atomically (world-readable: reports are shared as files) and
returns its path.

Tools, and why: the before/after flicker is the NiPreps reportlet itself (nireports
``plot_registration`` + ``compose_view``, the figure of sMRIPrep's and fMRIPrep's spatial
normalisation panels: hover over it to flicker), called as plain functions, so the library needs
neither Nipype nor niworkflows. Contours and Jacobian maps are nilearn displays (``plot_anat`` +
``add_contours``, ``plot_img`` + ``add_overlay``) stacked by the same ``compose_view``. Group
distributions are matplotlib box plots with every registration drawn as a point.

Example::

    from regpipe.figures import plot_jacobian
    plot_jacobian("sub-01_jacobian.nii.gz", "jacobian.svg", title="Jacobian determinant")
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from regpipe.atomic import atomic_write
from regpipe.errors import InputError
from regpipe.imageio import Image, check_readable_file

__all__ = [
    "cut_coordinates",
    "plot_contours",
    "plot_flicker",
    "plot_group_metric",
    "plot_jacobian",
]

FigureSource = str | os.PathLike | nib.spatialimages.SpatialImage | Image
Cuts = dict[str, list[float]]
View = Literal["x", "y", "z"]
VIEWS: tuple[View, View, View] = ("z", "x", "y")  # axial, sagittal, coronal: NiPreps' order
# Slices go into the SVG at their own resolution and the browser draws the voxels: smaller files,
# and several times faster than matplotlib resampling every slice at 300 dpi first.
_INTERPOLATION = "none"


def cut_coordinates(image: FigureSource, cuts_per_view: int = 7) -> Cuts:
    """World (RAS mm) coordinates of ``cuts_per_view`` slices per view through the foreground.

    The foreground is every voxel above 10 % of the image's robust range (minimum to 99th
    percentile); the cuts are spread evenly inside its bounding box (nireports'
    ``cuts_from_bbox``). Returns ``{"x": [...], "y": [...], "z": [...]}``.
    """
    from nireports.reportlets.utils import cuts_from_bbox

    if cuts_per_view < 1:
        raise InputError(f"cuts_per_view must be at least 1, got {cuts_per_view}")
    nifti = _to_nifti(image, "image")
    mask = _foreground(nifti).astype(np.uint8)
    if not mask.any():
        mask[...] = 1
    cuts = cuts_from_bbox(nib.Nifti1Image(mask, nifti.affine), cuts=cuts_per_view)
    return {view: [float(c) for c in coords] for view, coords in cuts.items()}


def _foreground(nifti: nib.Nifti1Image) -> NDArray[np.bool_]:
    """Voxels above 10 % of the robust intensity range (minimum to 99th percentile)."""
    data = np.nan_to_num(np.asarray(nifti.dataobj, dtype=np.float32))
    low, high = float(data.min()), float(np.percentile(data, 99))
    return data > low + 0.1 * (high - low)


def plot_flicker(
    fixed: FigureSource,
    warped: FigureSource,
    out_file: str | os.PathLike,
    *,
    cuts: Cuts | None = None,
    fixed_label: str = "fixed",
    warped_label: str = "warped",
) -> Path:
    """Write a before/after SVG: ``fixed`` and ``warped`` in the same panels, flickering on hover.

    NiPreps' reportlet (nireports ``plot_registration`` and ``compose_view``): ``fixed`` is the
    background layer, ``warped`` the foreground layer whose opacity a CSS animation alternates
    while the pointer is over the figure. Embed it with ``<object>`` (an ``<img>`` shows only the
    foreground). Both images are drawn in world coordinates at ``cuts`` (default:
    :func:`cut_coordinates` of ``fixed``), each with its own robust intensity range.
    """
    from nireports.reportlets.mosaic import plot_registration
    from nireports.reportlets.utils import compose_view

    fixed_nii, warped_nii = _to_nifti(fixed, "fixed image"), _to_nifti(warped, "warped image")
    cuts = cuts or cut_coordinates(fixed_nii)
    layers = [
        plot_registration(
            nifti,
            name,
            cuts=cuts,
            label=_literal(label),
            order=VIEWS,
            plot_params={"interpolation": _INTERPOLATION},
            estimate_brightness=True,
            compress=False,
        )
        for nifti, name, label in (
            (fixed_nii, "fixed", fixed_label),
            (warped_nii, "warped", warped_label),
        )
    ]
    return atomic_write(out_file, lambda tmp: compose_view(layers[0], layers[1], out_file=tmp))


def plot_contours(
    image: FigureSource,
    contours_of: FigureSource,
    out_file: str | os.PathLike,
    *,
    cuts: Cuts | None = None,
    title: str | None = None,
    draw_contours: bool = True,
) -> Path:
    """Write an SVG of ``image`` (grey) with two iso-intensity contours of ``contours_of``
    (``draw_contours=False``: the image alone, for cuts that miss ``contours_of``).

    With the warped image as ``image`` and the fixed (template) image as ``contours_of``: after
    a good registration the template's contours follow the warped image's boundaries. Red is
    the outline of ``contours_of``'s foreground (see :func:`cut_coordinates`), yellow the median
    intensity of that foreground (the grey/white matter boundary of a T1w template). Contours
    are nilearn's ``add_contours``: vector lines, computed in ``contours_of``'s own grid and
    drawn in world space. (nilearn's ``add_edges`` edge map was tried first: on slices that are
    mostly background it marks the flat background as edges.)
    """
    from nilearn.plotting import plot_anat  # type: ignore[import-untyped]

    image_nii = _to_nifti(image, "image")
    contours_nii = _to_nifti(contours_of, "contour image")
    cuts = cuts or cut_coordinates(contours_nii)
    foreground = _foreground(contours_nii)
    data = np.asarray(contours_nii.dataobj)
    outline = float(data[foreground].min()) if foreground.any() else float(data.mean())
    inner = float(np.median(data[foreground])) if foreground.any() else outline
    levels, colors = ([outline, inner], ["r", "y"]) if inner > outline else ([outline], ["r"])

    def panel(view: View, first: bool) -> Any:
        display = plot_anat(
            image_nii,
            display_mode=view,
            cut_coords=cuts[view],
            colorbar=False,
            dim=0,
            interpolation=_INTERPOLATION,
            title=_literal(title) if first and title else None,
        )
        if draw_contours:
            display.add_contours(contours_nii, levels=levels, colors=colors, linewidths=0.6)
        return display

    return _write_stacked(panel, out_file)


def plot_jacobian(
    jacobian: FigureSource,
    out_file: str | os.PathLike,
    *,
    cuts: Cuts | None = None,
    title: str | None = None,
) -> Path:
    """Write an SVG of a Jacobian determinant map: diverging colours centred at 1, folding lime.

    Blue is local compression (J < 1), red expansion (J > 1), white no change of volume; the
    colour range is ``1 ± d``, ``d`` the 99th percentile of ``|J - 1|`` clipped to [0.05, 1].
    Voxels with J <= 0 (folding) are painted solid lime over the map. A constant map (the
    Jacobian of an affine transform) is accepted.
    """
    from matplotlib.colors import ListedColormap
    from nilearn.plotting import plot_img

    jac_nii = _to_nifti(jacobian, "Jacobian map")
    values = np.asarray(jac_nii.dataobj, dtype=np.float32)
    finite = values[np.isfinite(values)]
    half_range = float(np.percentile(np.abs(finite - 1.0), 99)) if finite.size else 1.0
    half_range = min(max(half_range, 0.05), 1.0)
    folding = np.isfinite(values) & (values <= 0)
    folding_nii = nib.Nifti1Image(folding.astype(np.float32), jac_nii.affine)
    cuts = cuts or cut_coordinates(jac_nii)

    def panel(view: View, first: bool) -> Any:
        display = plot_img(
            jac_nii,
            display_mode=view,
            cut_coords=cuts[view],
            cmap="RdBu_r",
            vmin=1.0 - half_range,
            vmax=1.0 + half_range,
            colorbar=True,
            black_bg=True,
            interpolation=_INTERPOLATION,
            title=_literal(title) if first and title else None,
        )
        if folding.any():
            display.add_overlay(
                folding_nii,
                cmap=ListedColormap(["lime"]),
                threshold=0.5,
                vmin=0.0,
                vmax=1.0,
                interpolation=_INTERPOLATION,
            )
        return display

    return _write_stacked(panel, out_file)


def plot_group_metric(
    rows: Sequence[Mapping[str, Any]],
    key: str,
    out_file: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path | None:
    """Write an SVG box plot of ``row[key]`` per method, each registration drawn as a point.

    Missing, non-numeric ("n/a") and infinite values are left out; returns ``None`` and writes
    nothing when no row has a value for ``key``.
    """
    from matplotlib.figure import Figure

    methods = methods_in_order(rows)
    values = [finite_values(rows, key, method) for method in methods]
    if not any(v.size for v in values):
        return None
    figure = Figure(figsize=(1.2 + 1.3 * len(methods), 3.2), layout="constrained")
    axes = figure.add_subplot()
    present = [(index + 1, v) for index, v in enumerate(values) if v.size]
    axes.boxplot(
        [v for _, v in present],
        positions=[p for p, _ in present],
        widths=0.5,
        showfliers=False,
        medianprops={"color": "k"},
    )
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs give the same file
    for position, v in present:  # one colour per method, the same in every plot
        jitter = rng.uniform(-0.12, 0.12, v.size)
        color = f"C{(position - 1) % 10}"
        axes.scatter(position + jitter, v, s=14, alpha=0.7, color=color, zorder=3)
    axes.set_xticks(range(1, len(methods) + 1), [_literal(m) for m in methods])
    axes.set_xlim(0.4, len(methods) + 0.6)
    axes.set_title(_literal(title or key), fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    return atomic_write(out_file, lambda tmp: figure.savefig(tmp, format="svg"))


def _write_stacked(panel: Callable[[View, bool], Any], out_file: str | os.PathLike) -> Path:
    """Draw one nilearn display per view and stack them vertically into one SVG file."""
    from nireports._vendored.svgutils.transform import fromstring
    from nireports.reportlets.utils import compose_view, extract_svg

    svgs = []
    for index, view in enumerate(VIEWS):
        display = panel(view, index == 0)
        svgs.append(fromstring(extract_svg(display, compress=False)))
        display.close()
    return atomic_write(out_file, lambda tmp: compose_view(svgs, [], out_file=tmp))


def _to_nifti(source: FigureSource, what: str) -> nib.Nifti1Image:
    """A 3-D float32 NIfTI image from a path, a nibabel image or an :class:`Image`.

    Unlike :func:`regpipe.imageio.load_image`, constant images are accepted (the Jacobian map of
    an affine transform is constant).
    """
    if isinstance(source, Image):
        return source.to_nifti(np.dtype(np.float32))
    if isinstance(source, nib.spatialimages.SpatialImage):
        loaded: Any = source
    else:
        path = Path(source)
        check_readable_file(path, what)
        try:
            loaded = nib.load(path)
        except Exception as error:  # nibabel and zlib raise many unrelated types
            raise InputError(f"{what} {path} cannot be read as an image: {error}") from error
    data = np.asarray(loaded.dataobj, dtype=np.float32)
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise InputError(f"{what} has shape {data.shape}: figures need a 3-D image")
    return nib.Nifti1Image(data, loaded.affine)


def _literal(text: str) -> str:
    """Matplotlib reads ``$...$`` as mathematics: keep labels literal."""
    return text.replace("$", r"\$")


# ------------------------------------------------------------------------------------ values


def to_float(value: Any) -> float:
    """A finite float, or NaN for anything missing, non-numeric or infinite (None, "n/a")."""
    if isinstance(value, bool):
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def methods_in_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct ``row["method"]`` values in order of first appearance ("?" when absent)."""
    return list(dict.fromkeys(str(row.get("method", "?")) for row in rows))


def finite_values(rows: Sequence[Mapping[str, Any]], key: str, method: str) -> NDArray:
    """The finite numbers ``row[key]`` of ``method``'s rows (missing, "n/a", inf left out)."""
    values = [to_float(r.get(key)) for r in rows if str(r.get("method", "?")) == method]
    return np.array([v for v in values if not math.isnan(v)], dtype=float)
