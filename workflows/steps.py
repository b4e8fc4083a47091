"""What each workflow node does, as plain functions on files (no Nipype).

Every function takes and returns paths and calls the regpipe library; the Nipype interfaces
of :mod:`regpipe.workflows.interfaces` are thin wrappers around them, so each step runs and is
tested without a workflow (and ``--reports-only`` reuses :func:`report_section`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger("nipype.interface")

#: Most fixed-space points used to measure inverse consistency (a regular subsample).
_CONSISTENCY_POINTS = 20_000


def _write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> str:
    from regpipe.workflows.derivatives import to_json

    from regpipe.atomic import atomic_write_text

    atomic_write_text(path, to_json(data), parents=True)
    return str(path)


# --------------------------------------------------------------------------- preprocessing


def conform_file(in_file: str, kind: str, out_file: str) -> str:
    """Check and reorient an image, mask or label map to RAS+ (closest canonical axes).

    Images become float32, masks uint8 (0/1), label maps int32; the world position of every
    voxel is kept (only the voxel axes are permuted/flipped). Unreadable, empty, constant or
    non-3-D files raise :class:`regpipe.errors.InputError`.
    """
    import nibabel as nib

    from regpipe.atomic import atomic_write
    from regpipe.imageio import load_image

    image = load_image(in_file, kind, f"input {kind}")  # type: ignore[arg-type]
    if kind == "mask":
        data: np.ndarray = (np.asarray(image.data) != 0).astype(np.uint8)
    elif kind == "labels":
        data = np.asarray(image.data).astype(np.int32)
    else:
        data = np.asarray(image.data, dtype=np.float32)
    nifti = nib.Nifti1Image(data, image.geometry.affine)
    nifti.set_sform(image.geometry.affine, code=image.xform_code)  # 4 for an MNI template...
    nifti.set_qform(image.geometry.affine, code=image.xform_code)
    ras = nib.as_closest_canonical(nifti)
    atomic_write(out_file, lambda tmp: nib.save(ras, str(tmp)))
    return out_file


def bias_correct_file(
    in_file: str, out_file: str, mask: str | None = None, threads: int | None = None
) -> str:
    """N4 bias-field correction (:func:`regpipe.ants_methods.n4_bias_correct`) of a file."""
    from regpipe.ants_methods import n4_bias_correct
    from regpipe.imageio import save_image

    save_image(n4_bias_correct(in_file, mask=mask, threads=threads), out_file, np.float32)
    return out_file


def normalize_file(in_file: str, modality: str, out_file: str, mask: str | None = None) -> str:
    """Scale intensities to [0, 1] per modality (:func:`regpipe.preprocess.normalize_intensity`);
    voxels outside ``mask`` (when given) become 0."""
    from regpipe.imageio import Image, check_same_grid, load_image, save_image
    from regpipe.preprocess import normalize_intensity

    image = load_image(in_file, "image", "image to normalise")
    region = None
    if mask is not None:
        mask_image = load_image(mask, "mask", "brain mask")
        check_same_grid(image, mask_image, "brain mask")
        region = mask_image.data
    data = normalize_intensity(image.data, modality, mask=region)
    save_image(Image(data, image.geometry, header=image.header), out_file, np.float32)
    return out_file


# --------------------------------------------------------------------------- registration


def network_registration(
    fixed: str,
    moving: str,
    out_dir: str,
    *,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    weights: str | None = None,
    weights_name: str | None = None,
    weights_sha256: str | None = None,
    modality: str = "mri",
    affine_init: str = "ours",
    io_iterations: int = 0,
    device: str = "auto",
    threads: int | None = None,
    seed: int | None = None,
    mixed_precision: bool = False,
    network_passes: int = 1,
    region: str | None = None,
    pair_type: str | None = None,
    smoothness: float | None = None,
    smoothness_requested: float | None = None,
) -> dict[str, str]:
    """Network registration (:func:`regpipe.register`) of two files; writes the forward and
    inverse transforms (``.h5``), the warped image and ``reg_metrics.json`` in ``out_dir``.

    ``region``, ``pair_type`` and ``smoothness`` are the condition of a conditional network;
    the condition used is recorded as ``GeneratedBy[0]["Condition"]`` (absent for an
    unconditional one) in the transform sidecars; ``smoothness_requested``: what the user
    asked for when the workflow clamped ``smoothness`` to the weights' trained range (recorded
    as ``lam_requested``, as :func:`regpipe.register` records its own clamping)."""
    import torch

    import regpipe
    from regpipe.registration import register
    from regpipe.resources import measure_resources
    from regpipe.weights import sha256sum

    with measure_resources() as usage:
        result = register(
            fixed, moving, fixed_modality=modality, moving_modality=modality,
            weights=weights, fixed_mask=fixed_mask, moving_mask=moving_mask,
            affine=affine_init, io_iterations=io_iterations or None, device=device,
            threads=threads, seed=seed, mixed_precision=mixed_precision, progress=False,
            network_passes=network_passes, region=region, pair_type=pair_type,
            smoothness=smoothness,
        )  # fmt: skip
    metrics = {**result.metrics, **usage.as_metrics()}
    settings = result.settings
    condition = settings.get("condition")
    if condition is not None and smoothness_requested not in (None, condition["lam"]):
        condition["lam_requested"] = float(smoothness_requested)  # type: ignore[arg-type]
    if weights and not weights_sha256:
        weights_sha256 = sha256sum(weights)
    generated_by = {
        "Name": "regpipe",
        "Version": regpipe.__version__,
        "Description": "Foundation-network registration (uniGradICON-style)",
        "Weights": {
            "Name": weights_name or (Path(weights).name if weights else None),
            "File": Path(weights).name if weights else None,
            "SHA256": weights_sha256,
        },
        "AffineInit": settings.get("affine"),
        "InstanceOptimization": {
            "Iterations": settings.get("io_iterations", 0),
            "Method": settings.get("io_method"),
            "Similarity": settings.get("io_sim"),
        },
        "GridShape": settings.get("grid_shape"),
        "GridMode": settings.get("grid_mode"),
        "Seed": seed,
        "Device": settings.get("device"),
        "MixedPrecision": settings.get("mixed_precision", False),
        "Symmetric": settings.get("symmetric", False),  # both directions, see register()
        "NetworkPasses": settings.get("network_passes", 1),
        "Threads": threads,
        # the build too (2.13.0+cpu, +cu128): a container's tag need not say which it holds
        "TorchVersion": torch.__version__,
    }
    if settings.get("condition") is not None:  # a conditional network: what it was asked
        generated_by["Condition"] = settings["condition"]
    return _save_result(result, out_dir, metrics, settings, [generated_by])


def ants_registration(
    fixed: str,
    moving: str,
    out_dir: str,
    *,
    method: str,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    modality: str = "mri",
    seed: int | None = None,
    threads: int | None = None,
) -> dict[str, str]:
    """ANTs registration (:func:`regpipe.ants_methods.ants_register`) of two files; writes the
    same files as :func:`network_registration`."""
    import regpipe
    from regpipe.ants_methods import ants_register

    result = ants_register(
        fixed,
        moving,
        method=method,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,  # type: ignore[arg-type]
        fixed_modality=modality,
        moving_modality=modality,
        seed=seed,
        threads=threads,
    )
    settings = result.settings
    generated_by = [
        {
            "Name": "ANTs",
            "Version": f"antspyx {settings['ants_version']}",
            "Description": "antsRegistration through antspyx",
            "TypeOfTransform": settings["type_of_transform"],
            "Seed": seed,
            "Deterministic": settings["deterministic"],
            "Threads": settings["threads"],
            "Device": "cpu",
        },
        {
            "Name": "regpipe",
            "Version": regpipe.__version__,
            "Description": "Converted ANTs' warp and affine into one displacement field",
        },
    ]
    return _save_result(result, out_dir, dict(result.metrics), settings, generated_by)


def _save_result(
    result: Any, out_dir: str, metrics: dict, settings: dict, generated_by: list
) -> dict[str, str]:
    out = Path(out_dir)
    paths = {
        "forward_xfm": str(out / "forward_xfm.h5"),
        "inverse_xfm": str(out / "inverse_xfm.h5"),
        "warped": str(out / "warped.nii.gz"),
        "reg_metrics": str(out / "reg_metrics.json"),
    }
    result.save(paths["forward_xfm"], inverse_out=paths["inverse_xfm"], warped_out=paths["warped"])
    _write_json(
        paths["reg_metrics"],
        {
            "metrics": metrics,
            "settings": settings,
            "sidecar": {"GeneratedBy": generated_by},
        },
    )
    return paths


# --------------------------------------------------------------------------- evaluation


def evaluate_registration(
    fixed: str,
    moving: str,
    forward_xfm: str,
    inverse_xfm: str,
    out_dir: str,
    *,
    reg_metrics: str | None = None,
    fixed_mask: str | None = None,
    fixed_labels: str | None = None,
    moving_labels: str | None = None,
) -> dict[str, str]:
    """The same measures for every method, from the written transform files.

    Writes ``jacobian.nii.gz`` (determinant of the forward transform's Jacobian on the fixed
    grid) and ``metrics.json``: folding (%), SD of log J, min/max J, NCC before (identity)
    and after, inverse consistency (mm, mean and 95th percentile over the region), Dice per
    label and its mean when both label maps are given, and the registration's own runtime and
    peak memory. The region is ``fixed_mask``, or the fixed image above 0.05 (scaled).
    """
    from regpipe.imageio import Image, load_image, save_image
    from regpipe.metrics import (
        dice_per_label,
        folding_stats,
        jacobian_determinant,
        ncc,
        shared_labels,
    )
    from regpipe.transform_files import read_transform
    from regpipe.transforms import AffineTransform, DisplacementField
    from regpipe.warp import warp_array

    fixed_img = load_image(fixed, "image", "fixed image")
    moving_img = load_image(moving, "image", "moving image")
    forward = read_transform(forward_xfm)
    if not (
        isinstance(forward, DisplacementField)
        and forward.geometry.same_as(fixed_img.geometry, 1e-3)
    ):
        forward = DisplacementField.from_transform(forward, fixed_img.geometry)
    jacobian = jacobian_determinant(forward)
    if fixed_mask is not None:
        region = np.asarray(load_image(fixed_mask, "mask", "fixed mask").data) != 0
    else:
        region = np.asarray(fixed_img.data) > 0.05
    metrics: dict[str, Any] = dict(folding_stats(jacobian, region))
    before = warp_array(
        moving_img.data, moving_img.geometry, AffineTransform.identity(), fixed_img.geometry
    )
    after = warp_array(moving_img.data, moving_img.geometry, forward, fixed_img.geometry)
    metrics["ncc_before"] = ncc(before, fixed_img.data, region)
    metrics["ncc_after"] = ncc(after, fixed_img.data, region)
    metrics.update(_inverse_consistency(forward, read_transform(inverse_xfm), fixed_img, region))
    dice: dict[str, float] = {}
    if fixed_labels is not None and moving_labels is not None:
        fixed_seg = load_image(fixed_labels, "labels", "fixed labels")
        moving_seg = load_image(moving_labels, "labels", "moving labels")
        warped_seg = warp_array(
            moving_seg.data,
            moving_seg.geometry,
            forward,
            fixed_seg.geometry,
            interpolation="nearest",
        )
        scored = shared_labels(fixed_seg.data, moving_seg.data)  # as regpipe-bench scores
        dice = {
            str(k): v
            for k, v in dice_per_label(np.asarray(fixed_seg.data), warped_seg, scored).items()
        }
        valid = [v for v in dice.values() if np.isfinite(v)]
        metrics["dice_mean"] = float(np.mean(valid)) if valid else float("nan")
    registration: dict[str, Any] = {}
    if reg_metrics is not None:
        registration = json.loads(Path(reg_metrics).read_text())
        for key in ("runtime_s", "peak_memory_mb", "peak_memory_scope", "peak_gpu_memory_mb"):
            if key in registration.get("metrics", {}):
                metrics[key] = registration["metrics"][key]
    out = Path(out_dir)
    jacobian_file = save_image(
        Image(jacobian, fixed_img.geometry, header=fixed_img.header), out / "jacobian.nii.gz",
        np.float32
    )
    metrics_file = _write_json(
        out / "metrics.json",
        {
            "metrics": metrics,
            "dice": dice,
            "settings": registration.get("settings", {}),
            "method_metrics": registration.get("metrics", {}),
        },
    )
    return {"jacobian": str(jacobian_file), "metrics": metrics_file}


def _inverse_consistency(
    forward: Any, inverse: Any, fixed: Any, region: np.ndarray
) -> dict[str, float]:
    """``|inverse(forward(x)) - x|`` (mm) over a regular subsample of the region's voxels
    whose forward image lies where the inverse is defined (on its displacement field's grid:
    beyond it a field displaces nothing, and the error would measure the field of view, not
    the transforms), and the share of points that do."""
    nothing = {"inverse_consistency_mm_mean": float("nan"),
               "inverse_consistency_mm_p95": float("nan"),
               "inverse_consistency_coverage": float("nan")}
    index = np.argwhere(region)
    if index.size == 0:
        return nothing
    index = index[:: max(1, len(index) // _CONSISTENCY_POINTS)]
    points = fixed.geometry.voxel_to_world(index.astype(np.float64))
    mapped = forward.map_points(points)
    inside = _on_field_grid(inverse, mapped)
    if not inside.any():
        return {**nothing, "inverse_consistency_coverage": 0.0}
    error = np.linalg.norm(inverse.map_points(mapped[inside]) - points[inside], axis=-1)
    return {
        "inverse_consistency_mm_mean": float(error.mean()),
        "inverse_consistency_mm_p95": float(np.percentile(error, 95)),
        "inverse_consistency_coverage": float(inside.mean()),
    }


def _on_field_grid(transform: Any, points: np.ndarray) -> np.ndarray:
    """Which ``points`` lie on the grid of the displacement field ``transform`` starts with
    (all of them for an affine)."""
    first = transform
    while hasattr(first, "transforms") and first.transforms:
        first = first.transforms[0]
    geometry = getattr(first, "geometry", None)
    if geometry is None:
        return np.ones(len(points), dtype=bool)
    voxels = geometry.world_to_voxel(points)
    return np.all((voxels >= -0.5) & (voxels <= np.asarray(geometry.shape) - 0.5), axis=-1)


# --------------------------------------------------------------------------- derivatives


def write_derivative(
    in_file: str, out_file: str, meta: Mapping[str, Any], meta_json: str | None = None,
    grid_of: str | None = None,
) -> str:
    """Copy ``in_file`` to ``out_file`` atomically and write its JSON sidecar (``meta``, plus
    the ``sidecar`` entry of ``meta_json`` when given). With ``grid_of``, an image on the
    RAS-reoriented copy of that image's grid is stored in ``grid_of``'s own voxel order
    (:func:`in_voxel_order_of`)."""
    from regpipe.workflows.derivatives import sidecar_of

    from regpipe.atomic import atomic_copy

    sidecar = dict(meta)
    if meta_json is not None:
        sidecar.update(json.loads(Path(meta_json).read_text()).get("sidecar", {}))
    if grid_of is not None:
        in_file = in_voxel_order_of(in_file, grid_of)
    atomic_copy(in_file, out_file, parents=True)
    if sidecar:
        _write_json(sidecar_of(out_file), sidecar)
    return out_file


def in_voxel_order_of(in_file: str, reference: str) -> str:
    """``in_file``, or a copy of it in the voxel order of ``reference`` when it lies on the
    RAS-reoriented grid of ``reference`` (what preprocessing registers on): the same voxels,
    axes permuted and flipped back without interpolation, so an output "in the space of" an
    LPS reference image is on that image's own grid. Anything else is returned unchanged."""
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    from regpipe.imageio import read_grid

    image, target = nib.load(in_file), read_grid(reference)  # any format regpipe reads
    if image.shape[:3] == target.shape and np.allclose(image.affine, target.affine, atol=1e-3):
        return in_file
    current, wanted = io_orientation(image.affine), io_orientation(target.affine)
    if np.array_equal(current, wanted):
        return in_file
    moved = image.as_reoriented(ornt_transform(current, wanted))
    if moved.shape[:3] != target.shape or not np.allclose(moved.affine, target.affine,
                                                          atol=1e-3):
        return in_file
    out = Path.cwd() / f"voxel_order_{Path(in_file).name}"
    nib.save(moved, str(out))
    return str(out)


#: Metrics table columns: name -> (units, description).
METRIC_COLUMNS: dict[str, tuple[str | None, str]] = {
    "runtime_s": ("s", "Wall-clock time of the registration call (loading to metrics)"),
    "peak_memory_mb": ("MiB", "Peak resident memory of the process during the registration"),
    "peak_gpu_memory_mb": ("MiB", "Peak CUDA memory allocated during the registration"),
    "ncc_before": (None, "Global NCC of fixed and moving before any alignment (in the region)"),
    "ncc_after": (None, "Global NCC of fixed and warped moving (in the region)"),
    "folding_percent": ("%", "Share of region voxels with Jacobian determinant <= 0"),
    "sd_log_jacobian": (None, "Standard deviation of log Jacobian determinant (J > 0)"),
    "min_jacobian": (None, "Smallest Jacobian determinant in the region"),
    "max_jacobian": (None, "Largest Jacobian determinant in the region"),
    "inverse_consistency_mm_mean": ("mm", "Mean |inverse(forward(x)) - x| over the region"),
    "inverse_consistency_mm_p95": ("mm", "95th percentile of |inverse(forward(x)) - x|"),
    "inverse_consistency_coverage": (None, (
        "Share of the sampled points whose forward image lies on the inverse field's grid; "
        "the two consistency columns are measured on those")),
    "dice_mean": (None, "Mean Dice over labels (fixed labels vs warped moving labels)"),
}


def write_metrics(
    in_file: str, out_file: str, job: Mapping[str, Any], method: str
) -> tuple[str, str]:
    """Write the one-row metrics TSV ``out_file`` and its JSON sidecar from an evaluation JSON."""
    from regpipe.workflows.derivatives import sidecar_of

    from regpipe.atomic import atomic_write_text

    data = json.loads(Path(in_file).read_text())
    metrics, dice = data["metrics"], data.get("dice", {})
    # Column names avoid BIDS entity names (subject, session, space, suffix...): pybids reads
    # a TSV's JSON sidecar as metadata and would see conflicting entity values.
    row: dict[str, Any] = {
        "participant_id": f"sub-{job['subject']}",
        "session_id": f"ses-{job['session']}" if job.get("session") else None,
        "source_uri": job["source_uri"],
        "source_suffix": job["suffix"],
        "target_space": job["fixed_space"],
        # a res-1 and a res-2 run share target_space: the file name's entities, in the row too
        "target_cohort": (job.get("fixed_entities") or {}).get("cohort"),
        "target_res": (job.get("fixed_entities") or {}).get("res"),
        "method": method,
        # which weights made a network row: the group level warns when one table mixes them
        "weights_sha256": job.get("weights_sha256") if method == "network" else None,
        "network_passes": (data.get("settings") or {}).get("network_passes")
        if method == "network" else None,
    }
    # a conditional network's condition (as used: lam after clamping): n/a otherwise
    condition = ((data.get("settings") or {}).get("condition") or {}) if method == "network" \
        else {}
    row.update({f"condition_{key}": condition.get(key) for key in ("region", "pair_type", "lam")})
    row.update({key: metrics.get(key) for key in METRIC_COLUMNS})
    row.update({f"dice_{label}": value for label, value in sorted(dice.items(), key=_label_order)})

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "n/a"
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    atomic_write_text(
        out_file, "\t".join(row) + "\n" + "\t".join(cell(v) for v in row.values()) + "\n",
        parents=True,
    )
    columns: dict[str, Any] = {
        "participant_id": {"Description": "Subject (sub-<label>)"},
        "session_id": {"Description": "Session (ses-<label>; n/a without sessions)"},
        "source_uri": {"Description": "BIDS URI of the moving image"},
        "source_suffix": {"Description": "Suffix (contrast) of the moving image"},
        "target_space": {"Description": "Target space (fixed image) label"},
        "target_cohort": {"Description": "Cohort of the target template (n/a: none)"},
        "target_res": {"Description": "Resolution label of the target template (res-<label> "
                                      "in the file names; n/a: none)"},
        "method": {
            "Description": "Registration method (network, ants-syn, ants-synquick, ants-affine)"
        },
        "weights_sha256": {"Description": "SHA-256 of the network weights (network rows)"},
        "network_passes": {"Description": "Times the network was applied (network rows)"},
        "condition_region": {"Description": "Body region of a conditional network's condition "
                                            "(network rows; n/a: unconditional weights)"},
        "condition_pair_type": {"Description": "Registration type of the condition (inter or "
                                               "intra; network rows of conditional weights)"},
        "condition_lam": {"Description": "Smoothness lam the conditional network used (after "
                                         "clamping to its trained range)"},
    }
    for key, (units, description) in METRIC_COLUMNS.items():
        columns[key] = {"Description": description, **({"Units": units} if units else {})}
    for label in dice:
        columns[f"dice_{label}"] = {"Description": f"Dice overlap of label {label}"}
    sidecar = {
        **columns,
        "Method": method,
        "Sources": [job["source_uri"], job["fixed_uri"]],
        "Dice": dice,
        "Settings": data.get("settings", {}),
        "MethodMetrics": data.get("method_metrics", {}),
    }
    json_file = _write_json(sidecar_of(out_file), sidecar)
    return out_file, json_file


def _label_order(item: tuple[str, Any]) -> tuple[int, str]:
    label = item[0]
    return (int(label), label) if label.lstrip("-").isdigit() else (0, label)


# --------------------------------------------------------------------------- reports


def report_section(
    *,
    method: str,
    fixed: str,
    warped: str,
    moving_preproc: str,
    jacobian: str,
    metrics_json: str,
    space: str,
    label: str,
) -> dict[str, Any]:
    """One section of a subject's report (the dict :mod:`regpipe.reports` expects)."""
    sidecar = json.loads(Path(metrics_json).read_text())
    metrics: dict[str, Any] = dict(sidecar.get("MethodMetrics", {}))
    tsv = Path(metrics_json).with_suffix(".tsv")
    if tsv.is_file():
        header, values = tsv.read_text().splitlines()[:2]
        for key, value in zip(header.split("\t"), values.split("\t"), strict=False):
            if key in METRIC_COLUMNS or key.startswith("dice_"):
                metrics[key] = None if value == "n/a" else float(value)
    metrics["dice"] = sidecar.get("Dice", {})
    return {
        "method": method, "fixed": fixed, "warped": warped, "moving_preproc": moving_preproc,
        "jacobian": jacobian, "metrics": metrics, "space": space, "label": label,
        "settings": sidecar.get("Settings", {}),
    }  # fmt: skip


def collect_report_inputs(
    subject: str, session: str | None, output_dir: str, sections: list
) -> dict[str, Any]:
    """The inputs of :func:`regpipe.reports.write_subject_report` in one dict (``sections``
    flattened); ``out_html`` is left to :func:`subject_report` (``output_dir/sub-<l>.html``),
    so the dict never names a file that exists only after the report is written (which would
    change Nipype's hash on the next run)."""
    flat = [s for item in sections for s in (item if isinstance(item, list) else [item])]
    return {"subject": subject, "session": session, "output_dir": output_dir, "sections": flat}


def subject_report(report_inputs: Mapping[str, Any]) -> str:
    """Write a subject's HTML report with :func:`regpipe.reports.write_subject_report`
    (to ``report_inputs["out_html"]``, default ``output_dir/sub-<subject>.html``).

    Returns ``""`` (and logs a warning) while ``regpipe.reports`` does not provide it yet.
    """
    import importlib

    try:
        reports = importlib.import_module("regpipe.reports")
    except ModuleNotFoundError as exc:
        if exc.name != "regpipe.reports":
            raise
        LOGGER.warning("QC report skipped: regpipe.reports is not installed")
        return ""
    if not hasattr(reports, "write_subject_report"):
        LOGGER.warning("QC report skipped: regpipe.reports has no write_subject_report")
        return ""
    inputs = dict(report_inputs)
    output_dir = Path(inputs["output_dir"])
    out_html = inputs.get("out_html") or output_dir / f"sub-{inputs['subject']}.html"
    path = reports.write_subject_report(
        subject=inputs["subject"], session=inputs["session"], output_dir=output_dir,
        sections=list(inputs["sections"]), out_html=Path(out_html),
    )  # fmt: skip
    return str(path)
