"""Derivative writing: sidecar metadata and the ``init_ds_*_wf`` sink factories.

Nothing here computes anything; the compute graph hands finished files to these sinks. The
output scheme (file names, nested ANTs datasets, dataset-level files) is described and made in
:mod:`regpipe.workflows.derivatives`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from regpipe.workflows.derivatives import bids_uri, method_root, output_paths
from regpipe.workflows.interfaces import WriteDerivative, WriteMetrics

# --------------------------------------------------------------------------- sidecars


def _uri_in(path: Path, output_dir: str | os.PathLike[str], method: str) -> str:
    """BIDS URI of an output, seen from ``method``'s dataset."""
    root = method_root(output_dir, method)
    if Path(path).is_relative_to(root) and not (
        method == "network" and Path(path).is_relative_to(Path(output_dir) / "derivatives")
    ):
        return bids_uri(path, root)
    return bids_uri(path, output_dir, "regpipe")


def source_metadata(job: Mapping[str, Any], output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Sidecar fields every image derived from the moving image shares."""
    return {"SkullStripped": bool(job.get("moving_mask")), "Sources": [job["source_uri"]]}


def transform_metadata(
    job: Mapping[str, Any], output_dir: str | os.PathLike[str], method: str, *, forward: bool
) -> dict[str, Any]:
    """Static sidecar of a transform file (``GeneratedBy`` is added when it is written)."""
    paths = output_paths(output_dir, job, method)
    suffix, space = job["suffix"], job["fixed_space"]
    source, target = (suffix, space) if forward else (space, suffix)
    grid = "fixed (target)" if forward else "moving (source)"
    return {
        "Sources": [job["source_uri"], job["fixed_uri"]],
        "FromSpace": source,
        "ToSpace": target,
        "Mode": "image",
        "Description": (
            f"Resamples an image in {source} space into {target} space: maps {target} points "
            f"to {source} points (pull-back), as antsApplyTransforms expects."
        ),
        "TransformType": "DisplacementField",
        "Format": "ITK HDF5 CompositeTransform holding one DisplacementFieldTransform (LPS mm)",
        # the field is sampled where preprocessing put the image: its grid reoriented to RAS
        # (same voxel centres, axes permuted); a displacement field is valid on any grid
        "Grid": f"the {grid} image's voxel grid, axes reoriented to RAS (sheared axes, which "
                "ITK cannot store: the smallest grid with orthogonal axes covering it)",
        "FixedImage": job["fixed_uri"],
        "MovingImage": job["source_uri"],
        "Method": method,
        "InverseTransform": _uri_in(
            paths["inverse_xfm" if forward else "forward_xfm"], output_dir, method
        ),
    }


def warped_metadata(
    job: Mapping[str, Any], output_dir: str | os.PathLike[str], method: str
) -> dict[str, Any]:
    """Static sidecar of the warped (template-space) preprocessed image."""
    paths = output_paths(output_dir, job, method)
    meta = source_metadata(job, output_dir)
    meta.update(
        {
            "Sources": [
                _uri_in(paths["preproc"], output_dir, method),
                _uri_in(paths["forward_xfm"], output_dir, method),
            ],
            "SpatialReference": job["fixed_uri"],
            "Description": (
                f"Preprocessed {job['suffix']} image resampled into {job['fixed_space']} "
                f"(trilinear) through the forward transform of method {method}."
            ),
            "Method": method,
        }
    )
    return meta


def jacobian_metadata(
    job: Mapping[str, Any], output_dir: str | os.PathLike[str], method: str
) -> dict[str, Any]:
    """Static sidecar of the Jacobian determinant map."""
    paths = output_paths(output_dir, job, method)
    meta = source_metadata(job, output_dir)
    meta.update(
        {
            "Sources": [_uri_in(paths["forward_xfm"], output_dir, method)],
            "SpatialReference": job["fixed_uri"],
            "Description": (
                "Determinant of the Jacobian of the forward transform on the fixed grid: < 1 the "
                f"{job['fixed_space']} region maps to a smaller {job['suffix']} region, "
                "<= 0 folding."
            ),
            "Units": "arbitrary",
            "Method": method,
        }
    )
    return meta


# --------------------------------------------------------------------------- sink workflows


def _sink(name: str, out_file: Path, meta: Mapping[str, Any], grid_of: str | None = None
          ) -> pe.Node:
    sink = pe.Node(
        WriteDerivative(out_file=str(out_file), meta_dict=dict(meta)),
        name=name,
        run_without_submitting=True,
    )
    if grid_of is not None:  # images "in the fixed space": on the fixed image's own grid
        sink.inputs.grid_of = str(grid_of)
    return sink


def init_ds_preproc_wf(
    *, job: Mapping[str, Any], output_dir: str | os.PathLike[str], name: str = "ds_preproc_wf"
) -> pe.Workflow:
    """Write the preprocessed moving image (the input of every method) at the top level.

    Inputs: ``preproc`` (file). Outputs: ``preproc`` (its path in ``output_dir``).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["preproc"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["preproc"]), name="outputnode")
    path = output_paths(output_dir, job, "network")["preproc"]
    meta = source_metadata(job, output_dir)
    meta["Description"] = (
        "Moving image as every registration method received it: reoriented to RAS, "
        + ("N4 bias-corrected, " if job["modality"] == "mri" else "")
        + ("brain-masked, " if job.get("moving_mask") else "")
        + f"intensities scaled to [0, 1] ({job['modality']} normalisation)."
    )
    ds_preproc = _sink("ds_preproc", path, meta)
    workflow.connect([
        (inputnode, ds_preproc, [("preproc", "in_file")]),
        (ds_preproc, outputnode, [("out_file", "preproc")]),
    ])  # fmt: skip
    return workflow


def init_ds_registration_wf(
    *,
    job: Mapping[str, Any],
    method: str,
    output_dir: str | os.PathLike[str],
    name: str = "ds_registration_wf",
) -> pe.Workflow:
    """Write one method's forward and inverse transforms and the warped image, with sidecars.

    Inputs: ``forward_xfm``, ``inverse_xfm``, ``warped`` (files), ``reg_metrics`` (the
    registration node's JSON: its ``generated_by`` entry becomes the sidecars' ``GeneratedBy``).
    Outputs: ``forward_xfm``, ``inverse_xfm``, ``warped`` (paths in the method's dataset).
    """
    workflow = pe.Workflow(name=name)
    fields = ["forward_xfm", "inverse_xfm", "warped"]
    inputnode = pe.Node(niu.IdentityInterface(fields=[*fields, "reg_metrics"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")
    paths = output_paths(output_dir, job, method)
    ds_forward_xfm = _sink(
        "ds_forward_xfm",
        paths["forward_xfm"],
        transform_metadata(job, output_dir, method, forward=True),
    )
    ds_inverse_xfm = _sink(
        "ds_inverse_xfm",
        paths["inverse_xfm"],
        transform_metadata(job, output_dir, method, forward=False),
    )
    ds_warped = _sink("ds_warped", paths["warped"], warped_metadata(job, output_dir, method),
                      grid_of=job["fixed"])
    workflow.connect([
        (inputnode, ds_forward_xfm, [("forward_xfm", "in_file"), ("reg_metrics", "meta_json")]),
        (inputnode, ds_inverse_xfm, [("inverse_xfm", "in_file"), ("reg_metrics", "meta_json")]),
        (inputnode, ds_warped, [("warped", "in_file"), ("reg_metrics", "meta_json")]),
        (ds_forward_xfm, outputnode, [("out_file", "forward_xfm")]),
        (ds_inverse_xfm, outputnode, [("out_file", "inverse_xfm")]),
        (ds_warped, outputnode, [("out_file", "warped")]),
    ])  # fmt: skip
    return workflow


def init_ds_metrics_wf(
    *,
    job: Mapping[str, Any],
    method: str,
    output_dir: str | os.PathLike[str],
    name: str = "ds_metrics_wf",
) -> pe.Workflow:
    """Write one method's Jacobian map and its metrics table (TSV) with its JSON sidecar.

    Inputs: ``jacobian`` (file), ``metrics`` (the evaluation JSON). Outputs: ``jacobian``,
    ``metrics_tsv``, ``metrics_json`` (paths in the method's dataset).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["jacobian", "metrics"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["jacobian", "metrics_tsv", "metrics_json"]),
        name="outputnode",
    )
    paths = output_paths(output_dir, job, method)
    ds_jacobian = _sink(
        "ds_jacobian", paths["jacobian"], jacobian_metadata(job, output_dir, method),
        grid_of=job["fixed"]
    )
    ds_metrics = pe.Node(
        WriteMetrics(
            out_file=str(paths["metrics_tsv"]),
            job=dict(job),
            method=method,
            output_dir=str(output_dir),
        ),
        name="ds_metrics",
        run_without_submitting=True,
    )
    workflow.connect([
        (inputnode, ds_jacobian, [("jacobian", "in_file")]),
        (inputnode, ds_metrics, [("metrics", "in_file")]),
        (ds_jacobian, outputnode, [("out_file", "jacobian")]),
        (ds_metrics, outputnode, [("out_file", "metrics_tsv"), ("out_json", "metrics_json")]),
    ])  # fmt: skip
    return workflow
