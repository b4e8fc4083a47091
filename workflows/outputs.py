"""Derivative writing: the output scheme, dataset-level files and the ``init_ds_*_wf`` factories.

Nothing here computes anything; the compute graph hands finished files to these sinks, so the
naming lives in one place (this module).

Output scheme
-------------
``output_dir`` is a BIDS-Derivatives dataset (pipeline ``regpipe``). The network method's
outputs sit at its top level; each ANTs method is a nested derivative dataset
``output_dir/derivatives/regpipe-ants-<method>/`` (``<pipeline>-<variant>`` storage
convention), with its own ``dataset_description.json``, so ``BIDSLayout(output_dir,
validate=False, derivatives=True)`` sees one dataset per method. ``<src>`` is the moving image's
entities, ``sub-<l>[_ses-<l>][_task-..][_acq-..][_ce-..][_rec-..][_dir-..][_run-..][_echo-..]
[_part-..][_chunk-..]``, ``<R>`` the method's dataset root and ``<anat>`` =
``sub-<l>[/ses-<l>]/<datatype>`` (``anat`` unless the job's entities name another datatype).

=============================================================  =====  =============================
File (under ``<R>/<anat>/``)                                   Where  Content
=============================================================  =====  =============================
``<src>_desc-preproc_<suffix>.nii.gz`` + ``.json``             top    moving image as every method
                                                                      received it (RAS, N4, masked,
                                                                      intensities scaled to [0, 1])
``<src>_from-<suffix>_to-<space>_mode-image_xfm.h5`` + json    each   forward transform: resamples
                                                                      the moving image into
                                                                      ``<space>``
``<src>_from-<space>_to-<suffix>_mode-image_xfm.h5`` + json    each   inverse transform
``<src>_space-<space>_desc-preproc_<suffix>.nii.gz`` + json    each   preprocessed moving image
                                                                      resampled into ``<space>``
``<src>_space-<space>_desc-<suffix>_jacobian.nii.gz`` + json   each   Jacobian determinant of the
                                                                      forward transform, fixed grid
``<src>_space-<space>_desc-<suffix>_metrics.tsv`` + ``.json``  each   one-row metrics table; the
                                                                      JSON describes its columns
                                                                      and holds Dice per label and
                                                                      settings
=============================================================  =====  =============================

Transforms are ITK HDF5 files (a ``CompositeTransform`` holding one dense displacement field,
LPS mm, on the grid of the image they resample *into*), readable by ANTs
(``ants.apply_transforms(..., whichtoinvert=[False])``), SimpleITK, nitransforms and
:func:`regpipe.transform_files.read_transform`. The ``from``/``to``/``mode``/``xfm`` naming is
BEP014's, which is not in the ratified specification yet: ``.bidsignore`` lists it.

Dataset-level files (written under a ``fcntl`` lock, atomically, and only when absent; an
existing, different file is kept and a warning logged, so concurrent participant runs into one
``output_dir`` are safe): ``dataset_description.json`` (top and every nested dataset),
``.bidsignore`` (lines merged). The top level also holds ``sub-<l>.html`` (QC report,
:mod:`regpipe.reports`) and ``sub-<l>/log/<run-uuid>/crash-*.txt`` (Nipype crash files); the
BIDS App adds ``logs/`` (run records).

``<space>`` is the job's ``fixed_space``: a TemplateFlow identifier (``MNI152NLin2009cAsym``)
or, for longitudinal registration, the reference image's label
(:func:`regpipe.workflows.jobs.reference_space_label`, e.g. ``sub01ses1``); sidecars carry
``SpatialReference``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from regpipe.workflows.interfaces import WriteDerivative, WriteMetrics

LOGGER = logging.getLogger("nipype.workflow")

#: BIDS version the written datasets follow.
BIDS_VERSION = "1.10.0"

#: Source entities kept in output names, in BIDS order: (pybids name, file key).
SOURCE_ENTITIES: tuple[tuple[str, str], ...] = (
    ("subject", "sub"),
    ("session", "ses"),
    ("task", "task"),
    ("acquisition", "acq"),
    ("ceagent", "ce"),
    ("tracer", "trc"),
    ("reconstruction", "rec"),
    ("direction", "dir"),
    ("run", "run"),
    ("echo", "echo"),
    ("flip", "flip"),
    ("inversion", "inv"),
    ("mtransfer", "mt"),
    ("part", "part"),
    ("chunk", "chunk"),
)

#: Lines every regpipe output dataset's ``.bidsignore`` holds.
BIDSIGNORE_LINES: tuple[str, ...] = (
    "*_xfm.*",
    "*_jacobian.*",
    "*_metrics.*",
    "*.html",
    "sub-*/log/",
    "sub-*/figures/",
    "logs/",
)

#: Name of the nested dataset of an ANTs method, under ``output_dir/derivatives/``.
ANTS_DATASET = "regpipe-ants-{method}"


# --------------------------------------------------------------------------- naming


def method_root(output_dir: str | os.PathLike[str], method: str) -> Path:
    """Root of the derivative dataset holding ``method``'s outputs.

    ``"network"`` -> ``output_dir``; ``"ants-syn"`` ->
    ``output_dir/derivatives/regpipe-ants-syn``.
    """
    root = Path(output_dir)
    if method == "network":
        return root
    if not method.startswith("ants-"):
        raise ValueError(f"unknown method {method!r}")
    return root / "derivatives" / ANTS_DATASET.format(method=method[len("ants-") :])


def source_prefix(entities: Mapping[str, Any]) -> str:
    """``sub-01_ses-1_acq-mprage_run-1``: the source entities of an output name."""
    parts = []
    for name, key in SOURCE_ENTITIES:
        value = entities.get(name)
        if value is not None and str(value) != "":
            parts.append(f"{key}-{value}")
    return "_".join(parts)


def derivative_path(
    root: str | os.PathLike[str],
    job: Mapping[str, Any],
    *,
    suffix: str,
    extension: str,
    space: str | None = None,
    desc: str | None = None,
    from_: str | None = None,
    to: str | None = None,
    mode: str | None = None,
) -> Path:
    """Absolute path of one output of ``job`` under dataset ``root`` (see the module table)."""
    entities = job["entities"]
    folder = Path(root) / f"sub-{job['subject']}"
    if job.get("session"):
        folder = folder / f"ses-{job['session']}"
    folder = folder / str(entities.get("datatype") or "anat")
    name = [source_prefix(entities)]
    for key, value in (
        ("from", from_),
        ("to", to),
        ("mode", mode),
        ("space", space),
        ("desc", desc),
    ):
        if value:
            name.append(f"{key}-{value}")
    return folder / ("_".join(name) + f"_{suffix}{extension}")


def output_paths(
    output_dir: str | os.PathLike[str], job: Mapping[str, Any], method: str
) -> dict[str, Path]:
    """Every file one job and one method write (keys: ``preproc``, ``forward_xfm``,
    ``inverse_xfm``, ``warped``, ``jacobian``, ``metrics_tsv``, ``metrics_json``)."""
    root = method_root(output_dir, method)
    suffix, space = job["suffix"], job["fixed_space"]

    def path(root_: str | os.PathLike[str], **kw: Any) -> Path:
        return derivative_path(root_, job, **kw)

    return {
        "preproc": path(Path(output_dir), suffix=suffix, desc="preproc", extension=".nii.gz"),
        "forward_xfm": path(
            root, from_=suffix, to=space, mode="image", suffix="xfm", extension=".h5"
        ),
        "inverse_xfm": path(
            root, from_=space, to=suffix, mode="image", suffix="xfm", extension=".h5"
        ),
        "warped": path(root, space=space, desc="preproc", suffix=suffix, extension=".nii.gz"),
        "jacobian": path(root, space=space, desc=suffix, suffix="jacobian", extension=".nii.gz"),
        "metrics_tsv": path(root, space=space, desc=suffix, suffix="metrics", extension=".tsv"),
        "metrics_json": path(root, space=space, desc=suffix, suffix="metrics", extension=".json"),
    }


def sidecar_of(path: str | os.PathLike[str]) -> Path:
    """``x.nii.gz`` / ``x.h5`` / ``x.tsv`` -> ``x.json``."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".h5", ".tsv", ".json"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_name(path.stem + ".json")


def bids_uri(path: str | os.PathLike[str], root: str | os.PathLike[str], dataset: str = "") -> str:
    """``bids:<dataset>:<path relative to root>`` (``bids::...`` for the current dataset)."""
    return f"bids:{dataset}:{Path(os.path.relpath(path, root)).as_posix()}"


# --------------------------------------------------------------------------- safe writing


#: ``flock`` errors of file systems that do not support locks (some NFS and Lustre mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


@contextlib.contextmanager
def dataset_lock(output_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``output_dir/.regpipe.lock`` (several runs, one folder).

    On a file system without locks the block runs unlocked, with a warning: the writes it
    guards are atomic renames of deterministic content, so concurrent runs still leave whole,
    valid files (a ``.bidsignore`` merge may then need a rerun to gain a line).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".regpipe.lock", "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            LOGGER.warning("cannot lock %s (%s): writing dataset files without a lock",
                           handle.name, error.strerror or error)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _follow_umask(path: str) -> None:
    """``mkstemp`` creates files 0600; outputs get the usual ``0666 & ~umask``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Copy ``source`` to ``path`` atomically; a byte-identical destination is left alone."""
    source, path = Path(source), Path(path)
    same_size = path.is_file() and path.stat().st_size == source.stat().st_size
    if same_size and path.read_bytes() == source.read_bytes():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        _follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_json(data: Any) -> str:
    """Deterministic JSON text (sorted keys, NaN written as ``null``)."""
    return json.dumps(_finite(data), indent=2, sort_keys=True) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_once(
    path: str | os.PathLike[str], content: Mapping[str, Any], lock_root: Path
) -> str:
    """Write a dataset-level JSON file unless it exists; returns written/identical/kept."""
    path = Path(path)
    text = to_json(content)
    with dataset_lock(lock_root):
        if path.exists():
            try:
                same = json.loads(path.read_text()) == json.loads(text)
            except (OSError, ValueError):
                same = False
            if not same:
                LOGGER.warning("%s exists with other content: kept as it is", path)
            return "identical" if same else "kept"
        atomic_write_text(path, text)
    return "written"


def merge_bidsignore(
    root: str | os.PathLike[str],
    lines: Sequence[str] = BIDSIGNORE_LINES,
    lock_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Add the missing ``lines`` to ``root/.bidsignore`` (under the lock of ``lock_root``)."""
    path = Path(root) / ".bidsignore"
    with dataset_lock(lock_root or root):
        existing = path.read_text().splitlines() if path.exists() else []
        missing = [line for line in lines if line not in existing]
        if missing or not path.exists():
            atomic_write_text(path, "\n".join([*existing, *missing]) + "\n")
    return path


# --------------------------------------------------------------------------- dataset files


def _container() -> dict[str, str] | None:
    """``REGPIPE_CONTAINER``: ``docker:<tag>``, ``singularity:<uri>`` or a URI."""
    value = os.environ.get("REGPIPE_CONTAINER", "").strip()
    if not value:
        return None
    kind, sep, rest = value.partition(":")
    if (
        sep
        and kind.lower() in ("docker", "singularity", "apptainer")
        and not rest.startswith("//")
    ):
        return {"Type": kind.lower(), "Tag": rest}
    if "://" in value:
        return {"Type": value.split("://", 1)[0], "URI": value}
    return {"Type": "docker", "Tag": value}


def dataset_description(
    *, method: str, bids_dir: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """The ``dataset_description.json`` content of ``method``'s dataset (deterministic)."""
    import regpipe

    generated: dict[str, Any] = {
        "Name": "regpipe",
        "Version": regpipe.__version__,
        "CodeURL": "https://github.com/regpipe/regpipe",
    }
    container = _container()
    if container:
        generated["Container"] = container
    links: dict[str, str] = {}
    sources: list[dict[str, str]] = []
    if bids_dir is not None:
        raw = Path(bids_dir).absolute()
        links["raw"] = raw.as_uri()
        source = {"URL": raw.as_uri()}
        raw_desc = raw / "dataset_description.json"
        try:
            info = json.loads(raw_desc.read_text()) if raw_desc.is_file() else {}
        except (OSError, ValueError):
            info = {}
        if info.get("DatasetDOI"):
            source["DOI"] = str(info["DatasetDOI"])
        if info.get("Version"):
            source["Version"] = str(info["Version"])
        sources.append(source)
    if method == "network":
        name = "regpipe: foundation-network registration"
        generated["Description"] = "Registration with a uniGradICON-style foundation network"
        entries = [generated]
    else:
        variant = method[len("ants-") :]
        from regpipe.ants_methods import ANTS_METHODS

        name = f"regpipe: ANTs {variant} registration (comparison)"
        generated["Description"] = (
            f"ANTs registration ({ANTS_METHODS[variant]}) on the same preprocessed images"
        )
        entries = [generated, {"Name": "ANTs", "Description": "antsRegistration via antspyx"}]
        links["regpipe"] = "../.."
        sources.append({"URL": "../.."})
    description: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": entries,
        "HowToAcknowledge": "Cite regpipe and, for the comparison datasets, ANTs.",
    }
    if sources:
        description["SourceDatasets"] = sources
    if links:
        description["DatasetLinks"] = links
    return description


def write_dataset_files(
    output_dir: str | os.PathLike[str],
    methods: Sequence[str],
    bids_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Write ``dataset_description.json`` and ``.bidsignore`` of the top-level dataset and of
    every method's nested dataset; safe to run concurrently. Returns the description paths."""
    output_dir = Path(output_dir).absolute()
    written = []
    for method in ["network", *[m for m in methods if m != "network"]]:
        root = method_root(output_dir, method)
        root.mkdir(parents=True, exist_ok=True)
        content = dataset_description(method=method, bids_dir=bids_dir, output_dir=output_dir)
        write_json_once(root / "dataset_description.json", content, output_dir)
        merge_bidsignore(root, lock_root=output_dir)
        written.append(str(root / "dataset_description.json"))
    return written


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
        "Grid": f"the {grid} image's voxel grid",
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


def _sink(name: str, out_file: Path, meta: Mapping[str, Any]) -> pe.Node:
    return pe.Node(
        WriteDerivative(out_file=str(out_file), meta_dict=dict(meta)),
        name=name,
        run_without_submitting=True,
    )


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
    ds_warped = _sink("ds_warped", paths["warped"], warped_metadata(job, output_dir, method))
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
        "ds_jacobian", paths["jacobian"], jacobian_metadata(job, output_dir, method)
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
