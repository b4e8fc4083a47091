"""``--reports-only``: rewrite each subject's QC page from the outputs already on disk.

No registration runs and no network or template is needed: the jobs and methods come from the
run records (``output_dir/logs/*/regpipe_run.json``); for every job and method the files named
by
:func:`regpipe.workflows.derivatives.output_paths` are read back (warped image, Jacobian map,
metrics and the stored preprocessed moving image) and handed to
:func:`regpipe.reports.write_subject_report`, which writes ``output_dir/sub-<label>.html`` as
the participant workflow does. The fixed image shown is the job's ``fixed`` file (the template
or the reference image as given, not its preprocessed copy, which lives in the work directory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regpipe.bids_app.exit_codes import AppError, ExitCode

__all__ = ["add_earlier_sections", "earlier_subjects", "redraw_reports", "subject_sections"]

LOGGER = logging.getLogger("regpipe.bids_app")
_NEEDED = ("warped", "jacobian", "metrics_json", "preproc")


def subject_sections(jobs: Sequence[Mapping[str, Any]], methods: Sequence[str],
                     output_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Report sections of one subject's jobs, and one line per (job, method) whose outputs
    are missing (its section label and the missing file names)."""
    from regpipe.workflows.derivatives import output_paths, section_label
    from regpipe.workflows.interfaces import report_section

    sections, missing = [], []
    for job in jobs:
        for method in methods:
            paths = output_paths(output_dir, job, method)
            absent = [paths[key].name for key in _NEEDED if not paths[key].is_file()]
            if absent:
                missing.append(f"{section_label(job, method)}: missing {', '.join(absent)}")
                continue
            sections.append(report_section(
                method=method, fixed=str(job["fixed"]), warped=str(paths["warped"]),
                moving_preproc=str(paths["preproc"]), jacobian=str(paths["jacobian"]),
                metrics_json=str(paths["metrics_json"]), space=job["fixed_space"],
                label=section_label(job, method),
            ))
    return sections, missing


def redraw_reports(subjects: Sequence[str], output_dir: Path,
                   records: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Rewrite the pages of ``subjects`` from every recorded run's outputs still on disk (the
    runs' jobs and methods, whatever options this call was given: no template or network is
    needed); exit 66 when no run recorded them, or (after the others) for a subject whose
    outputs are all gone."""
    jobs = [job for record in records for job in record.get("jobs", [])
            if job.get("subject") in set(subjects)]
    if not jobs:
        raise AppError(ExitCode.NO_INPUT,
                       f"no recorded participant run of subject(s) {', '.join(subjects)} in "
                       f"{output_dir}/logs; run without --reports-only first")
    written = add_earlier_sections(jobs, [], output_dir, records)
    drawn = {path.name for path in written}
    without = sorted({job["subject"] for job in jobs} - {
        name[len("sub-"):-len(".html")] for name in drawn})
    if without:
        raise AppError(ExitCode.NO_INPUT, f"no outputs to report for subject(s) "
                       f"{', '.join(without)} in {output_dir} (deleted?); run without "
                       "--reports-only")
    return written


def _job_key(job: Mapping[str, Any]) -> tuple:
    """One registration's identity: image and target (space with its res/cohort)."""
    target = tuple(sorted((job.get("fixed_entities") or {}).items()))
    from regpipe.bids_app.bids import job_source

    return (job["subject"], job.get("session"), job_source(job), job.get("fixed_space"),
            target)


def _earlier(jobs: Sequence[Mapping[str, Any]], methods: Sequence[str],
             records: Sequence[Mapping[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
    """``{(job key, method): job}`` of the earlier runs' registrations of the subjects in
    ``jobs`` that this run does not redo (the latest run wins)."""
    current = {(_job_key(job), method) for job in jobs for method in methods}
    subjects = {job["subject"] for job in jobs}
    earlier: dict[tuple, Mapping[str, Any]] = {}  # (job key, method) -> job; the latest wins
    for record in records:
        for job in record.get("jobs", []):
            for method in record.get("methods", methods):
                key = (_job_key(job), method)
                if job["subject"] in subjects and key not in current:
                    earlier[key] = job
    return earlier


def earlier_subjects(jobs: Sequence[Mapping[str, Any]], methods: Sequence[str],
                     output_dir: Path, records: Sequence[Mapping[str, Any]]) -> set[str]:
    """The subjects of ``jobs`` whose page :func:`add_earlier_sections` will rewrite (an
    earlier run's outputs of another registration are on disk): the participant workflow
    need not draw theirs first."""
    from regpipe.workflows.derivatives import output_paths

    def on_disk(job: Mapping[str, Any], method: str) -> bool:  # read later, not now
        paths = output_paths(output_dir, job, method)
        return all(paths[key].is_file() for key in _NEEDED)

    return {job_key[0] for (job_key, method), job in _earlier(jobs, methods, records).items()
            if on_disk(job, method)}


def add_earlier_sections(jobs: Sequence[Mapping[str, Any]], methods: Sequence[str],
                         output_dir: Path, records: Sequence[Mapping[str, Any]],
                         always: Sequence[str] | set[str] = ()) -> list[Path]:
    """Rewrite the pages of this run's subjects that earlier runs also registered.

    The participant workflow writes ``sub-<label>.html`` from the current run's jobs only, so a
    run for another session or template would drop the sections of the earlier ones (their
    outputs stay on disk). ``records`` are the earlier runs' records (oldest first, each with
    ``jobs`` and ``methods``); every earlier (job, method) of a subject in ``jobs`` whose
    outputs still exist gets its section back, after the current ones (a rerun with fewer
    ``--compare`` methods keeps the others' sections). The pages of the subjects in
    ``always`` (whose page the workflow left to this function) are written even without
    earlier sections. Returns the pages rewritten.
    """
    from regpipe.reports import write_subject_report

    earlier = _earlier(jobs, methods, records)
    written = []
    for subject in sorted({key[0][0] for key in earlier} | set(always)):
        own = [job for job in jobs if job["subject"] == subject]
        sections, missing = subject_sections(own, methods, output_dir)
        added = 0
        for (job_key, method), job in earlier.items():
            if job_key[0] == subject:
                try:
                    found, gone = subject_sections([job], [method], output_dir)
                except (OSError, ValueError, KeyError) as error:  # a damaged earlier output
                    LOGGER.warning("sub-%s: %s section of %s left out of the page: %s",
                                   subject, method, Path(str(job["moving"])).name, error)
                    missing.append(f"{Path(str(job['moving'])).name} ({method}): {error}")
                    continue
                sections += found
                missing += gone
                added += len(found)
        if not sections or not (added or subject in always):
            continue
        for line in missing:
            LOGGER.warning("sub-%s: section left out of the page: %s", subject, line)
        sessions = {job.get("session") for job in own} | {
            job.get("session") for (job_key, _), job in earlier.items() if job_key[0] == subject}
        written.append(write_subject_report(
            subject=subject, session=sessions.pop() if len(sessions) == 1 else None,
            output_dir=output_dir, sections=sections, out_html=output_dir / f"sub-{subject}.html",
            missing=missing,
        ))
        LOGGER.info("report %s: %d section(s) of earlier runs kept", written[-1], added)
    return written
