"""``regpipe bids_dir output_dir {participant,group}``: the BIDS App entry point.

Order of work, so that every failure the App can foresee happens before any registration:

1. parse and check the command line (64), the analysis level (17);
2. check the paths: ``bids_dir`` exists (66), ``output_dir`` and ``--work-dir`` are not inside
   ``bids_dir`` unless under ``bids_dir/derivatives/`` (64);
3. index ``bids_dir`` with pybids, validating unless ``--skip-bids-validation`` (16), select
   the images (66 none at all, 18 none left by the filters);
4. check the Nipype plugin (64), import the workflows;
5. resolve the network weights and the template offline (66, naming the file and the pre-fetch
   command), the ``--labels`` dataset (66), the device; refuse ``--region``/``--smoothness``
   for unconditional weights (64); build the jobs (see
   :mod:`regpipe.bids_app.bids`; 66 when longitudinal mode finds no pair), leave out the jobs
   whose files cannot be used (:func:`~regpipe.bids_app.bids.usable_jobs`: header checks,
   one error line each; 66 when none is left, 1 at the end otherwise), check the rest with
   :func:`regpipe.workflows.jobs.validate_jobs` and log them;
6. create ``output_dir`` and the work directory and check they are writable (73); save the
   options and jobs in ``output_dir/logs/<run_id>/regpipe_run.json``;
7. build the Nipype workflow with :func:`regpipe.workflows.base.init_regpipe_wf` and run it with
   :func:`regpipe.workflows.base.run_workflow` and the chosen plugin; crash files go to
   ``output_dir/sub-<label>/log/<run_id>/`` (``output_dir/logs/<run_id>/`` for dataset-level
   nodes); a failed node gives exit 1 and a line naming the subjects concerned, after the
   other subjects have finished (unless ``--stop-on-first-crash``).

``--reports-only`` stops after step 4 and rewrites the selected subjects' pages from the
outputs of every recorded run (:mod:`regpipe.bids_app.reports_only`: no network or template).

The exit codes are listed in :mod:`regpipe.bids_app.exit_codes`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regpipe.bids_app.exit_codes import AppError, ExitCode, UsageError

from regpipe import __version__
from regpipe.atomic import atomic_write_text
from regpipe.errors import RegpipeError, TemplateError, WeightsError

__all__ = ["main", "run_participant"]

LOGGER = logging.getLogger("regpipe.bids_app")
RUN_RECORD = "regpipe_run.json"
"""Name of the per-run record (options, methods, jobs) in ``output_dir/logs/<run_id>/``."""


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_paths(args: argparse.Namespace) -> None:
    """Refuse outputs inside the input dataset (except under ``derivatives/``); exit 64/66."""
    bids_dir = args.bids_dir
    if not bids_dir.is_dir():
        raise AppError(ExitCode.NO_INPUT, f"bids_dir {bids_dir} does not exist or is not a folder")
    derivatives = bids_dir / "derivatives"
    for option, path in (("output_dir", args.output_dir), ("--work-dir", args.work_dir)):
        if _inside(path, bids_dir) and not (
            _inside(path, derivatives) and path.resolve() != derivatives.resolve()
        ):
            raise UsageError(
                f"{option} {path} is inside bids_dir {bids_dir}, which regpipe never writes to; "
                f"use a folder outside it or under {derivatives}/ (e.g. {derivatives}/regpipe)"
            )
    if _inside(args.work_dir, args.output_dir):
        raise UsageError(
            f"--work-dir {args.work_dir} is inside output_dir {args.output_dir}: its Nipype "
            f"files would be read as outputs (by the group level and BIDS tools); put it "
            f"elsewhere"
        )
    _check_not_foreign(args.output_dir)


def _check_not_foreign(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that holds a dataset regpipe did not make (exit 64): its
    files could have the names regpipe writes (``desc-preproc_T1w``, ``_xfm.h5``)."""
    description = output_dir / "dataset_description.json"
    if not description.is_file():
        return
    try:
        generated = json.loads(description.read_text(encoding="utf-8")).get("GeneratedBy") or []
        name = str(generated[0].get("Name", "")) if generated else ""
    except (OSError, ValueError, AttributeError):
        name = "unreadable"
    if name != "regpipe":
        made_by = f"made by {name}" if name else "not made by regpipe (no GeneratedBy)"
        raise UsageError(
            f"output_dir {output_dir} holds another dataset ({made_by}, see {description}); "
            f"regpipe would overwrite files of the same names there: choose another folder, "
            f"e.g. {output_dir.parent / 'regpipe'}"
        )


def make_writable_dir(path: Path, option: str) -> Path:
    """Create ``path`` (and parents) and check a file can be written there; exit 73 if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".regpipe-write-test-"):
            pass
    except OSError as error:
        raise AppError(ExitCode.CANT_CREATE,
                       f"cannot create or write {option} {path}: {error.strerror or error}"
                       ) from None
    return path


def resolve_network_weights(value: str) -> tuple[str | None, str | None]:
    """``--weights`` -> (checkpoint path, SHA-256), ``(None, None)`` for ``none``; no download.

    The file is loaded into its network here (a few seconds for the official weights), so an
    unusable file fails before any work.
    """
    if value == "none":
        return None, None
    from regpipe.networks.checkpoint import network_from_file
    from regpipe.weights import default_weights_name, resolve_weights, sha256sum

    name = default_weights_name() if value == "default" else value
    path = resolve_weights(name)
    # what every network node will do, once, before any work: a file that is a web page,
    # truncated or of another architecture is a WeightsError (exit 66) naming it
    network_from_file(path)
    return str(path), sha256sum(path)


def plugin_settings(args: argparse.Namespace) -> str:
    """The Nipype plugin's exact name (``slurm`` -> ``SLURM``); 64 when Nipype has none."""
    from nipype.pipeline import plugins

    known = sorted(name[: -len("Plugin")] for name in dir(plugins)
                   if name.endswith("Plugin") and name != "Plugin")
    matches = [name for name in known if name.lower() == args.plugin.lower()]
    if not matches:
        raise UsageError(f"--plugin {args.plugin!r} is not a Nipype plugin ({', '.join(known)})")
    return matches[0]


def _ensure_logname() -> None:
    """Nipype's SLURM plugin reads ``LOGNAME``, which containers and some shells lack."""
    if os.environ.get("LOGNAME"):
        return
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "regpipe"
    os.environ["LOGNAME"] = name or "regpipe"


def _check_device(device: str) -> None:
    if device == "auto":
        return
    from regpipe.device import select_device

    select_device(device)


def _check_condition_options(args: argparse.Namespace, weights: str | None) -> None:
    """``--region``/``--smoothness`` need conditional weights, ``--network-passes`` above 1 a
    network (64 otherwise)."""
    from regpipe.networks.checkpoint import is_conditional_file

    conditional = weights is not None and is_conditional_file(weights)  # loaded already
    if weights is None and args.network_passes > 1:
        raise UsageError("--network-passes repeats the network, but --weights none runs none")
    if not conditional and (args.region != "auto" or args.smoothness is not None):
        raise UsageError(f"--region and --smoothness steer a conditional network; the weights "
                         f"{args.weights!r} are not conditional")
    if conditional:
        from regpipe.workflows.jobs import AUTO_REGIONS

        from regpipe.networks.checkpoint import read_checkpoint

        region = args.region
        if region == "auto":
            region = f"auto: {AUTO_REGIONS['ct' if args.suffix == 'CT' else 'mri']}"
        LOGGER.info("conditional weights: region %s, pair type %s, smoothness %s", region,
                    "inter" if args.mode == "template" else "intra",
                    args.smoothness if args.smoothness is not None else "default (1.5)")
        conditioning = read_checkpoint(weights).conditioning  # type: ignore[arg-type]
        if args.smoothness is not None:
            clamped = conditioning.clamp_lam(args.smoothness)
            if clamped != args.smoothness:
                LOGGER.warning("--smoothness %g is outside the range the weights were trained "
                               "on (%g to %g): every registration will use %g",
                               args.smoothness, *conditioning.lam_range, clamped)


def _describe(job: dict[str, Any]) -> str:
    return f"{Path(job['moving']).name} -> {job['fixed_space']} ({Path(job['fixed']).name})"


def _write_run_record(log_dir: Path, args: argparse.Namespace, argv: Sequence[str] | None,
                      jobs: list[dict[str, Any]], weights: str | None,
                      skipped: Sequence[Mapping[str, Any]] = ()) -> Path:
    options = {key: (str(value) if isinstance(value, Path) else value)
               for key, value in vars(args).items()}
    options["template"] = str(args.template)
    record = {
        "regpipe_version": __version__,
        "command": ["regpipe", *(sys.argv[1:] if argv is None else list(argv))],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": options,
        "weights": weights,
        "methods": list(args.methods),
        "jobs": jobs,
        "skipped": list(skipped),  # selected subjects/images that got no job, and why
    }
    return atomic_write_text(log_dir / RUN_RECORD, json.dumps(record, indent=2, default=str))


def crashes_of_run(output_dir: Path, log_dir: Path, started: float) -> list[Path]:
    """Crash files this run wrote: the subjects' ``log/<run id>/`` folders and ``log_dir``."""
    found = sorted(output_dir.glob(f"sub-*/log/{log_dir.name}/crash-*"))
    found += [p for p in sorted(log_dir.glob("crash-*")) if p.stat().st_mtime >= started - 1]
    return found


def crash_subjects(crash_files: Sequence[Path]) -> list[str]:
    """Subject labels in the crashed nodes' names (``Node: regpipe_wf.sub_01_wf...``)."""
    subjects = set()
    for crash in crash_files:
        try:
            head = crash.read_text(errors="replace")[:1000] if crash.suffix == ".txt" else ""
        except OSError:
            continue
        node = next((line for line in head.splitlines() if line.startswith("Node:")), "")
        subjects.update(re.findall(r"\bsub[-_]([A-Za-z0-9]+?)(?:_wf\b|[._/]|$)", node))
    return sorted(subjects)


def _workflows():
    """The workflows package (:mod:`regpipe.workflows.base`), imported before any work."""
    try:
        from regpipe.workflows import base
    except ImportError as error:
        raise AppError(ExitCode.FAILURE,
                       f"the regpipe workflows are not installed ({error})") from None
    return base


def _workflow_factory():
    """:func:`regpipe.workflows.base.init_regpipe_wf` (replaced by a stand-in in tests)."""
    return _workflows().init_regpipe_wf


def _run(workflow, args: argparse.Namespace, plugin: str, log_dir: Path) -> None:
    """Run with :func:`regpipe.workflows.base.run_workflow`; exit 1 naming failed subjects."""
    run_workflow = _workflows().run_workflow
    workflow.base_dir = str(args.work_dir)
    workflow.config.setdefault("execution", {}).update(
        # nodes outside the per-subject workflows (dataset-level files) crash here
        {"crashdump_dir": str(log_dir), "crashfile_format": "txt"})
    _ensure_logname()
    memory_gb = args.mem_gb
    if memory_gb is None:
        from regpipe.device import memory_limit_gb

        limit = memory_limit_gb()  # a container or job limit MultiProc cannot see
        memory_gb = None if limit is None else round(0.85 * limit, 1)
    LOGGER.info("running with the %s plugin (%d CPUs, %s GB, plugin args %s); work directory %s",
                plugin, args.nprocs, memory_gb or "no", args.plugin_args or {}, args.work_dir)
    started = time.time()
    try:
        summary = run_workflow(workflow, plugin=plugin, n_procs=args.nprocs,
                               memory_gb=memory_gb, plugin_args=args.plugin_args,
                               stop_on_first_crash=args.stop_on_first_crash)
    except Exception as error:  # the plugin's own failures (no sbatch...), with the traceback
        # the Linear plugin re-raises the first failed node's exception: name its subject
        if not crashes_of_run(args.output_dir, log_dir, started):
            LOGGER.exception("the %s plugin failed", plugin)
            detail = str(error).splitlines()[0] if str(error) else ""
            raise AppError(ExitCode.FAILURE,
                           f"the {plugin} plugin failed: {type(error).__name__}: {detail}"
                           ) from None
        summary = None
    own = [] if summary is None else summary.crash_files
    crashes = list(dict.fromkeys([*own, *crashes_of_run(args.output_dir, log_dir, started)]))
    if summary is not None and summary.succeeded and not crashes:
        return
    folders = sorted({str(p.parent) for p in crashes})
    failed = [] if summary is None else summary.failed_subjects
    subjects = sorted({*failed, *crash_subjects(crashes)})
    reason = ((summary.error if summary is not None else None) or "see the log").splitlines()[0]
    raise AppError(
        ExitCode.FAILURE,
        f"{len(crashes) or 'some'} node(s) failed"
        + (f" (subject(s) {', '.join(subjects)})" if subjects else "")
        + (f"; crash files in {', '.join(folders)}" if folders else f": {reason}"),
    )


def run_participant(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """The participant level (steps 3-7 of the module docstring); returns the exit code."""
    from regpipe.bids_app import bids
    from regpipe.bids_app.templates import resolve_template

    layout = bids.load_layout(args.bids_dir, validate=not args.skip_bids_validation)
    images = bids.collect_images(layout, suffix=args.suffix,
                                 participant_label=args.participant_label,
                                 session_label=args.session_label, filters=args.bids_filters)
    LOGGER.info("%d %s image(s) selected in %s", len(images), args.suffix, args.bids_dir)
    plugin = plugin_settings(args)
    _workflows()  # fails here, before any work, when the workflows are not installed
    if args.reports_only:  # from the run records: no network, template or job building
        from regpipe.bids_app.reports_only import redraw_reports

        if args.output_dir.exists():  # (a missing one has no records: 66, nothing created)
            make_writable_dir(args.output_dir, "output_dir")
        redraw_reports(sorted({image.subject for image in images}, key=bids.natural_key),
                       args.output_dir, [record for _, record in run_records(args.output_dir)])
        return ExitCode.SUCCESS

    weights, weights_sha256 = resolve_network_weights(args.weights)
    template = None
    if args.mode == "template":
        template = resolve_template(args.template, suffix=args.suffix)
        LOGGER.info("template %s: %s (mask: %s)", template.space, template.image,
                    template.mask or "none")
    labels_layout = bids.load_derivatives(args.labels) if args.labels else None
    if weights is not None:
        _check_device(args.device)
    _check_condition_options(args, weights)
    pool = None
    if args.mode == "longitudinal" and args.session_label:
        # --session-label picks the sessions to register, not where references may be
        pool = bids.collect_images(layout, suffix=args.suffix,
                                   participant_label=args.participant_label,
                                   filters=args.bids_filters)
    skipped: list[dict[str, Any]] = []  # recorded: the group level lists them
    jobs = bids.build_jobs(images, mode=args.mode, template=template,
                           reference_session=args.reference_session,
                           labels_layout=labels_layout, weights_sha256=weights_sha256,
                           reference_pool=pool, skipped=skipped)
    all_jobs = jobs
    jobs, left_out = bids.usable_jobs(jobs)
    skipped += [{"subject": job["subject"], "session": job["session"],
                 "reason": f"unusable input ({line})"}
                for job, line in zip([j for j in all_jobs if not any(j is u for u in jobs)],
                                     left_out, strict=True)]
    for line in left_out:
        LOGGER.error("left out: %s", line)
    if not jobs:
        raise AppError(ExitCode.NO_INPUT, f"no usable input: {left_out[0]}"
                       + (f" (and {len(left_out) - 1} more, see the log)"
                          if len(left_out) > 1 else ""))
    from regpipe.workflows.jobs import validate_jobs

    validate_jobs(jobs)
    for job in jobs:
        LOGGER.info("job sub-%s%s: %s", job["subject"],
                    f" ses-{job['session']}" if job["session"] else "", _describe(job))

    make_writable_dir(args.output_dir, "output_dir")
    _warn_replaced_transforms(args.output_dir, jobs)
    make_writable_dir(args.work_dir, "--work-dir")
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4()}"
    log_dir = make_writable_dir(args.output_dir / "logs" / run_id, "output_dir/logs")
    _write_run_record(log_dir, args, argv, jobs, weights, skipped)

    # pages that get earlier runs' sections back are drawn once, after the run, not twice
    later = _earlier_report_subjects(args, jobs, log_dir)
    workflow = _workflow_factory()(
        jobs=jobs,
        output_dir=args.output_dir,
        work_dir=args.work_dir,
        methods=list(args.methods),
        # the name as given ("default", "unigradicon", a path): the workflows record it
        weights=None if weights is None else args.weights,
        io_iterations=args.io_iterations,
        affine_init=args.affine_init,
        device=args.device,
        omp_nthreads=args.omp_nthreads,
        seed=args.random_seed,
        reports=True,
        bids_dir=args.bids_dir,
        run_uuid=run_id,
        region=args.region,
        smoothness=args.smoothness,
        mixed_precision=args.mixed_precision,
        network_passes=args.network_passes,
        report_skip=later,
    )
    started, interrupted = time.time(), False
    try:
        _run(workflow, args, plugin, log_dir)
    except BaseException as error:
        interrupted = not isinstance(error, Exception)  # Ctrl-C, SIGTERM: no new drawing
        raise
    finally:  # a failed subject must not cost the others their earlier sections
        if not interrupted:  # pages the workflow did not draw (a method failed): from what
            later = later | _pages_not_drawn(args.output_dir, jobs, started)  # is on disk
        _keep_earlier_report_sections(args, jobs, log_dir, later)
    LOGGER.info("finished %d job(s) x %d method(s); outputs in %s", len(jobs),
                len(args.methods), args.output_dir)
    if left_out:
        raise AppError(ExitCode.FAILURE,
                       f"{len(left_out)} image(s) left out for unusable input files (the "
                       f"others finished): {left_out[0]}"
                       + (" (more in the log)" if len(left_out) > 1 else ""))
    return ExitCode.SUCCESS


def _pages_not_drawn(output_dir: Path, jobs: list[dict[str, Any]], started: float) -> set[str]:
    """Subjects whose page this run did not write (the workflow's report node waits for every
    method, so one failed method left an earlier run's page, or none)."""
    subjects = set()
    for subject in {job["subject"] for job in jobs}:
        page = Path(output_dir) / f"sub-{subject}.html"
        try:
            if page.stat().st_mtime < started - 2:  # file systems with coarse timestamps
                subjects.add(subject)
        except FileNotFoundError:
            subjects.add(subject)
    return subjects


def _earlier_report_subjects(args: argparse.Namespace, jobs: list[dict[str, Any]],
                            log_dir: Path) -> set[str]:
    """The subjects whose pages get sections of earlier runs back after this run."""
    from regpipe.bids_app.reports_only import earlier_subjects

    earlier = [record for folder, record in run_records(args.output_dir) if folder != log_dir]
    return earlier_subjects(jobs, args.methods, args.output_dir, earlier)


def _keep_earlier_report_sections(args: argparse.Namespace, jobs: list[dict[str, Any]],
                                  log_dir: Path, subjects: set[str]) -> None:
    """Give the subject pages back the sections of earlier runs (other sessions, templates);
    the pages of ``subjects`` (not drawn by the workflow) are written in any case."""
    from regpipe.bids_app.reports_only import add_earlier_sections

    earlier = [record for folder, record in run_records(args.output_dir) if folder != log_dir]
    add_earlier_sections(jobs, args.methods, args.output_dir, earlier, always=subjects)


def _warn_replaced_transforms(output_dir: Path, jobs: list[dict[str, Any]]) -> None:
    """Say when a job's transforms replace an earlier run's made against another target file
    (another template resolution or file of the same space: the transform names have no
    ``res-``, the images and metrics do), and, in one line per pair of weights, when its
    outputs replace ones made with other network weights."""
    from regpipe.bids_app.bids import job_source

    earlier: dict[tuple[str, str], dict[str, Any]] = {}
    for _, record in run_records(output_dir):
        for job in record.get("jobs", []):
            earlier[(job_source(job), str(job.get("fixed_space")))] = job
    other_weights: dict[tuple[str, str], int] = {}
    for job in jobs:
        before = earlier.get((job_source(job), str(job["fixed_space"])))
        if before is None:
            continue
        if not _same_file(str(before.get("fixed")), str(job["fixed"])):
            LOGGER.warning("%s: the transforms to %s of an earlier run (target %s) are replaced "
                           "by this run's (target %s)", Path(job["moving"]).name,
                           job["fixed_space"], Path(str(before.get("fixed"))).name,
                           Path(job["fixed"]).name)
        old, new = before.get("weights_sha256"), job.get("weights_sha256")
        if old and new and old != new:
            other_weights[(str(old), str(new))] = other_weights.get((str(old), str(new)), 0) + 1
    for (old, new), count in other_weights.items():
        LOGGER.warning("%d registration(s) of an earlier run made with weights %s are replaced "
                       "by this run's, with weights %s (same file names); use another output "
                       "folder to keep both", count, old[:12], new[:12])


def _same_file(before: str, now: str) -> bool:
    """Whether a recorded target file is this run's: the same path, or the same name and
    bytes; an earlier path not reachable here (the run saw another mount) counts by name."""
    import filecmp

    if before == now:
        return True
    if Path(before).name != Path(now).name:
        return False
    try:
        return filecmp.cmp(before, now, shallow=False)
    except OSError:
        return True


def run_records(output_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(folder, record)`` of every participant run in ``output_dir/logs``, oldest first
    (run ids start with the time); unreadable records are skipped with a warning."""
    records = []
    for path in sorted((output_dir / "logs").glob(f"*/{RUN_RECORD}")):
        try:
            records.append((path.parent, json.loads(path.read_text())))
        except (OSError, ValueError) as error:
            LOGGER.warning("cannot read %s: %s", path, error)
    return records


def _absolute_paths(args: argparse.Namespace) -> None:
    for name in ("bids_dir", "output_dir", "work_dir", "labels"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, value.expanduser().absolute())


def _exit_code(error: RegpipeError) -> ExitCode:
    """A missing template or weights file is missing input (66); anything else is 1."""
    if isinstance(error, (TemplateError, WeightsError)):
        return ExitCode.NO_INPUT
    return ExitCode.FAILURE


def _nipype_logs_once() -> None:
    """Nipype's logger has its own stdout handler; passing its records on to the root handler
    as well printed every Nipype line twice."""
    import nipype  # noqa: F401 (sets up the "nipype" logger and its handler)

    nipype_logger = logging.getLogger("nipype")
    if nipype_logger.handlers:
        nipype_logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the App; returns the exit code (see :mod:`regpipe.bids_app.exit_codes`)."""
    from regpipe.bids_app.parser import ANALYSIS_LEVELS, parse_args

    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, --version
        return int(stop.code or 0)
    except AppError as error:
        print(f"regpipe: error: {error}", file=sys.stderr)
        return int(error.code)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: "
                        "%(message)s", datefmt="%y%m%d-%H:%M:%S")
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    _nipype_logs_once()
    previous = None
    try:
        previous = _stop_on_sigterm()
        if args.analysis_level not in ANALYSIS_LEVELS:
            raise AppError(ExitCode.UNKNOWN_LEVEL,
                           f"unknown analysis level {args.analysis_level!r} (choose "
                           f"{' or '.join(ANALYSIS_LEVELS)})")
        _absolute_paths(args)
        check_paths(args)
        if args.analysis_level == "group":
            from regpipe.bids_app.group import run_group

            return int(run_group(args))
        return int(run_participant(args, argv))
    except AppError as error:
        print(f"regpipe: error: {error}", file=sys.stderr)
        return int(error.code)
    except RegpipeError as error:
        print(f"regpipe: error: {error}", file=sys.stderr)
        return int(_exit_code(error))
    except KeyboardInterrupt:
        print("regpipe: interrupted; rerun the same command (same --work-dir) to resume",
              file=sys.stderr)
        return 130
    except Terminated:
        print("regpipe: terminated (SIGTERM, e.g. a scheduler's time limit); rerun the same "
              "command (same --work-dir) to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as error:  # a bug or an unforeseen failure: traceback, then one line
        LOGGER.exception("unexpected error")
        print(f"regpipe: error: {type(error).__name__}: {error}".splitlines()[0],
              file=sys.stderr)
        return int(ExitCode.FAILURE)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's time limit, ``kill``): raised in the main thread so the
    run unwinds as for Ctrl-C (workers stopped, report sections restored), exit 143."""


def _stop_on_sigterm() -> Any:
    """Turn SIGTERM into :class:`Terminated` (main thread only); returns the old handler to
    put back, or ``None`` when none was installed."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        # a second SIGTERM while the run unwinds (stopping workers, restoring report
        # sections) must not interrupt that: ignore it from now on
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
