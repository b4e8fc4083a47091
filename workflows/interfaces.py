"""Thin Nipype interfaces: each runs one named, module-level function on files.

The functions (``conform_file``, ``bias_correct_file``, ``normalize_file``,
``network_registration``, ``ants_registration``, ``evaluate_registration``,
``write_derivative``, ``write_metrics``, ``subject_report``...) take and return file paths and
call the regpipe library; they run and are tested without Nipype. The interfaces are
``SimpleInterface`` subclasses defined at module level, so nodes pickle for MultiProc, SLURM
and the other plugins, and ``File`` inputs make Nipype's cache (hash of path, size and
mtime, or content) decide what reruns.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

LOGGER = logging.getLogger("nipype.interface")

#: Most fixed-space points used to measure inverse consistency (a regular subsample).
_CONSISTENCY_POINTS = 20_000


def _name(in_file: str, tag: str, cwd: str, ext: str = ".nii.gz") -> str:
    base = Path(in_file).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return str(Path(cwd) / f"{base}_{tag}{ext}")


def _opt(value: Any) -> Any:
    """Nipype's ``Undefined`` as ``None``."""
    return value if isdefined(value) else None


def _write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> str:
    from regpipe.workflows.outputs import atomic_write_text, to_json

    atomic_write_text(path, to_json(data))
    return str(path)


# --------------------------------------------------------------------------- preprocessing


def conform_file(in_file: str, kind: str, out_file: str) -> str:
    """Check and reorient an image, mask or label map to RAS+ (closest canonical axes).

    Images become float32, masks uint8 (0/1), label maps int32; the world position of every
    voxel is kept (only the voxel axes are permuted/flipped). Unreadable, empty, constant or
    non-3-D files raise :class:`regpipe.errors.InputError`.
    """
    import nibabel as nib

    from regpipe.imageio import atomic_write, load_image

    image = load_image(in_file, kind, f"input {kind}")  # type: ignore[arg-type]
    if kind == "mask":
        data: np.ndarray = (np.asarray(image.data) != 0).astype(np.uint8)
    elif kind == "labels":
        data = np.asarray(image.data).astype(np.int32)
    else:
        data = np.asarray(image.data, dtype=np.float32)
    nifti = nib.Nifti1Image(data, image.geometry.affine)
    nifti.set_sform(image.geometry.affine, code=1)
    nifti.set_qform(image.geometry.affine, code=1)
    ras = nib.as_closest_canonical(nifti)
    atomic_write(out_file, lambda tmp: nib.save(ras, str(tmp)))
    return out_file


def bias_correct_file(in_file: str, out_file: str, mask: str | None = None, threads: int | None = None) -> str:
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
    save_image(Image(data, image.geometry), out_file, np.float32)
    return out_file


class _ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image, mask or label map")
    kind = traits.Enum("image", "mask", "labels", usedefault=True, desc="what in_file holds")


class _OutFileSpec(TraitedSpec):
    out_file = File(exists=True, desc="the result")


class ConformImage(SimpleInterface):
    """Check a file and reorient it to RAS+ (:func:`conform_file`)."""

    input_spec = _ConformInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        out = _name(self.inputs.in_file, "ras", runtime.cwd)
        self._results["out_file"] = conform_file(self.inputs.in_file, self.inputs.kind, out)
        return runtime


class _BiasCorrectInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to correct")
    mask = File(exists=True, desc="region where the bias field is estimated")
    threads = traits.Int(desc="ITK threads")


class BiasCorrect(SimpleInterface):
    """N4 bias-field correction through antspyx (:func:`bias_correct_file`)."""

    input_spec = _BiasCorrectInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        out = _name(self.inputs.in_file, "n4", runtime.cwd)
        self._results["out_file"] = bias_correct_file(
            self.inputs.in_file, out, _opt(self.inputs.mask), _opt(self.inputs.threads)
        )
        return runtime


class _NormalizeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to normalise")
    modality = traits.Enum("mri", "ct", mandatory=True, desc="normalisation rule")
    mask = File(exists=True, desc="zero the image outside this mask (skull-stripping)")


class NormalizeImage(SimpleInterface):
    """Per-modality intensity normalisation to [0, 1] (:func:`normalize_file`)."""

    input_spec = _NormalizeInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        out = _name(self.inputs.in_file, "norm", runtime.cwd)
        self._results["out_file"] = normalize_file(
            self.inputs.in_file, self.inputs.modality, out, _opt(self.inputs.mask)
        )
        return runtime


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
) -> dict[str, str]:
    """Network registration (:func:`regpipe.register`) of two files; writes the forward and
    inverse transforms (``.h5``), the warped image and ``reg_metrics.json`` in ``out_dir``."""
    import regpipe
    from regpipe.ants_methods import measure_resources
    from regpipe.registration import register
    from regpipe.weights import sha256sum

    with measure_resources() as usage:
        result = register(
            fixed, moving, fixed_modality=modality, moving_modality=modality,
            weights=weights, fixed_mask=fixed_mask, moving_mask=moving_mask,
            affine=affine_init, io_iterations=io_iterations or None, device=device,
            threads=threads, seed=seed, progress=False,
        )  # fmt: skip
    metrics = {**result.metrics, **usage.as_metrics()}
    settings = result.settings
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
        "Threads": threads,
    }
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
        fixed, moving, method=method, fixed_mask=fixed_mask, moving_mask=moving_mask,  # type: ignore[arg-type]
        fixed_modality=modality, moving_modality=modality, seed=seed, threads=threads,
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


def _save_result(result: Any, out_dir: str, metrics: dict, settings: dict, generated_by: list) -> dict[str, str]:
    out = Path(out_dir)
    paths = {
        "forward_xfm": str(out / "forward_xfm.h5"),
        "inverse_xfm": str(out / "inverse_xfm.h5"),
        "warped": str(out / "warped.nii.gz"),
        "reg_metrics": str(out / "reg_metrics.json"),
    }
    result.save(paths["forward_xfm"], inverse_out=paths["inverse_xfm"], warped_out=paths["warped"])
    _write_json(paths["reg_metrics"], {
        "metrics": metrics, "settings": settings, "sidecar": {"GeneratedBy": generated_by},
    })
    return paths


class _RegistrationInputSpec(BaseInterfaceInputSpec):
    fixed = File(exists=True, mandatory=True, desc="preprocessed fixed image")
    moving = File(exists=True, mandatory=True, desc="preprocessed moving image")
    fixed_mask = File(exists=True, desc="fixed-space region")
    moving_mask = File(exists=True, desc="moving-space region")
    modality = traits.Enum("mri", "ct", usedefault=True, desc="intensity normalisation rule")
    seed = traits.Int(desc="random seed (deterministic run)")
    threads = traits.Int(desc="CPU threads")


class _NetworkInputSpec(_RegistrationInputSpec):
    weights = File(exists=True, desc="network checkpoint (none: affine + optimisation only)")
    weights_name = traits.Str(desc="registry name of the weights")
    weights_sha256 = traits.Str(desc="SHA-256 of the weights file (computed when absent)")
    affine_init = traits.Enum("ours", "ants", "none", usedefault=True, desc="affine pre-alignment")
    io_iterations = traits.Int(0, usedefault=True, desc="instance-optimisation steps")
    device = traits.Str("auto", usedefault=True, desc="auto, cpu, cuda or cuda:N")


class _AntsInputSpec(_RegistrationInputSpec):
    method = traits.Enum("syn", "synquick", "affine", mandatory=True, desc="ANTs method")


class _RegistrationOutputSpec(TraitedSpec):
    forward_xfm = File(exists=True, desc="fixed -> moving transform (resamples moving onto fixed)")
    inverse_xfm = File(exists=True, desc="moving -> fixed transform")
    warped = File(exists=True, desc="moving image resampled on the fixed grid")
    reg_metrics = File(exists=True, desc="JSON: metrics, settings and sidecar GeneratedBy")


def _common(inputs: Any) -> dict[str, Any]:
    return {
        "fixed_mask": _opt(inputs.fixed_mask),
        "moving_mask": _opt(inputs.moving_mask),
        "modality": inputs.modality,
        "seed": _opt(inputs.seed),
        "threads": _opt(inputs.threads),
    }


class NetworkRegistration(SimpleInterface):
    """Foundation-network registration (:func:`network_registration`)."""

    input_spec = _NetworkInputSpec
    output_spec = _RegistrationOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results.update(network_registration(
            i.fixed, i.moving, runtime.cwd, weights=_opt(i.weights),
            weights_name=_opt(i.weights_name), weights_sha256=_opt(i.weights_sha256),
            affine_init=i.affine_init, io_iterations=i.io_iterations, device=i.device,
            **_common(i),
        ))  # fmt: skip
        return runtime


class AntsRegistration(SimpleInterface):
    """ANTs registration through antspyx (:func:`ants_registration`)."""

    input_spec = _AntsInputSpec
    output_spec = _RegistrationOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results.update(
            ants_registration(i.fixed, i.moving, runtime.cwd, method=i.method, **_common(i))
        )
        return runtime


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
    from regpipe.metrics import dice_per_label, folding_stats, jacobian_determinant, ncc
    from regpipe.transform_files import read_transform
    from regpipe.transforms import AffineTransform, DisplacementField
    from regpipe.warp import warp_array

    fixed_img = load_image(fixed, "image", "fixed image")
    moving_img = load_image(moving, "image", "moving image")
    forward = read_transform(forward_xfm)
    if not (isinstance(forward, DisplacementField) and forward.geometry.same_as(fixed_img.geometry, 1e-3)):
        forward = DisplacementField.from_transform(forward, fixed_img.geometry)
    jacobian = jacobian_determinant(forward)
    if fixed_mask is not None:
        region = np.asarray(load_image(fixed_mask, "mask", "fixed mask").data) != 0
    else:
        region = np.asarray(fixed_img.data) > 0.05
    metrics: dict[str, Any] = dict(folding_stats(jacobian, region))
    before = warp_array(moving_img.data, moving_img.geometry, AffineTransform.identity(), fixed_img.geometry)
    after = warp_array(moving_img.data, moving_img.geometry, forward, fixed_img.geometry)
    metrics["ncc_before"] = ncc(before, fixed_img.data, region)
    metrics["ncc_after"] = ncc(after, fixed_img.data, region)
    metrics.update(_inverse_consistency(forward, read_transform(inverse_xfm), fixed_img, region))
    dice: dict[str, float] = {}
    if fixed_labels is not None and moving_labels is not None:
        fixed_seg = load_image(fixed_labels, "labels", "fixed labels")
        moving_seg = load_image(moving_labels, "labels", "moving labels")
        warped_seg = warp_array(moving_seg.data, moving_seg.geometry, forward, fixed_seg.geometry,
                                interpolation="nearest")
        dice = {str(k): v for k, v in dice_per_label(np.asarray(fixed_seg.data), warped_seg).items()}
        valid = [v for v in dice.values() if np.isfinite(v)]
        metrics["dice_mean"] = float(np.mean(valid)) if valid else float("nan")
    registration: dict[str, Any] = {}
    if reg_metrics is not None:
        registration = json.loads(Path(reg_metrics).read_text())
        for key in ("runtime_s", "peak_memory_mb", "peak_memory_scope", "peak_gpu_memory_mb"):
            if key in registration.get("metrics", {}):
                metrics[key] = registration["metrics"][key]
    out = Path(out_dir)
    jacobian_file = save_image(Image(jacobian, fixed_img.geometry), out / "jacobian.nii.gz", np.float32)
    metrics_file = _write_json(out / "metrics.json", {
        "metrics": metrics, "dice": dice, "settings": registration.get("settings", {}),
        "method_metrics": registration.get("metrics", {}),
    })
    return {"jacobian": str(jacobian_file), "metrics": metrics_file}


def _inverse_consistency(forward: Any, inverse: Any, fixed: Any, region: np.ndarray) -> dict[str, float]:
    """``|inverse(forward(x)) - x|`` (mm) over a regular subsample of the region's voxels."""
    index = np.argwhere(region)
    if index.size == 0:
        return {"inverse_consistency_mm_mean": float("nan"), "inverse_consistency_mm_p95": float("nan")}
    index = index[:: max(1, len(index) // _CONSISTENCY_POINTS)]
    points = fixed.geometry.voxel_to_world(index.astype(np.float64))
    error = np.linalg.norm(inverse.map_points(forward.map_points(points)) - points, axis=-1)
    return {
        "inverse_consistency_mm_mean": float(error.mean()),
        "inverse_consistency_mm_p95": float(np.percentile(error, 95)),
    }


class _EvaluateInputSpec(BaseInterfaceInputSpec):
    fixed = File(exists=True, mandatory=True, desc="preprocessed fixed image")
    moving = File(exists=True, mandatory=True, desc="preprocessed moving image")
    forward_xfm = File(exists=True, mandatory=True, desc="fixed -> moving transform file")
    inverse_xfm = File(exists=True, mandatory=True, desc="moving -> fixed transform file")
    reg_metrics = File(exists=True, desc="registration JSON (runtime, memory, settings)")
    fixed_mask = File(exists=True, desc="region of the fixed image measured")
    fixed_labels = File(exists=True, desc="fixed label map")
    moving_labels = File(exists=True, desc="moving label map")


class _EvaluateOutputSpec(TraitedSpec):
    jacobian = File(exists=True, desc="Jacobian determinant map on the fixed grid")
    metrics = File(exists=True, desc="metrics JSON")


class EvaluateRegistration(SimpleInterface):
    """Metrics of one registration (:func:`evaluate_registration`)."""

    input_spec = _EvaluateInputSpec
    output_spec = _EvaluateOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results.update(evaluate_registration(
            i.fixed, i.moving, i.forward_xfm, i.inverse_xfm, runtime.cwd,
            reg_metrics=_opt(i.reg_metrics), fixed_mask=_opt(i.fixed_mask),
            fixed_labels=_opt(i.fixed_labels), moving_labels=_opt(i.moving_labels),
        ))  # fmt: skip
        return runtime


# --------------------------------------------------------------------------- derivatives


def write_derivative(in_file: str, out_file: str, meta: Mapping[str, Any], meta_json: str | None = None) -> str:
    """Copy ``in_file`` to ``out_file`` atomically and write its JSON sidecar (``meta``, plus
    the ``sidecar`` entry of ``meta_json`` when given)."""
    from regpipe.workflows.outputs import atomic_copy, sidecar_of

    sidecar = dict(meta)
    if meta_json is not None:
        sidecar.update(json.loads(Path(meta_json).read_text()).get("sidecar", {}))
    atomic_copy(in_file, out_file)
    if sidecar:
        _write_json(sidecar_of(out_file), sidecar)
    return out_file


class _WriteDerivativeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to store")
    out_file = traits.Str(mandatory=True, desc="absolute destination in the derivative dataset")
    meta_dict = traits.Dict(desc="sidecar fields")
    meta_json = File(exists=True, desc="JSON whose 'sidecar' entry is merged into the sidecar")


class _WriteDerivativeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the stored file")


class WriteDerivative(SimpleInterface):
    """Store one derivative file with its sidecar (:func:`write_derivative`)."""

    input_spec = _WriteDerivativeInputSpec
    output_spec = _WriteDerivativeOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["out_file"] = write_derivative(
            i.in_file, i.out_file, i.meta_dict if isdefined(i.meta_dict) else {}, _opt(i.meta_json)
        )
        return runtime


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
    "dice_mean": (None, "Mean Dice over labels (fixed labels vs warped moving labels)"),
}


def write_metrics(in_file: str, out_file: str, job: Mapping[str, Any], method: str) -> tuple[str, str]:
    """Write the one-row metrics TSV ``out_file`` and its JSON sidecar from an evaluation JSON."""
    from regpipe.workflows.outputs import atomic_write_text, sidecar_of

    data = json.loads(Path(in_file).read_text())
    metrics, dice = data["metrics"], data.get("dice", {})
    row: dict[str, Any] = {
        "subject": job["subject"],
        "session": job.get("session"),
        "source": job["source_uri"],
        "suffix": job["suffix"],
        "space": job["fixed_space"],
        "method": method,
    }
    row.update({key: metrics.get(key) for key in METRIC_COLUMNS})
    row.update({f"dice_{label}": value for label, value in sorted(dice.items(), key=_label_order)})

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "n/a"
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    atomic_write_text(out_file, "\t".join(row) + "\n" + "\t".join(cell(v) for v in row.values()) + "\n")
    columns: dict[str, Any] = {
        "subject": {"Description": "Subject label"},
        "session": {"Description": "Session label (n/a without sessions)"},
        "source": {"Description": "BIDS URI of the moving image"},
        "suffix": {"Description": "Suffix (contrast) of the moving image"},
        "space": {"Description": "Target space (fixed image) label"},
        "method": {"Description": "Registration method (network, ants-syn, ants-synquick, ants-affine)"},
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


class _WriteMetricsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="evaluation JSON")
    out_file = traits.Str(mandatory=True, desc="destination TSV")
    job = traits.Dict(mandatory=True, desc="the job (see regpipe.workflows.base)")
    method = traits.Str(mandatory=True, desc="method name")
    output_dir = traits.Str(desc="output dataset (unused; kept for the hash)")


class _WriteMetricsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="metrics TSV")
    out_json = File(exists=True, desc="its JSON sidecar")


class WriteMetrics(SimpleInterface):
    """Store the metrics TSV and JSON sidecar (:func:`write_metrics`)."""

    input_spec = _WriteMetricsInputSpec
    output_spec = _WriteMetricsOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        tsv, sidecar = write_metrics(i.in_file, i.out_file, i.job, i.method)
        self._results.update(out_file=tsv, out_json=sidecar)
        return runtime


class _DatasetFilesInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="output dataset")
    methods = traits.List(traits.Str, mandatory=True, desc="methods run")
    bids_dir = traits.Str(desc="raw dataset")


class _DatasetFilesOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="dataset_description.json files")


class DatasetFiles(SimpleInterface):
    """Dataset-level files, safe under concurrent runs
    (:func:`regpipe.workflows.outputs.write_dataset_files`)."""

    input_spec = _DatasetFilesInputSpec
    output_spec = _DatasetFilesOutputSpec

    def _run_interface(self, runtime):
        from regpipe.workflows.outputs import write_dataset_files

        i = self.inputs
        self._results["out_files"] = write_dataset_files(i.output_dir, i.methods, _opt(i.bids_dir))
        return runtime


# --------------------------------------------------------------------------- reports


def report_section(
    *, method: str, fixed: str, warped: str, moving_preproc: str, jacobian: str,
    metrics_json: str, space: str, label: str,
) -> dict[str, Any]:
    """One section of a subject's report (the dict :mod:`regpipe.reports` expects)."""
    sidecar = json.loads(Path(metrics_json).read_text())
    metrics: dict[str, Any] = dict(sidecar.get("MethodMetrics", {}))
    tsv = Path(metrics_json).with_suffix(".tsv")
    if tsv.is_file():
        header, values = tsv.read_text().splitlines()[:2]
        for key, value in zip(header.split("\t"), values.split("\t")):
            if key in METRIC_COLUMNS or key.startswith("dice_"):
                metrics[key] = None if value == "n/a" else float(value)
    metrics["dice"] = sidecar.get("Dice", {})
    return {
        "method": method, "fixed": fixed, "warped": warped, "moving_preproc": moving_preproc,
        "jacobian": jacobian, "metrics": metrics, "space": space, "label": label,
    }  # fmt: skip


class _ReportSectionInputSpec(BaseInterfaceInputSpec):
    method = traits.Str(mandatory=True)
    fixed = File(exists=True, mandatory=True, desc="preprocessed fixed image")
    warped = File(exists=True, mandatory=True, desc="warped moving image")
    moving_preproc = File(exists=True, mandatory=True, desc="preprocessed moving image")
    jacobian = File(exists=True, mandatory=True, desc="Jacobian determinant map")
    metrics_json = File(exists=True, mandatory=True, desc="metrics sidecar")
    space = traits.Str(mandatory=True)
    label = traits.Str(mandatory=True)


class _ReportSectionOutputSpec(TraitedSpec):
    section = traits.Dict(desc="report section")


class ReportSection(SimpleInterface):
    """Gather one method's report inputs into a dict (:func:`report_section`)."""

    input_spec = _ReportSectionInputSpec
    output_spec = _ReportSectionOutputSpec

    def _run_interface(self, runtime):
        names = ("method", "fixed", "warped", "moving_preproc", "jacobian", "metrics_json",
                 "space", "label")
        self._results["section"] = report_section(**{n: getattr(self.inputs, n) for n in names})
        return runtime


def collect_report_inputs(
    subject: str, session: str | None, output_dir: str, sections: list, out_html: str
) -> dict[str, Any]:
    """Every input of :func:`regpipe.reports.write_subject_report` in one dict."""
    flat = [s for item in sections for s in (item if isinstance(item, list) else [item])]
    return {
        "subject": subject, "session": session, "output_dir": output_dir,
        "sections": flat, "out_html": out_html,
    }  # fmt: skip


def subject_report(report_inputs: Mapping[str, Any]) -> str:
    """Write a subject's HTML report with :func:`regpipe.reports.write_subject_report`.

    Returns ``""`` (and logs a warning) while ``regpipe.reports`` does not provide it yet.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec("regpipe.reports") is None:
        LOGGER.warning("QC report skipped: regpipe.reports is not installed")
        return ""
    reports = importlib.import_module("regpipe.reports")
    if not hasattr(reports, "write_subject_report"):
        LOGGER.warning("QC report skipped: regpipe.reports has no write_subject_report")
        return ""
    inputs = dict(report_inputs)
    path = reports.write_subject_report(
        subject=inputs["subject"], session=inputs["session"],
        output_dir=Path(inputs["output_dir"]), sections=list(inputs["sections"]),
        out_html=Path(inputs["out_html"]),
    )  # fmt: skip
    return str(path)


class _CollectReportInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True)
    session = traits.Either(None, traits.Str, usedefault=True)
    output_dir = traits.Str(mandatory=True)
    sections = traits.List(mandatory=True, desc="section dicts (or lists of them)")
    out_html = traits.Str(mandatory=True)


class _CollectReportOutputSpec(TraitedSpec):
    report_inputs = traits.Dict(desc="keyword arguments of write_subject_report")


class CollectReportInputs(SimpleInterface):
    """All report inputs of one subject as one dict (:func:`collect_report_inputs`)."""

    input_spec = _CollectReportInputSpec
    output_spec = _CollectReportOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["report_inputs"] = collect_report_inputs(
            i.subject, i.session, i.output_dir, i.sections, i.out_html
        )
        return runtime


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    report_inputs = traits.Dict(mandatory=True, desc="from CollectReportInputs")


class _SubjectReportOutputSpec(TraitedSpec):
    out_report = traits.Str(desc="the HTML report ('' when reports are unavailable)")


class SubjectReport(SimpleInterface):
    """Write one subject's HTML report (:func:`subject_report`)."""

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec

    def _run_interface(self, runtime):
        self._results["out_report"] = subject_report(self.inputs.report_inputs)
        return runtime
