"""Accuracy and regularity of a registration: overlap, surface distance, landmarks, Jacobian.

Every measure takes a transform that maps **fixed** points to **moving** points (pull-back,
RAS+ mm; see :mod:`regpipe.spaces`) and evaluates it on the fixed image's grid:

* Dice per label: fixed labels against the moving labels resampled onto the fixed grid
  (nearest neighbour).
* HD95 per label (mm): the 95th percentile of the distances between the two label surfaces,
  the larger of the two directions, in physical millimetres (voxel spacing aware).
* Folding (%) and SD of log J: the Jacobian determinant of the transform in a region of the
  fixed grid (:func:`regpipe.metrics.folding_stats`).
* TRE (mm): fixed landmarks mapped through the transform into moving space, against the
  corresponding moving landmarks.

Landmarks are read from Slicer markups ``.fcsv`` files (:func:`read_fcsv`), RAS or LPS.

Example
-------
>>> import numpy as np
>>> a = np.zeros((10, 10, 10), bool); a[2:6, 2:6, 2:6] = True
>>> b = np.roll(a, 1, axis=0)
>>> round(dice_per_label(a.astype(int), b.astype(int))[1], 3)
0.75
>>> hd95(a, b, spacing=(2.0, 1.0, 1.0))
2.0
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from regpipe.atomic import atomic_write_text
from regpipe.errors import InputError
from regpipe.metrics import (
    dice_per_label,
    folding_stats,
    jacobian_determinant,
    ncc,
    shared_labels,
)
from regpipe.spaces import Geometry, lps_to_ras
from regpipe.transforms import DisplacementField, Transform

__all__ = [
    "Landmarks",
    "dice_per_label",
    "evaluate_transform",
    "hd95",
    "jacobian_in_region",
    "landmark_errors",
    "match_landmarks",
    "overlap_per_label",
    "parse_label_list",
    "read_fcsv",
    "write_fcsv",
]


# --------------------------------------------------------------------------- landmarks


@dataclass(frozen=True, eq=False)
class Landmarks:
    """Points ``[n, 3]`` in RAS+ mm with their labels (``""`` when a file has none)."""

    points: NDArray[np.float64]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.points.shape[0])


#: Slicer's ``# CoordinateSystem`` values: 0/RAS, 1/LPS (2/IJK is not a world system).
_SYSTEMS = {"0": "RAS", "RAS": "RAS", "1": "LPS", "LPS": "LPS"}


def read_fcsv(path: str | os.PathLike) -> Landmarks:
    """Read a Slicer markups fiducial file (``.fcsv``) into RAS+ mm landmarks.

    The ``# CoordinateSystem`` header line says how the points are stored: ``0`` or ``RAS``
    (also the default of files without the line, Slicer < 4.11) or ``1`` or ``LPS`` (converted
    here). The ``# columns`` line, when present, names the coordinate and label columns;
    otherwise Slicer's fixed order ``id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,...`` is assumed.

    Raises
    ------
    InputError
        Missing file, an IJK or unknown coordinate system, no points, or a non-numeric value.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file {path} does not exist")
    system, columns, rows = "RAS", None, []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            key, _, value = stripped.lstrip("#").partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                if value.upper() not in _SYSTEMS:
                    raise InputError(
                        f"{path}: coordinate system {value!r} is not RAS (0) or LPS (1)"
                    )
                system = _SYSTEMS[value.upper()]
            elif key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
            continue
        rows.append(next(csv.reader(io.StringIO(stripped))))
    if not rows:
        raise InputError(f"landmark file {path} holds no points")
    columns = columns or ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock",
                          "label"]
    try:
        xyz = [columns.index(axis) for axis in ("x", "y", "z")]
    except ValueError:
        raise InputError(f"{path}: the columns line has no x, y and z") from None
    where_label = columns.index("label") if "label" in columns else None
    try:
        points = np.array([[float(row[i]) for i in xyz] for row in rows], dtype=np.float64)
    except (ValueError, IndexError) as error:
        raise InputError(f"{path}: unreadable coordinates ({error})") from None
    labels = tuple(
        row[where_label].strip() if where_label is not None and where_label < len(row) else ""
        for row in rows
    )
    if system == "LPS":
        points = lps_to_ras(points)
    return Landmarks(points, labels)


def write_fcsv(
    path: str | os.PathLike,
    points: NDArray[np.floating],
    labels: Sequence[str] | None = None,
    *,
    system: str = "RAS",
) -> Path:
    """Write RAS+ mm ``points`` ``[n, 3]`` as a Slicer ``.fcsv`` stored in ``system``
    (``"RAS"`` or ``"LPS"``)."""
    if system not in ("RAS", "LPS"):
        raise InputError(f"coordinate system must be RAS or LPS, got {system!r}")
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    stored = lps_to_ras(points) if system == "LPS" else points
    labels = list(labels) if labels is not None else [f"P{i + 1}" for i in range(len(points))]
    lines = [
        "# Markups fiducial file version = 4.11",
        f"# CoordinateSystem = {system}",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for i, (point, label) in enumerate(zip(stored, labels, strict=False)):
        x, y, z = (repr(float(v)) for v in point)
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i + 1},{x},{y},{z},0,0,0,1,1,1,0,{label},,")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def match_landmarks(
    fixed: Landmarks, moving: Landmarks
) -> tuple[NDArray[np.float64], NDArray[np.float64], tuple[str, ...]]:
    """Corresponding points of two landmark sets: by label when both name every point and
    share labels (points only in one file are left out; a label used twice in a file is an
    error, since it would pair points by guesswork), else by order (the counts must then
    agree)."""
    named = all(all(s.labels) for s in (fixed, moving))
    if named and set(fixed.labels) & set(moving.labels):
        for points, which in ((fixed, "fixed"), (moving, "moving")):
            twice = sorted({label for label in points.labels if points.labels.count(label) > 1})
            if twice:
                raise InputError(f"the {which} landmarks name {', '.join(twice[:5])} more than "
                                 "once: give each point its own label to pair them")
        where = {label: i for i, label in enumerate(moving.labels)}
        common = [label for label in fixed.labels if label in where]
        f_idx = [fixed.labels.index(label) for label in common]
        m_idx = [where[label] for label in common]
        return fixed.points[f_idx], moving.points[m_idx], tuple(common)
    if len(fixed) != len(moving):
        raise InputError(
            f"landmark sets differ in size ({len(fixed)} fixed, {len(moving)} moving) and "
            "cannot be matched by label"
        )
    return fixed.points, moving.points, fixed.labels


def landmark_errors(
    transform: Transform, fixed_points: NDArray[np.floating], moving_points: NDArray[np.floating]
) -> NDArray[np.float64]:
    """Target registration errors (mm): ``|T(p_fixed) - p_moving|`` for each landmark pair.

    ``transform`` maps fixed points to moving points, so the fixed landmarks are the ones that
    are mapped (no inverse is needed).
    """
    mapped = transform.map_points(np.asarray(fixed_points, dtype=np.float64))
    return np.linalg.norm(mapped - np.asarray(moving_points, dtype=np.float64), axis=-1)


# --------------------------------------------------------------------------- surfaces


def _bounding_box(mask: NDArray[np.bool_], margin: int) -> tuple[slice, ...]:
    where = np.nonzero(mask)
    return tuple(
        slice(max(int(w.min()) - margin, 0), min(int(w.max()) + margin + 1, n))
        for w, n in zip(where, mask.shape, strict=True)
    )


def _surface(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Voxels of ``mask`` with a 6-neighbour outside it (the array's edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(
    a: NDArray, b: NDArray, spacing: Sequence[float] | NDArray = (1.0, 1.0, 1.0),
    percentile: float = 95.0,
) -> float:
    """Robust Hausdorff distance (mm) between two binary masks on the same grid.

    The distances from each surface voxel of ``a`` to the nearest surface voxel of ``b`` and
    back are measured in millimetres (``spacing`` along the array axes) with exact nearest-
    neighbour searches; the result is the larger of the two directed ``percentile``-th
    percentiles. NaN when either mask is empty.
    """
    from scipy.spatial import cKDTree

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return float("nan")
    box = _bounding_box(a | b, 1)
    scale = np.asarray(spacing, dtype=np.float64)
    points_a = np.argwhere(_surface(a[box])) * scale
    points_b = np.argwhere(_surface(b[box])) * scale
    a_to_b = cKDTree(points_b).query(points_a)[0]
    b_to_a = cKDTree(points_a).query(points_b)[0]
    return float(max(np.percentile(a_to_b, percentile), np.percentile(b_to_a, percentile)))


def overlap_per_label(
    fixed_labels: NDArray, warped_labels: NDArray, labels: Sequence[int],
    spacing: Sequence[float] | NDArray,
) -> tuple[dict[int, float], dict[int, float]]:
    """Dice and :func:`hd95` (mm) of each label between two label maps on one grid.

    Each label is compared inside the union of its bounding boxes in both maps (found once
    with :func:`scipy.ndimage.find_objects`), which gives the same values as whole-volume
    comparisons at a fraction of the cost. Dice is NaN for a label absent from both maps;
    HD95 is NaN for a label absent from either.
    """
    fixed_labels, warped_labels = np.asarray(fixed_labels), np.asarray(warped_labels)
    labels = [int(label) for label in labels]
    boxes: dict[int, list[tuple[slice, ...]]] = {label: [] for label in labels}
    if min(labels, default=0) >= 1 and min(fixed_labels.min(), warped_labels.min()) >= 0:
        top = max(labels) + 1
        for data in (fixed_labels, warped_labels):
            clipped = np.where(data < top, data, 0) if data.max() >= top else data
            found = ndimage.find_objects(clipped.astype(np.int64, copy=False), max_label=top)
            for label in labels:
                if found[label - 1] is not None:
                    boxes[label].append(found[label - 1])
    else:  # negative or zero labels: whole volume
        boxes = {label: [tuple(slice(0, n) for n in fixed_labels.shape)] for label in labels}
    dice: dict[int, float] = {}
    distance: dict[int, float] = {}
    for label in labels:
        if not boxes[label]:
            dice[label], distance[label] = float("nan"), float("nan")
            continue
        box = tuple(slice(min(b[a].start for b in boxes[label]),
                          max(b[a].stop for b in boxes[label])) for a in range(3))
        in_fixed, in_warped = fixed_labels[box] == label, warped_labels[box] == label
        total = int(in_fixed.sum() + in_warped.sum())
        dice[label] = float(2.0 * np.logical_and(in_fixed, in_warped).sum() / total)
        distance[label] = hd95(in_fixed, in_warped, spacing)
    return dice, distance


# --------------------------------------------------------------------------- Jacobian


def jacobian_in_region(
    transform: Transform, geometry: Geometry, region: NDArray
) -> NDArray[np.float32]:
    """Jacobian determinants of ``transform`` at the voxels of ``region`` (a mask on
    ``geometry``), as a 1-D array.

    The field is sampled only on the region's bounding box plus two voxels, which gives the
    same central differences as the whole grid at a fraction of the cost.
    """
    region = np.asarray(region) != 0
    if not region.any():
        return np.empty(0, dtype=np.float32)
    box = _bounding_box(region, 2)
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    sub = Geometry(tuple(s.stop - s.start for s in box), geometry.affine @ shift)
    jacobian = jacobian_determinant(DisplacementField.from_transform(transform, sub))
    return jacobian[region[box]]


# --------------------------------------------------------------------------- all measures


def _mean(values: Any) -> float:
    finite = [float(v) for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_transform(
    transform: Transform,
    geometry: Geometry,
    *,
    region: NDArray | None = None,
    fixed_labels: NDArray | None = None,
    moving_labels: tuple[NDArray, Geometry] | None = None,
    labels: Sequence[int] | None = None,
    fixed_points: NDArray | None = None,
    moving_points: NDArray | None = None,
    fixed_image: NDArray | None = None,
    warped_image: NDArray | None = None,
) -> dict[str, Any]:
    """Every measure of a fixed -> moving transform that the given data allow.

    Parameters
    ----------
    transform, geometry
        The transform (fixed -> moving, RAS+ mm) and the fixed grid.
    region
        Mask on the fixed grid for folding, SD of log J and NCC (all voxels when ``None``).
    fixed_labels, moving_labels
        Fixed label map (on ``geometry``) and the moving one with its own geometry; with both,
        Dice and HD95 per label and their means.
    labels
        Labels to score (default: the non-zero labels present in both maps); those absent
        from either map are left out (``n_labels`` counts the ones scored).
    fixed_points, moving_points
        Corresponding landmarks ``[n, 3]`` (RAS+ mm); with both, TRE statistics.
    fixed_image, warped_image
        The fixed image and the moving image resampled onto it; with both, NCC in the region.

    Returns
    -------
    dict
        ``folding_percent``, ``sd_log_jacobian``, ``min_jacobian``, ``max_jacobian``; with
        labels ``dice`` and ``hd95`` (``{label: value}``), ``dice_mean``, ``hd95_mean_mm``
        and ``n_labels``; with landmarks ``tre_mean_mm``, ``tre_median_mm``, ``tre_max_mm``
        and ``n_landmarks``; with images ``ncc_after``.
    """
    from regpipe.warp import warp_array

    region_mask = np.ones(geometry.shape, bool) if region is None else np.asarray(region) != 0
    metrics: dict[str, Any] = dict(
        folding_stats(jacobian_in_region(transform, geometry, region_mask))
    )
    if fixed_labels is not None and moving_labels is not None:
        moving_data, moving_geometry = moving_labels
        in_both = set(shared_labels(fixed_labels, moving_data))
        # labels asked for but missing from a map are not scored (a 0 would be no error of
        # the registration's); regpipe-bench names them
        labels = sorted(in_both) if labels is None else [v for v in labels if int(v) in in_both]
        warped = warp_array(np.asarray(moving_data), moving_geometry, transform, geometry,
                            interpolation="nearest")
        dice, distance = overlap_per_label(fixed_labels, warped, labels, geometry.spacing)
        metrics["dice"] = {str(k): v for k, v in dice.items()}
        metrics["hd95"] = {str(k): v for k, v in distance.items()}
        metrics["dice_mean"] = _mean(dice.values())
        metrics["hd95_mean_mm"] = _mean(distance.values())
        # a label the warp lost entirely has Dice 0 but no HD95: the mean leaves it out, so
        # say how many (a worse registration could otherwise show a better HD95 mean)
        metrics["hd95_missing"] = sum(1 for label in labels
                                      if np.isfinite(dice[label]) and np.isnan(distance[label]))
        metrics["n_labels"] = len(labels)
    if fixed_points is not None and moving_points is not None:
        errors = landmark_errors(transform, fixed_points, moving_points)
        metrics.update(
            tre_mean_mm=float(errors.mean()),
            tre_median_mm=float(np.median(errors)),
            tre_max_mm=float(errors.max()),
            n_landmarks=int(errors.size),
        )
    if fixed_image is not None and warped_image is not None:
        metrics["ncc_after"] = ncc(warped_image, fixed_image, region_mask)
    return metrics


def parse_label_list(text: str) -> tuple[int, ...]:
    """``"1,2,5-9"`` -> ``(1, 2, 5, 6, 7, 8, 9)`` (label lists in pair files)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in re.split(r"[,\s;]+", text))):
        low, dash, high = part.partition("-")
        try:
            out.extend(range(int(low), int(high) + 1) if dash else [int(low)])
        except ValueError:
            raise InputError(
                f"bad label list {text!r}: expected integers and ranges like 5-9"
            ) from None
    return tuple(out)
