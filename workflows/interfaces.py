"""Thin Nipype interfaces: each node runs one named function of :mod:`regpipe.workflows.steps`.

The interfaces are ``SimpleInterface`` subclasses defined at module level, so nodes pickle for
MultiProc, SLURM and the other plugins, and ``File`` inputs make Nipype's cache (hash of path,
size and mtime, or content) decide what reruns. Destinations in the output dataset are
``hash_files=False`` strings: hashing a file that exists only after the first run would make
every rerun look outdated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from regpipe.workflows.steps import (
    METRIC_COLUMNS,
    ants_registration,
    bias_correct_file,
    collect_report_inputs,
    conform_file,
    evaluate_registration,
    network_registration,
    normalize_file,
    report_section,
    subject_report,
    write_derivative,
    write_metrics,
)

__all__ = [  # the step functions are re-exported for existing callers
    "METRIC_COLUMNS",
    "AntsRegistration",
    "BiasCorrect",
    "CollectReportInputs",
    "ConformImage",
    "DatasetFiles",
    "EvaluateRegistration",
    "NetworkRegistration",
    "NormalizeImage",
    "ReportSection",
    "SubjectReport",
    "WriteDerivative",
    "WriteMetrics",
    "collect_report_inputs",
    "report_section",
    "subject_report",
    "write_metrics",
]


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


# --------------------------------------------------------------------------- preprocessing


def _one_thread() -> None:
    """Nodes that declare one CPU (``n_procs`` 1) use one: torch would otherwise take every
    core of the machine in each of MultiProc's workers running such nodes side by side."""
    import torch

    torch.set_num_threads(1)


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
        _one_thread()
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
        _one_thread()
        out = _name(self.inputs.in_file, "norm", runtime.cwd)
        self._results["out_file"] = normalize_file(
            self.inputs.in_file, self.inputs.modality, out, _opt(self.inputs.mask)
        )
        return runtime


# --------------------------------------------------------------------------- registration


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
    mixed_precision = traits.Bool(False, usedefault=True, desc="bfloat16 autocast on CUDA")
    network_passes = traits.Int(1, usedefault=True, desc="times the network is applied")
    region = traits.Str(desc="conditional networks: body region")
    pair_type = traits.Enum("inter", "intra", desc="conditional networks: registration type")
    smoothness = traits.Float(desc="conditional networks: regularisation weight lam")
    smoothness_requested = traits.Float(desc="the lam asked for, when smoothness was clamped")


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
            mixed_precision=i.mixed_precision, network_passes=i.network_passes,
            region=_opt(i.region), pair_type=_opt(i.pair_type), smoothness=_opt(i.smoothness),
            smoothness_requested=_opt(i.smoothness_requested),
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
        _one_thread()
        i = self.inputs
        self._results.update(evaluate_registration(
            i.fixed, i.moving, i.forward_xfm, i.inverse_xfm, runtime.cwd,
            reg_metrics=_opt(i.reg_metrics), fixed_mask=_opt(i.fixed_mask),
            fixed_labels=_opt(i.fixed_labels), moving_labels=_opt(i.moving_labels),
        ))  # fmt: skip
        return runtime


# --------------------------------------------------------------------------- derivatives


class _WriteDerivativeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to store")
    # hash_files=False: the destination exists after the first run; hashing its content
    # would make every rerun look outdated.
    out_file = traits.Str(mandatory=True, hash_files=False, desc="absolute destination")
    meta_dict = traits.Dict(desc="sidecar fields")
    meta_json = File(exists=True, desc="JSON whose 'sidecar' entry is merged into the sidecar")
    grid_of = traits.Str(desc="image whose voxel order the stored image takes (the fixed "
                              "image as given, before reorientation to RAS)")


class _WriteDerivativeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the stored file")


class WriteDerivative(SimpleInterface):
    """Store one derivative file with its sidecar (:func:`write_derivative`)."""

    # Run on every run, cached or not: a deleted output is written again (an unchanged one is
    # left untouched by the byte-identical check of the atomic writers).
    _always_run = True

    input_spec = _WriteDerivativeInputSpec
    output_spec = _WriteDerivativeOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["out_file"] = write_derivative(
            i.in_file, i.out_file, i.meta_dict if isdefined(i.meta_dict) else {},
            _opt(i.meta_json), grid_of=_opt(i.grid_of),
        )
        return runtime


class _WriteMetricsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="evaluation JSON")
    out_file = traits.Str(mandatory=True, hash_files=False, desc="destination TSV")
    job = traits.Dict(mandatory=True, desc="the job (see regpipe.workflows.jobs)")
    method = traits.Str(mandatory=True, desc="method name")
    output_dir = traits.Str(desc="output dataset (unused; kept for the hash)")


class _WriteMetricsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="metrics TSV")
    out_json = File(exists=True, desc="its JSON sidecar")


class WriteMetrics(SimpleInterface):
    """Store the metrics TSV and JSON sidecar (:func:`write_metrics`)."""

    # Run on every run, cached or not: a deleted output is written again (an unchanged one is
    # left untouched by the byte-identical check of the atomic writers).
    _always_run = True

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
    (:func:`regpipe.workflows.derivatives.write_dataset_files`)."""

    _always_run = True  # a deleted dataset_description.json is written again

    input_spec = _DatasetFilesInputSpec
    output_spec = _DatasetFilesOutputSpec

    def _run_interface(self, runtime):
        from regpipe.workflows.derivatives import write_dataset_files

        i = self.inputs
        self._results["out_files"] = write_dataset_files(i.output_dir, i.methods, _opt(i.bids_dir))
        return runtime


# --------------------------------------------------------------------------- reports


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
        names = (
            "method",
            "fixed",
            "warped",
            "moving_preproc",
            "jacobian",
            "metrics_json",
            "space",
            "label",
        )
        self._results["section"] = report_section(**{n: getattr(self.inputs, n) for n in names})
        return runtime


class _CollectReportInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True)
    session = traits.Either(None, traits.Str, usedefault=True)
    output_dir = traits.Str(mandatory=True)
    sections = traits.List(mandatory=True, desc="section dicts (or lists of them)")


class _CollectReportOutputSpec(TraitedSpec):
    report_inputs = traits.Dict(desc="keyword arguments of write_subject_report")


class CollectReportInputs(SimpleInterface):
    """All report inputs of one subject as one dict (:func:`collect_report_inputs`)."""

    input_spec = _CollectReportInputSpec
    output_spec = _CollectReportOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        self._results["report_inputs"] = collect_report_inputs(
            i.subject, i.session, i.output_dir, i.sections
        )
        return runtime


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    report_inputs = traits.Dict(mandatory=True, desc="from CollectReportInputs")


class _SubjectReportOutputSpec(TraitedSpec):
    out_report = traits.Str(desc="the HTML report ('' when reports are unavailable)")


class SubjectReport(SimpleInterface):
    """Write one subject's HTML report (:func:`subject_report`)."""

    _always_run = True  # a deleted report is written again

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec

    def _run_interface(self, runtime):
        self._results["out_report"] = subject_report(self.inputs.report_inputs)
        return runtime
