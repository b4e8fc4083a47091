"""The participant workflow of the regpipe BIDS App and its runner.

The workflows take *jobs* (one moving image onto one fixed image each; the contract and its
checks are in :mod:`regpipe.workflows.jobs`) and settings shared by the run
(:class:`~regpipe.workflows.jobs.RegistrationOptions`). Outputs are described in
:mod:`regpipe.workflows.derivatives`.

Example
-------
>>> wf = init_regpipe_wf(jobs=jobs, output_dir=out, work_dir=work, methods=["network"],
...                      weights="default", io_iterations=0, affine_init="ours",
...                      device="auto", omp_nthreads=1, seed=0)  # doctest: +SKIP
>>> summary = run_workflow(wf, n_procs=2)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from regpipe.workflows.derivatives import SOURCE_ENTITIES, section_label
from regpipe.workflows.evaluation import init_eval_wf
from regpipe.workflows.interfaces import (
    CollectReportInputs,
    DatasetFiles,
    ReportSection,
    SubjectReport,
)
from regpipe.workflows.jobs import (
    RegistrationOptions,
    check_methods,
    job_condition,
    raw_root,
    validate_job,
    validate_jobs,
)
from regpipe.workflows.multiproc import GuardedMultiProcPlugin
from regpipe.workflows.outputs import (
    init_ds_metrics_wf,
    init_ds_preproc_wf,
    init_ds_registration_wf,
)
from regpipe.workflows.preprocessing import init_preproc_wf
from regpipe.workflows.registration import init_ants_reg_wf, init_network_reg_wf

from regpipe.errors import InputError, WeightsError


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
    mixed_precision: bool = False,
    network_passes: int = 1,
    report_skip: Collection[str] = (),
    name: str = "regpipe_wf",
) -> pe.Workflow:
    """The whole participant-level run: one :func:`init_single_subject_wf` per subject.

    Parameters
    ----------
    jobs
        Job dicts (module docstring); validated here.
    output_dir
        The derivative dataset written (see :mod:`regpipe.workflows.derivatives`).
    work_dir
        Nipype's cache (``base_dir``): rerunning with it recomputes nothing already done.
    methods
        Subset of :data:`~regpipe.workflows.jobs.METHODS`.
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
    mixed_precision
        Run the network in bfloat16 autocast on CUDA (:func:`regpipe.register`; float32 on
        the CPU).
    network_passes
        Apply the network this many times (:func:`regpipe.register`'s ``network_passes``).
    report_skip
        Subjects whose page the caller writes itself after the run (the App, when earlier
        runs' sections are added back): no report node for them, so no page is drawn twice.

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
    requested = None
    if conditional and smoothness is not None:
        # clamp once here (as register() would, with a warning per registration)
        from regpipe.networks.checkpoint import read_checkpoint

        conditioning = read_checkpoint(weights_path).conditioning  # type: ignore[arg-type]
        clamped = conditioning.clamp_lam(smoothness)  # InputError unless positive and finite
        if clamped != smoothness:
            requested, smoothness = smoothness, clamped
            LOGGER.info("smoothness %g is outside the range the weights were trained on "
                        "(%g to %g): every registration uses %g", requested,
                        *conditioning.lam_range, smoothness)
    options = RegistrationOptions(
        weights=weights_path, weights_name=weights_name, io_iterations=int(io_iterations or 0),
        affine_init=affine_init, device=device, omp_nthreads=int(omp_nthreads), seed=seed,
        conditional=conditional, region=region, smoothness=smoothness,
        smoothness_requested=requested,
        mixed_precision=bool(mixed_precision), network_passes=int(network_passes),
    )
    output_dir = Path(output_dir).absolute()
    run_uuid = run_uuid or f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4()}"
    if bids_dir is None:
        bids_dir = next((r for r in map(raw_root, checked) if r is not None), None)

    workflow = pe.Workflow(name=name, base_dir=str(Path(work_dir).absolute()))
    ds_dataset_files = pe.Node(
        DatasetFiles(output_dir=str(output_dir), methods=methods),
        name="ds_dataset_files",
        run_without_submitting=True,
    )
    if bids_dir is not None:
        ds_dataset_files.inputs.bids_dir = str(Path(bids_dir).absolute())
    workflow.add_nodes([ds_dataset_files])
    skip = set(report_skip)
    for subject in sorted({job["subject"] for job in checked}):
        single_subject_wf = init_single_subject_wf(
            subject=subject, jobs=[j for j in checked if j["subject"] == subject],
            output_dir=output_dir, methods=methods, options=options,
            reports=reports and subject not in skip, name=f"sub_{subject}_wf",
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
    # one preprocessing per fixed image (a longitudinal reference serves every later session;
    # its N4 would otherwise run once per session), shared by the jobs that use it
    fixed_wfs: dict[tuple, pe.Workflow] = {}
    for job in jobs:
        parts = [
            f"{short}_{job['entities'][k]}"
            for k, short in SOURCE_ENTITIES
            if k != "subject" and job["entities"].get(k) not in (None, "")
        ]
        label = "_".join([*parts, job["suffix"], "to", job["fixed_space"]])
        image_wf = init_image_wf(
            job=job, output_dir=output_dir, methods=methods, options=options,
            name=_node_name(f"{label}_wf"), fixed_preprocessed=True,
        )  # fmt: skip
        key = (job["fixed"], job["fixed_mask"], job["fixed_labels"], job["modality"],
               job["pair_type"])
        if key not in fixed_wfs:
            fixed_wfs[key] = init_fixed_preproc_wf(
                job=job, options=options, name=fixed_preproc_name(key))
        workflow.connect([(fixed_wfs[key], image_wf, [
            ("outputnode.out_file", "fixed_inputnode.out_file"),
            ("outputnode.mask", "fixed_inputnode.mask"),
            ("outputnode.labels", "fixed_inputnode.labels"),
        ])])  # fmt: skip
        image_wfs.append(image_wf)
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


def fixed_preproc_name(key: tuple) -> str:
    """The node name of a fixed image's preprocessing: from the image's file name and a hash
    of what it is preprocessed with, so that its cached results stay its own from run to run
    (named by position, a run with another reference reused, and redid, a folder)."""
    import hashlib

    stem = Path(str(key[0])).name.split(".")[0]
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:8]
    return _node_name(f"fixed_preproc_{stem}_{digest}_wf")


def init_fixed_preproc_wf(
    *, job: Mapping[str, Any], options: RegistrationOptions, name: str = "fixed_preproc_wf"
) -> pe.Workflow:
    """Preprocessing of a job's fixed image (with its mask and labels, filled from the job):
    bias-corrected for ``intra`` jobs (a subject's own image), not for templates. Outputs
    (``outputnode``): ``out_file``, ``mask``, ``labels``."""
    preproc_wf = init_preproc_wf(
        modality=job["modality"], bias_correct=job["pair_type"] == "intra",
        has_mask=job["fixed_mask"] is not None, has_labels=job["fixed_labels"] is not None,
        omp_nthreads=options.omp_nthreads, name=name,
    )  # fmt: skip
    inputnode = preproc_wf.get_node("inputnode")
    inputnode.inputs.in_file = job["fixed"]
    if job["fixed_mask"] is not None:
        inputnode.inputs.mask = job["fixed_mask"]
    if job["fixed_labels"] is not None:
        inputnode.inputs.labels = job["fixed_labels"]
    return preproc_wf


def init_image_wf(
    *,
    job: Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    methods: Sequence[str],
    options: RegistrationOptions,
    name: str = "image_wf",
    fixed_preprocessed: bool = False,
) -> pe.Workflow:
    """One job: preprocess both images once, then every method on the same inputs.

    Inputs (``inputnode``, filled from the job): ``moving``, ``fixed``, ``moving_mask``,
    ``fixed_mask``, ``moving_labels``, ``fixed_labels``. With ``fixed_preprocessed`` the
    fixed image comes preprocessed instead (:func:`init_fixed_preproc_wf`, shared by the
    jobs with the same fixed image) into ``fixed_inputnode``: ``out_file``, ``mask``,
    ``labels``.

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
    if fixed_preprocessed:
        fixed_source = pe.Node(niu.IdentityInterface(fields=["out_file", "mask", "labels"]),
                               name="fixed_inputnode")
        fixed_prefix = ""
    else:
        fixed_source = init_preproc_wf(
            modality=modality, bias_correct=job["pair_type"] == "intra",
            has_mask=has["fixed_mask"], has_labels=has["fixed_labels"],
            omp_nthreads=options.omp_nthreads, name="fixed_preproc_wf",
        )  # fmt: skip
        fixed_prefix = "outputnode."
        workflow.connect([
            (inputnode, fixed_source, [("fixed", "inputnode.in_file"),
                                       ("fixed_mask", "inputnode.mask"),
                                       ("fixed_labels", "inputnode.labels")]),
        ])  # fmt: skip
    ds_preproc_wf = init_ds_preproc_wf(job=job, output_dir=output_dir)
    merge_sections = pe.Node(
        niu.Merge(len(methods)), name="merge_sections", run_without_submitting=True
    )
    workflow.connect([
        (inputnode, moving_preproc_wf, [("moving", "inputnode.in_file"),
                                        ("moving_mask", "inputnode.mask"),
                                        ("moving_labels", "inputnode.labels")]),
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
            (fixed_source, method_wf, [(f"{fixed_prefix}out_file", "inputnode.fixed"),
                                       (f"{fixed_prefix}mask", "inputnode.fixed_mask"),
                                       (f"{fixed_prefix}labels", "inputnode.fixed_labels")]),
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
            mixed_precision=options.mixed_precision, network_passes=options.network_passes,
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
    report_section = pe.Node(
        ReportSection(method=method, space=job["fixed_space"], label=section_label(job, method)),
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


LOGGER = logging.getLogger("regpipe.workflows")
#: Added to each node's memory estimate in its batch job's request: the job's Python with
#: torch, Nipype and regpipe imported (355 MB measured) and room for reading its images.
JOB_OVERHEAD_GB = 1.0


def _sets_option(args: Sequence[str], *options: str) -> bool:
    """Whether sbatch arguments set one of ``options`` (``--mem=4G``, ``-c 2``, ``-c2``...)."""
    for token in args:
        for option in options:
            if token == option or (option.startswith("--") and token.startswith(option + "=")):
                return True
            if not option.startswith("--") and token.startswith(option) and token[2:].isdigit():
                return True
    return False


def slurm_node_args(node: pe.Node, user_args: str = "") -> str:
    """sbatch options sized to one node: ``--cpus-per-task`` (its ``n_procs``, the threads it
    uses), ``--mem`` (its ``mem_gb`` + :data:`JOB_OVERHEAD_GB`) and, for a network node on
    ``--device cuda``, ``--gpus=1``. An option the user's own ``sbatch_args`` already sets is
    left to the user (Nipype appends node options after the run's, and sbatch keeps the last).
    """
    given = shlex.split(user_args)
    threads, megabytes = _threads_and_megabytes(node)
    out = []
    if not _sets_option(given, "-c", "--cpus-per-task"):
        out.append(f"--cpus-per-task={threads}")
    if not _sets_option(given, "--mem", "--mem-per-cpu", "--mem-per-gpu"):
        out.append(f"--mem={megabytes}M")
    inputs = node.interface.inputs
    if (str(getattr(inputs, "device", "")).startswith("cuda")
            and not _sets_option(given, "-G", "--gpus", "--gres", "--gpus-per-task")):
        out.append("--gpus=1")
    # a leading space: SLURMGraph appends node arguments to the run's without one
    return (" " + " ".join(out)) if out else ""


def _threads_and_megabytes(node: pe.Node) -> tuple[int, int]:
    """A node's threads and its memory request in MB (estimate + :data:`JOB_OVERHEAD_GB`)."""
    return (max(int(node.n_procs), 1),
            math.ceil((float(node.mem_gb) + JOB_OVERHEAD_GB) * 1024))


def _sets_resource(args: Sequence[str], flag: str, *names: str) -> bool:
    """Whether ``flag`` (``-l`` of qsub) is given a resource among ``names`` (``h_vmem=4G``,
    ``nodes=1:ppn=2,mem=4gb``...)."""
    for token, value in zip(args, [*args[1:], ""], strict=False):
        if token == flag:
            given = {item.split("=", 1)[0].split(":", 1)[0]
                     for part in value.split(",") for item in part.split(":")}
            if given & set(names):
                return True
    return False


def sge_node_args(node: pe.Node, user_args: str = "", parallel_environment: str | None = None,
                  memory_resource: str | None = None) -> str:
    """qsub options (Sun/Son of/Univa Grid Engine) sized to one node.

    Grid Engine has no standard names for these: slots come from a parallel environment
    (``-pe <name> <threads>``, only when ``parallel_environment`` names the site's, e.g.
    ``smp``), memory from a site's resource (``-l <memory_resource>=<MB per slot>M``, only when
    ``memory_resource`` names it, e.g. ``h_vmem``, which Grid Engine counts per slot). What the
    run's ``qsub_args`` already set is left to the user.
    """
    given = shlex.split(user_args)
    threads, megabytes = _threads_and_megabytes(node)
    out = []
    slots = 1
    if "-pe" in given:  # the run's own slots (-pe NAME N or N-M): memory is per slot
        counts = given[given.index("-pe") + 2:][:1]
        match = re.match(r"\d+", counts[0]) if counts else None
        slots = max(int(match.group()), 1) if match else 1
    elif parallel_environment:
        out.append(f"-pe {parallel_environment} {threads}")
        slots = threads
    if memory_resource and not _sets_resource(given, "-l", memory_resource):
        out.append(f"-l {memory_resource}={math.ceil(megabytes / slots)}M")
    return (" " + " ".join(out)) if out else ""


def pbs_node_args(node: pe.Node, user_args: str = "") -> str:
    """qsub options (PBS Pro, Torque/OpenPBS) sized to one node: ``-l nodes=1:ppn=<threads>``
    and ``-l mem=<MB>mb`` (PBS Pro reads the first as ``select=1:ncpus=<threads>``), unless the
    run's ``qsub_args`` already ask for them."""
    given = shlex.split(user_args)
    threads, megabytes = _threads_and_megabytes(node)
    out = []
    if not _sets_resource(given, "-l", "nodes", "select", "ncpus", "ppn"):
        out.append(f"-l nodes=1:ppn={threads}")
    if not _sets_resource(given, "-l", "mem", "pmem", "vmem", "pvmem"):
        out.append(f"-l mem={megabytes}mb")
    return (" " + " ".join(out)) if out else ""


def lsf_node_args(node: pe.Node, user_args: str = "") -> str:
    """bsub options (IBM Spectrum LSF) sized to one node: ``-n <threads>`` on one host. Memory
    is not requested: LSF's memory unit is a site setting (``LSF_UNIT_FOR_LIMITS``), so give
    ``-M``/``-R rusage[mem=...]`` in the run's ``bsub_args``."""
    given = shlex.split(user_args)
    threads, _ = _threads_and_megabytes(node)
    if "-n" in given or threads == 1:
        return ""
    return f' -n {threads} -R "span[hosts=1]"'


#: Batch plugins with per-node resource requests: the ``plugin_args`` key of their submission
#: arguments (run-wide and per node).
BATCH_ARGS = {"SLURM": "sbatch_args", "SLURMGraph": "sbatch_args", "SGE": "qsub_args",
              "SGEGraph": "qsub_args", "PBS": "qsub_args", "PBSGraph": "qsub_args",
              "LSF": "bsub_args"}


def node_resource_args(plugin: str, node: pe.Node, plugin_args: Mapping[str, Any]) -> str:
    """The per-node submission options of ``node`` for ``plugin`` (see :data:`BATCH_ARGS`)."""
    user_args = str(plugin_args.get(BATCH_ARGS[plugin], ""))
    if plugin.startswith("SLURM"):
        return slurm_node_args(node, user_args)
    if plugin.startswith("SGE"):
        return sge_node_args(node, user_args, plugin_args.get("parallel_environment"),
                             plugin_args.get("memory_resource"))
    if plugin.startswith("PBS"):
        return pbs_node_args(node, user_args)
    return lsf_node_args(node, user_args)


def _request_node_resources(workflow: pe.Workflow, plugin: str,
                            plugin_args: Mapping[str, Any]) -> None:
    """Give every node of ``workflow`` its own resource request (:func:`node_resource_args`);
    a node that already has its own submission arguments keeps them."""
    key = BATCH_ARGS[plugin]
    for node in workflow._get_all_nodes():
        if key in node.plugin_args:
            continue
        node_args = node_resource_args(plugin, node, plugin_args)
        if node_args:
            node.plugin_args = {**node.plugin_args, key: node_args}


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
        MultiProc runs as :class:`~regpipe.workflows.multiproc.GuardedMultiProcPlugin`: a
        worker killed by the system fails its node (the run goes on and ends failed) instead
        of hanging the run, and an interrupted run stops its workers.
    plugin_args
        Passed to the plugin (overrides the above).
    stop_on_first_crash
        Nipype's option; false: every node that can run, runs.
    poll_sleep_duration
        Seconds between polls of MultiProc/Linear (Nipype's default is 2; every level of the
        graph waits one poll, even when cached, so 0.5 makes a fully cached rerun about 4x
        faster); ``None`` keeps the workflow's configuration. Batch plugins (SLURM, SGE...)
        poll at least every 2 s (each poll runs one ``squeue``/``qstat`` per job) and wait
        up to 60 s for a finished job's result file (``job_finished_timeout``). A
        ``poll_sleep_duration`` entry of ``plugin_args`` overrides all of this.

    With a batch plugin (:data:`BATCH_ARGS`), each node's job asks for what that node needs
    on top of the run's submission arguments: SLURM its threads, memory and, on CUDA, a GPU
    (:func:`slurm_node_args`); PBS its threads and memory (:func:`pbs_node_args`); LSF its
    threads (:func:`lsf_node_args`); Grid Engine slots and memory when ``plugin_args`` name the
    site's ``parallel_environment`` and ``memory_resource`` (:func:`sge_node_args`).
    ``"node_resources": false`` in ``plugin_args`` turns that off.
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
    asked_poll = args.pop("poll_sleep_duration", None)  # regpipe's, not the plugin's
    node_resources = args.pop("node_resources", True)  # regpipe's too, and the Grid Engine
    sge = {key: args.pop(key) for key in ("parallel_environment", "memory_resource")
           if key in args}
    if plugin in BATCH_ARGS and node_resources:
        _request_node_resources(workflow, plugin, {**args, **sge})
        if plugin.startswith("SGE") and not sge:
            LOGGER.info("SGE: every job asks for the run's qsub_args only; give "
                        "\"parallel_environment\" (your site's, e.g. smp) and "
                        "\"memory_resource\" (e.g. h_vmem) in --plugin-args to size each job")
    execution = workflow.config.setdefault("execution", {})
    execution["stop_on_first_crash"] = str(bool(stop_on_first_crash)).lower()
    if plugin not in ("MultiProc", "Linear"):
        # a batch plugin polls the scheduler once per running job per poll (squeue, qstat):
        # keep Nipype's 2 s or more, and wait for result files on a slow shared file system
        poll_sleep_duration = max(poll_sleep_duration or 2.0, 2.0)
        # at least 60 s (Nipype's own default, 5 s, is already in every workflow's config)
        execution["job_finished_timeout"] = max(
            float(execution.get("job_finished_timeout") or 0), 60.0)
    if asked_poll is not None:
        poll_sleep_duration = float(asked_poll)
    if poll_sleep_duration is not None:
        execution["poll_sleep_duration"] = poll_sleep_duration
    crash_dirs = {
        Path(node.config["execution"]["crashdump_dir"])
        for node in workflow._get_all_nodes()
        if node.config and node.config.get("execution", {}).get("crashdump_dir")
    }
    started = time.time()
    error = None
    # MultiProc that fails a node whose worker was killed (out of memory) rather than hanging
    runner = GuardedMultiProcPlugin(plugin_args=args) if plugin == "MultiProc" else None
    try:
        if runner is not None:
            workflow.run(plugin=runner)
        else:
            workflow.run(plugin=plugin, plugin_args=args)
    except RuntimeError as exc:
        error = str(exc)
    except BaseException:  # Ctrl-C, SIGTERM: no worker left running as an orphan
        if runner is not None:
            runner.terminate()
        raise
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
