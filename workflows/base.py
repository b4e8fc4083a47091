"""The participant workflow of the regpipe BIDS App, its job contract and its runner.

Job contract
------------
The BIDS App (:mod:`regpipe.bids_app`) turns the dataset and the command line into *jobs*: one
job is one moving image registered onto one fixed image, a plain ``dict`` (:data:`JOB_KEYS`):

==================  ========================  ================================================
key                 type                      meaning
==================  ========================  ================================================
``subject``         str                       subject label, without ``sub-`` (``"01"``)
``session``         str or None               session label, without ``ses-``
``moving``          absolute path             the image to register (``sub-01_ses-1_T1w.nii.gz``)
``entities``        dict                      pybids entities of ``moving`` (``subject``,
                                              ``session``, ``acquisition``, ``run``...,
                                              optionally ``datatype``; default ``anat``)
``suffix``          str                       ``moving``'s suffix: ``T1w``, ``T2w``, ``CT``...
``modality``        ``"mri"`` or ``"ct"``     intensity normalisation (CT: no N4)
``fixed``           absolute path             the target: template or reference image
``fixed_space``     str                       label of the target space in output names:
                                              a TemplateFlow identifier
                                              (``MNI152NLin2009cAsym``) for ``inter`` jobs;
                                              for longitudinal ``intra`` jobs the reference
                                              image's :func:`reference_space_label`
                                              (``sub01ses1``)
``pair_type``       ``"inter"`` or ``"intra"``  to a template / within subject (``intra``:
                                              the fixed image is bias-corrected too)
``fixed_mask``      path or None              brain mask on ``fixed``'s grid
``moving_mask``     path or None              brain mask on ``moving``'s grid (from a
                                              derivatives dataset); applied: outputs are
                                              ``SkullStripped``
``fixed_labels``    path or None              label map on ``fixed``'s grid   } both or
``moving_labels``   path or None              label map on ``moving``'s grid  } neither: Dice
``source_uri``      str                       BIDS URI of ``moving``: ``bids:raw:sub-01/...``
``weights_sha256``  str or None               SHA-256 of the network weights (computed when
                                              ``None``)
``fixed_uri``       str or None (optional)    ``SpatialReference`` of the outputs; derived
                                              when absent: ``bids:raw:...`` when ``fixed`` is
                                              inside the raw dataset, else a ``file://`` URI
==================  ========================  ================================================

:func:`validate_job` checks a job and returns it normalised (paths as ``str``, optional keys
filled); every factory here calls it. Outputs are described in :mod:`regpipe.workflows.outputs`.

Example
-------
>>> wf = init_regpipe_wf(jobs=jobs, output_dir=out, work_dir=work, methods=["network"],
...                      weights="default", io_iterations=0, affine_init="ours",
...                      device="auto", omp_nthreads=1, seed=0)  # doctest: +SKIP
>>> summary = run_workflow(wf, n_procs=2)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from regpipe.workflows.evaluation import init_eval_wf
from regpipe.workflows.interfaces import (
    CollectReportInputs,
    DatasetFiles,
    ReportSection,
    SubjectReport,
)
from regpipe.workflows.outputs import (
    SOURCE_ENTITIES,
    init_ds_metrics_wf,
    init_ds_preproc_wf,
    init_ds_registration_wf,
    output_paths,
)
from regpipe.workflows.preprocessing import init_preproc_wf
from regpipe.workflows.registration import init_ants_reg_wf, init_network_reg_wf

from regpipe.errors import InputError, WeightsError

#: Keys of a job (see the module docstring); ``fixed_uri`` is optional.
JOB_KEYS: tuple[str, ...] = (
    "subject", "session", "moving", "entities", "suffix", "modality", "fixed", "fixed_space",
    "pair_type", "fixed_mask", "moving_mask", "fixed_labels", "moving_labels", "source_uri",
    "weights_sha256",
)  # fmt: skip
OPTIONAL_JOB_KEYS: tuple[str, ...] = ("fixed_uri",)
_NULLABLE = (
    "session",
    "fixed_mask",
    "moving_mask",
    "fixed_labels",
    "moving_labels",
    "weights_sha256",
    "fixed_uri",
)
#: Registration methods, in output order.
METHODS: tuple[str, ...] = ("network", "ants-syn", "ants-synquick", "ants-affine")

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_SPACE = re.compile(r"^[A-Za-z0-9+]+$")


@dataclass(frozen=True)
class RegistrationOptions:
    """Settings shared by every job of a run (see :func:`init_regpipe_wf`)."""

    weights: str | None = None
    weights_name: str | None = None
    io_iterations: int = 0
    affine_init: str = "ours"
    device: str = "auto"
    omp_nthreads: int = 1
    seed: int | None = None
    conditional: bool = False
    region: str = "auto"
    smoothness: float | None = None


#: Region of a conditional network for ``region="auto"``, by modality: the App registers
#: anatomical head images, so an MRI (T1w, T2w, FLAIR...) is a brain image and a CT a head
#: CT (the head-and-neck region of the condition; pass ``--region brain`` for brain-only CT).
AUTO_REGIONS: dict[str, str] = {"mri": "brain", "ct": "head_neck"}


def job_condition(job: Mapping[str, Any], options: RegistrationOptions) -> dict[str, Any]:
    """The condition of a job for a conditional network: ``{"region", "pair_type",
    "smoothness"}`` (the region from :data:`AUTO_REGIONS` unless given, the pair type from the
    job: ``inter`` to a template, ``intra`` longitudinal; ``smoothness`` ``None``: default)."""
    region = options.region
    if region == "auto":
        region = AUTO_REGIONS.get(job["modality"], "other")
    return {"region": region, "pair_type": job["pair_type"], "smoothness": options.smoothness}


# --------------------------------------------------------------------------- jobs


def reference_space_label(entities: Mapping[str, Any]) -> str:
    """Space label of a subject's own reference image, for longitudinal jobs' ``fixed_space``.

    ``{"subject": "01", "session": "1"}`` -> ``"sub01ses1"``; ``acquisition``,
    ``reconstruction`` and ``run`` are appended when present (``sub01ses1run2``).
    """
    keys = (
        ("subject", "sub"),
        ("session", "ses"),
        ("acquisition", "acq"),
        ("reconstruction", "rec"),
        ("run", "run"),
    )
    label = "".join(
        f"{short}{entities[k]}" for k, short in keys if entities.get(k) not in (None, "")
    )
    return re.sub(r"[^A-Za-z0-9]", "", label)


def _raw_root(job: Mapping[str, Any]) -> Path | None:
    """The raw dataset's root, from ``moving`` and its ``bids:raw:`` URI."""
    uri = str(job["source_uri"])
    if not uri.startswith("bids:raw:"):
        return None
    relative = uri[len("bids:raw:") :]
    moving = Path(job["moving"]).as_posix()
    if not moving.endswith("/" + relative):
        return None
    return Path(moving[: -len(relative) - 1])


def validate_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Check a job (see the module docstring); return a normalised copy.

    Raises
    ------
    InputError
        Naming the job (its ``source_uri`` or ``moving``) and the problem.
    """
    if not isinstance(job, Mapping):
        raise InputError(f"a job must be a dict, got {type(job).__name__}")
    where = job.get("source_uri") or job.get("moving") or "<job>"

    def fail(message: str) -> InputError:
        return InputError(f"job {where}: {message}")

    unknown = sorted(set(job) - set(JOB_KEYS) - set(OPTIONAL_JOB_KEYS))
    if unknown:
        raise fail(
            f"unknown keys {unknown}; known keys: {', '.join(JOB_KEYS + OPTIONAL_JOB_KEYS)}"
        )
    missing = [k for k in JOB_KEYS if k not in job and k not in _NULLABLE]
    if missing:
        raise fail(f"missing keys {missing}")
    out: dict[str, Any] = {k: job.get(k) for k in JOB_KEYS + OPTIONAL_JOB_KEYS}
    for key in ("subject", "session"):
        value = out[key]
        if value is None and key == "session":
            continue
        if not isinstance(value, str) or not _LABEL.match(value):
            raise fail(f"{key} must be an alphanumeric label without 'sub-'/'ses-', got {value!r}")
    for key in ("suffix",):
        if not isinstance(out[key], str) or not _LABEL.match(out[key]):
            raise fail(f"suffix must be alphanumeric (T1w, T2w, CT...), got {out[key]!r}")
    if not isinstance(out["fixed_space"], str) or not _SPACE.match(out["fixed_space"]):
        raise fail(
            f"fixed_space must be a BIDS label (letters, digits, +), got {out['fixed_space']!r}"
        )
    if out["modality"] not in ("mri", "ct"):
        raise fail(f"modality must be 'mri' or 'ct', got {out['modality']!r}")
    if out["pair_type"] not in ("inter", "intra"):
        raise fail(f"pair_type must be 'inter' or 'intra', got {out['pair_type']!r}")
    for key in ("moving", "fixed", "fixed_mask", "moving_mask", "fixed_labels", "moving_labels"):
        if out[key] is None and key not in ("moving", "fixed"):
            continue
        if not isinstance(out[key], (str, os.PathLike)) or not Path(out[key]).is_absolute():
            raise fail(f"{key} must be an absolute path, got {out[key]!r}")
        out[key] = str(out[key])
    if (out["fixed_labels"] is None) != (out["moving_labels"] is None):
        raise fail("give both fixed_labels and moving_labels (Dice needs both) or neither")
    entities = out["entities"]
    if not isinstance(entities, Mapping):
        raise fail("entities must be a dict of the moving image's pybids entities")
    entities = {
        k: (str(v) if k in ("run", "echo", "chunk") and v is not None else v)
        for k, v in entities.items()
    }
    if str(entities.get("subject")) != out["subject"]:
        raise fail(
            f"entities['subject'] ({entities.get('subject')!r}) is not subject {out['subject']!r}"
        )
    if (entities.get("session") or None) != out["session"]:
        raise fail(
            f"entities['session'] ({entities.get('session')!r}) is not session {out['session']!r}"
        )
    out["entities"] = entities
    if not isinstance(out["source_uri"], str) or not out["source_uri"].startswith("bids:"):
        raise fail(
            f"source_uri must be a BIDS URI (bids:raw:sub-01/...), got {out['source_uri']!r}"
        )
    sha = out["weights_sha256"]
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", str(sha)):
        raise fail(f"weights_sha256 must be 64 lower-case hex digits, got {sha!r}")
    if not out["fixed_uri"]:
        root = _raw_root(out)
        fixed = Path(out["fixed"])
        if root is not None and fixed.is_relative_to(root):
            out["fixed_uri"] = f"bids:raw:{fixed.relative_to(root).as_posix()}"
        else:
            out["fixed_uri"] = fixed.as_uri()
    return out


def validate_jobs(jobs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`validate_job` on every job, and no two jobs writing the same outputs."""
    checked = [validate_job(job) for job in jobs]
    if not checked:
        raise InputError("no job to run: the selection matched no image")
    seen: dict[Path, str] = {}
    for job in checked:
        key = output_paths("/", job, "network")["forward_xfm"]
        if key in seen:
            raise InputError(
                f"jobs {seen[key]} and {job['source_uri']} would write the same outputs"
            )
        seen[key] = job["source_uri"]
    return checked


def check_methods(methods: Sequence[str]) -> list[str]:
    """Methods in :data:`METHODS` order, without duplicates; unknown names raise InputError."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(
            f"methods must be a non-empty subset of {', '.join(METHODS)}; got {list(methods)}"
        )
    return [m for m in METHODS if m in methods]


def _node_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


# --------------------------------------------------------------------------- workflows


def init_regpipe_wf(
    *,
    jobs: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    methods: Sequence[str],
    weights: str | os.PathLike[str] | None,
    io_iterations: int,
    affine_init: str,
    device: str,
    omp_nthreads: int,
    seed: int | None,
    reports: bool = True,
    bids_dir: str | os.PathLike[str] | None = None,
    run_uuid: str | None = None,
    region: str = "auto",
    smoothness: float | None = None,
    name: str = "regpipe_wf",
) -> pe.Workflow:
    """The whole participant-level run: one :func:`init_single_subject_wf` per subject.

    Parameters
    ----------
    jobs
        Job dicts (module docstring); validated here.
    output_dir
        The derivative dataset written (see :mod:`regpipe.workflows.outputs`).
    work_dir
        Nipype's cache (``base_dir``): rerunning with it recomputes nothing already done.
    methods
        Subset of :data:`METHODS`.
    weights
        Registry name, ``"default"`` or checkpoint path (resolved now: a missing file fails
        before any work); ``None``: no network (affine and instance optimisation only).
    io_iterations, affine_init, device, omp_nthreads, seed
        Network and ANTs settings (see :func:`regpipe.register`); ``omp_nthreads`` threads per
        registration node; ``seed`` also makes ANTs deterministic.
    reports
        Write ``sub-<label>.html`` per subject (:mod:`regpipe.reports`).
    bids_dir
        Raw dataset (``DatasetLinks``); derived from the jobs' ``bids:raw:`` URIs when absent.
    run_uuid
        Names this run's log folder ``sub-<label>/log/<run_uuid>/`` (crash files).
    region, smoothness
        Condition of a conditional network (:func:`job_condition`; the pair type comes from
        each job): a region name or ``"auto"`` (from the modality), and the regularisation
        weight (``None``: the network's default). Giving either with unconditional weights
        raises :class:`~regpipe.errors.InputError`.

    Outputs: none (everything is written to ``output_dir``).
    """
    from regpipe.networks.checkpoint import is_conditional_file
    from regpipe.weights import default_weights_name, resolve_weights

    checked = validate_jobs(jobs)
    methods = check_methods(methods)
    if omp_nthreads < 1:
        raise InputError(f"omp_nthreads must be at least 1, got {omp_nthreads}")
    if affine_init not in ("ours", "ants", "none"):
        raise InputError(f"affine_init must be ours, ants or none, got {affine_init!r}")
    weights_path = weights_name = None
    if "network" in methods and weights is not None:
        weights_name = default_weights_name() if str(weights) == "default" else str(weights)
        weights_path = str(Path(resolve_weights(weights_name)).absolute())
        if Path(weights_name).name != weights_name or os.sep in weights_name:
            weights_name = Path(weights_path).name
    try:
        conditional = weights_path is not None and is_conditional_file(weights_path)
    except WeightsError:  # unreadable: the registration node reports it when it loads it
        conditional = False
    if not conditional and (region != "auto" or smoothness is not None):
        raise InputError("a region or smoothness steers a conditional network; the weights "
                         f"{weights_name or 'none'} are not conditional")
    options = RegistrationOptions(
        weights_path,
        weights_name,
        int(io_iterations or 0),
        affine_init,
        device,
        int(omp_nthreads),
        seed,
        conditional,
        region,
        smoothness,
    )
    output_dir = Path(output_dir).absolute()
    run_uuid = run_uuid or f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4()}"
    if bids_dir is None:
        bids_dir = next((r for r in map(_raw_root, checked) if r is not None), None)

    workflow = pe.Workflow(name=name, base_dir=str(Path(work_dir).absolute()))
    ds_dataset_files = pe.Node(
        DatasetFiles(output_dir=str(output_dir), methods=methods),
        name="ds_dataset_files",
        run_without_submitting=True,
    )
    if bids_dir is not None:
        ds_dataset_files.inputs.bids_dir = str(Path(bids_dir).absolute())
    workflow.add_nodes([ds_dataset_files])
    for subject in sorted({job["subject"] for job in checked}):
        single_subject_wf = init_single_subject_wf(
            subject=subject, jobs=[j for j in checked if j["subject"] == subject],
            output_dir=output_dir, methods=methods, options=options, reports=reports,
            name=f"sub_{subject}_wf",
        )  # fmt: skip
        log_dir = output_dir / f"sub-{subject}" / "log" / run_uuid
        single_subject_wf.config["execution"].update(
            {"crashdump_dir": str(log_dir), "crashfile_format": "txt"}
        )
        for node in single_subject_wf._get_all_nodes():
            node.config = deepcopy(single_subject_wf.config)
        workflow.add_nodes([single_subject_wf])
    return workflow


def init_single_subject_wf(
    *,
    subject: str,
    jobs: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike[str],
    methods: Sequence[str],
    options: RegistrationOptions,
    reports: bool = True,
    name: str = "single_subject_wf",
) -> pe.Workflow:
    """Every job of one subject (one :func:`init_image_wf` each) and the subject's report.

    Parameters
    ----------
    subject
        Label without ``sub-``.
    jobs
        This subject's jobs.
    output_dir, methods, options, reports
        As :func:`init_regpipe_wf`.

    Outputs: none (the report is ``output_dir/sub-<subject>.html``).
    """
    jobs = [validate_job(job) for job in jobs]
    if any(job["subject"] != subject for job in jobs):
        raise InputError(f"init_single_subject_wf(subject={subject!r}) got another subject's job")
    workflow = pe.Workflow(name=name)
    image_wfs = []
    for job in jobs:
        parts = [
            f"{short}_{job['entities'][k]}"
            for k, short in SOURCE_ENTITIES
            if k != "subject" and job["entities"].get(k) not in (None, "")
        ]
        label = "_".join([*parts, job["suffix"], "to", job["fixed_space"]])
        image_wfs.append(init_image_wf(
            job=job, output_dir=output_dir, methods=methods, options=options,
            name=_node_name(f"{label}_wf"),
        ))  # fmt: skip
    workflow.add_nodes(image_wfs)
    if not reports:
        return workflow

    sessions = {job["session"] for job in jobs}
    merge_sections = pe.Node(
        niu.Merge(len(image_wfs)), name="merge_sections", run_without_submitting=True
    )
    report_inputs = pe.Node(
        CollectReportInputs(
            subject=subject, session=sessions.pop() if len(sessions) == 1 else None,
            output_dir=str(output_dir),
        ),
        name="report_inputs",
        run_without_submitting=True,
    )  # fmt: skip
    subject_report = pe.Node(SubjectReport(), name="subject_report", mem_gb=1.0)
    for index, image_wf in enumerate(image_wfs, start=1):
        workflow.connect([(image_wf, merge_sections, [("outputnode.sections", f"in{index}")])])
    workflow.connect([
        (merge_sections, report_inputs, [("out", "sections")]),
        (report_inputs, subject_report, [("report_inputs", "report_inputs")]),
    ])  # fmt: skip
    return workflow


def init_image_wf(
    *,
    job: Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    methods: Sequence[str],
    options: RegistrationOptions,
    name: str = "image_wf",
) -> pe.Workflow:
    """One job: preprocess both images once, then every method on the same inputs.

    Inputs (``inputnode``, filled from the job): ``moving``, ``fixed``, ``moving_mask``,
    ``fixed_mask``, ``moving_labels``, ``fixed_labels``.

    Outputs
    -------
    sections
        One report-section dict per method (:func:`regpipe.workflows.steps.report_section`).
    """
    job = validate_job(job)
    fields = ["moving", "fixed", "moving_mask", "fixed_mask", "moving_labels", "fixed_labels"]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    for key in fields:
        if job[key] is not None:
            setattr(inputnode.inputs, key, job[key])
    outputnode = pe.Node(niu.IdentityInterface(fields=["sections"]), name="outputnode")
    has = {key: job[key] is not None for key in fields}
    modality = job["modality"]
    moving_preproc_wf = init_preproc_wf(
        modality=modality, bias_correct=True, has_mask=has["moving_mask"],
        has_labels=has["moving_labels"], omp_nthreads=options.omp_nthreads,
        name="moving_preproc_wf",
    )  # fmt: skip
    fixed_preproc_wf = init_preproc_wf(
        modality=modality, bias_correct=job["pair_type"] == "intra", has_mask=has["fixed_mask"],
        has_labels=has["fixed_labels"], omp_nthreads=options.omp_nthreads,
        name="fixed_preproc_wf",
    )  # fmt: skip
    ds_preproc_wf = init_ds_preproc_wf(job=job, output_dir=output_dir)
    merge_sections = pe.Node(
        niu.Merge(len(methods)), name="merge_sections", run_without_submitting=True
    )
    workflow.connect([
        (inputnode, moving_preproc_wf, [("moving", "inputnode.in_file"), ("moving_mask", "inputnode.mask"),
                                        ("moving_labels", "inputnode.labels")]),
        (inputnode, fixed_preproc_wf, [("fixed", "inputnode.in_file"), ("fixed_mask", "inputnode.mask"),
                                       ("fixed_labels", "inputnode.labels")]),
        (moving_preproc_wf, ds_preproc_wf, [("outputnode.out_file", "inputnode.preproc")]),
        (merge_sections, outputnode, [("out", "sections")]),
    ])  # fmt: skip
    for index, method in enumerate(methods, start=1):
        method_wf = init_method_wf(
            job=job,
            method=method,
            output_dir=output_dir,
            options=options,
            name=_node_name(f"{method}_wf"),
        )
        workflow.connect([
            (fixed_preproc_wf, method_wf, [("outputnode.out_file", "inputnode.fixed"),
                                           ("outputnode.mask", "inputnode.fixed_mask"),
                                           ("outputnode.labels", "inputnode.fixed_labels")]),
            (moving_preproc_wf, method_wf, [("outputnode.out_file", "inputnode.moving"),
                                            ("outputnode.mask", "inputnode.moving_mask"),
                                            ("outputnode.labels", "inputnode.moving_labels")]),
            (ds_preproc_wf, method_wf, [("outputnode.preproc", "inputnode.moving_preproc")]),
            (method_wf, merge_sections, [("outputnode.section", f"in{index}")]),
        ])  # fmt: skip
    return workflow


def init_method_wf(
    *,
    job: Mapping[str, Any],
    method: str,
    output_dir: str | os.PathLike[str],
    options: RegistrationOptions,
    name: str = "method_wf",
) -> pe.Workflow:
    """One method on one job: register, evaluate, write derivatives, make a report section.

    Inputs: ``fixed``, ``moving`` (preprocessed), ``fixed_mask``, ``moving_mask``,
    ``fixed_labels``, ``moving_labels`` (RAS+, optional), ``moving_preproc`` (the stored
    preprocessed moving image). Outputs: ``section`` (report dict), ``metrics_tsv``.
    """
    fields = [
        "fixed",
        "moving",
        "fixed_mask",
        "moving_mask",
        "fixed_labels",
        "moving_labels",
        "moving_preproc",
    ]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["section", "metrics_tsv"]), name="outputnode"
    )
    masks = {
        "has_fixed_mask": job["fixed_mask"] is not None,
        "has_moving_mask": job["moving_mask"] is not None,
    }
    if method == "network":
        reg_wf = init_network_reg_wf(
            weights=options.weights, weights_name=options.weights_name,
            weights_sha256=job["weights_sha256"], modality=job["modality"],
            affine_init=options.affine_init, io_iterations=options.io_iterations,
            device=options.device, omp_nthreads=options.omp_nthreads, seed=options.seed,
            condition=job_condition(job, options) if options.conditional else None, **masks,
        )  # fmt: skip
    else:
        reg_wf = init_ants_reg_wf(
            method=method,
            modality=job["modality"],
            omp_nthreads=options.omp_nthreads,
            seed=options.seed,
            **masks,
        )
    eval_wf = init_eval_wf(
        has_fixed_mask=masks["has_fixed_mask"], has_labels=job["fixed_labels"] is not None
    )
    ds_registration_wf = init_ds_registration_wf(job=job, method=method, output_dir=output_dir)
    ds_metrics_wf = init_ds_metrics_wf(job=job, method=method, output_dir=output_dir)
    label = " ".join(
        str(v)
        for k, v in job["entities"].items()
        if k in ("session", "acquisition", "run") and v not in (None, "")
    )
    report_section = pe.Node(
        ReportSection(method=method, space=job["fixed_space"],
                      label=f"{job['suffix']} {label} -> {job['fixed_space']} ({method})".replace("  ", " ")),
        name="report_section", run_without_submitting=True,
    )  # fmt: skip
    reg_fields = [
        ("fixed", "inputnode.fixed"),
        ("moving", "inputnode.moving"),
        ("fixed_mask", "inputnode.fixed_mask"),
        ("moving_mask", "inputnode.moving_mask"),
    ]
    xfm_fields = ["forward_xfm", "inverse_xfm", "reg_metrics"]
    workflow.connect([
        (inputnode, reg_wf, reg_fields),
        (inputnode, eval_wf, [("fixed", "inputnode.fixed"), ("moving", "inputnode.moving"),
                              ("fixed_mask", "inputnode.fixed_mask"),
                              ("fixed_labels", "inputnode.fixed_labels"),
                              ("moving_labels", "inputnode.moving_labels")]),
        (reg_wf, eval_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in xfm_fields]),
        (reg_wf, ds_registration_wf, [(f"outputnode.{f}", f"inputnode.{f}")
                                      for f in [*xfm_fields, "warped"]]),
        (eval_wf, ds_metrics_wf, [("outputnode.jacobian", "inputnode.jacobian"),
                                  ("outputnode.metrics", "inputnode.metrics")]),
        (inputnode, report_section, [("fixed", "fixed"), ("moving_preproc", "moving_preproc")]),
        (ds_registration_wf, report_section, [("outputnode.warped", "warped")]),
        (ds_metrics_wf, report_section, [("outputnode.jacobian", "jacobian"),
                                         ("outputnode.metrics_json", "metrics_json")]),
        (report_section, outputnode, [("section", "section")]),
        (ds_metrics_wf, outputnode, [("outputnode.metrics_tsv", "metrics_tsv")]),
    ])  # fmt: skip
    return workflow


# --------------------------------------------------------------------------- running


@dataclass
class RunSummary:
    """What :func:`run_workflow` observed.

    ``succeeded`` is false when any node failed; ``failed_subjects`` are the labels (without
    ``sub-``) with a crash file from this run; ``crash_files`` their paths; ``error`` Nipype's
    message.
    """

    succeeded: bool
    failed_subjects: list[str] = field(default_factory=list)
    crash_files: list[Path] = field(default_factory=list)
    error: str | None = None


def run_workflow(
    workflow: pe.Workflow,
    *,
    plugin: str = "MultiProc",
    n_procs: int | None = None,
    memory_gb: float | None = None,
    plugin_args: Mapping[str, Any] | None = None,
    stop_on_first_crash: bool = False,
    poll_sleep_duration: float | None = 0.5,
) -> RunSummary:
    """Run a workflow from :func:`init_regpipe_wf`; a failing subject does not stop the others.

    Parameters
    ----------
    plugin
        Nipype plugin: ``MultiProc`` (default), ``Linear``, ``SLURM``, ``SGE``...
    n_procs, memory_gb
        MultiProc's ``n_procs`` / ``memory_gb`` (nodes declare ``n_procs`` = omp_nthreads
        and ``mem_gb``); ``raise_insufficient`` defaults to false (oversized nodes are
        clipped to the limits rather than failing the run) and ``mp_context`` to
        ``"forkserver"`` (a worker forked from a process that already ran torch can hang).
    plugin_args
        Passed to the plugin (overrides the above).
    stop_on_first_crash
        Nipype's option; false: every node that can run, runs.
    poll_sleep_duration
        Seconds between scheduler polls (Nipype's default is 2; every level of the graph
        waits one poll, even when cached, so 0.5 makes a fully cached rerun about 4x faster);
        ``None`` keeps the workflow's configuration.
    """
    args: dict[str, Any] = {}
    if plugin == "MultiProc":
        # forkserver: workers never inherit a parent's OpenMP/ITK thread state (a forked
        # child of a process that ran torch can hang in libgomp).
        args.update(raise_insufficient=False, mp_context="forkserver")
        if n_procs is not None:
            args["n_procs"] = int(n_procs)
        if memory_gb is not None:
            args["memory_gb"] = float(memory_gb)
    args.update(plugin_args or {})
    execution = workflow.config.setdefault("execution", {})
    execution["stop_on_first_crash"] = str(bool(stop_on_first_crash)).lower()
    if poll_sleep_duration is not None:
        execution["poll_sleep_duration"] = poll_sleep_duration
    crash_dirs = {
        Path(node.config["execution"]["crashdump_dir"])
        for node in workflow._get_all_nodes()
        if node.config and node.config.get("execution", {}).get("crashdump_dir")
    }
    started = time.time()
    error = None
    try:
        workflow.run(plugin=plugin, plugin_args=args)
    except RuntimeError as exc:
        error = str(exc)
    crash_files = sorted(
        path
        for folder in crash_dirs
        for path in folder.glob("crash-*")
        if path.stat().st_mtime >= started - 1
    )
    failed = sorted(
        {m.group(1) for p in crash_files if (m := re.search(r"sub-([A-Za-z0-9]+)", str(p)))}
    )
    return RunSummary(error is None and not crash_files, failed, crash_files, error)
