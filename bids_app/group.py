"""Group level: read the participant outputs back with pybids, write a TSV and an HTML report.

Inputs (written by the participant level)
    ``output_dir`` is the network's derivative dataset (method ``network``); each ANTs method
    ``ants-M`` of ``--compare`` is the derivative dataset
    ``output_dir/derivatives/regpipe-ants-M/`` (see :mod:`regpipe.workflows.derivatives`). In each,
    every registration has a one-row ``*_metrics.tsv`` (a JSON object ``*_metrics.json`` is read
    when there is no TSV); its entities (``sub``, ``ses``, ``acq``, ``run``..., ``space``/``to``
    for the fixed space) say which image it belongs to.
    ``output_dir/logs/<run_id>/regpipe_run.json`` lists the jobs and methods of each participant
    run, and the same folder holds that run's Nipype crash files.

Outputs
    ``output_dir/group/group_metrics.tsv``: one row per registration and method (``subject``,
    ``session``, ``method``, ``fixed_space``, ``target`` (:func:`target_label`), the image's
    entities, ``metrics_file``, then
    every scalar metric; nested values are flattened, ``dice: {"17": 0.8}`` -> ``dice_17``;
    missing values are ``n/a``) with its JSON sidecar describing every column, and
    ``output_dir/group/group_report.html`` from
    :func:`regpipe.reports.write_group_report` with distributions per method and the failures.

Failures
    A job of a recorded run without metrics for one of its methods ("no metrics"), and every
    crash file of the latest run (``output_dir/logs/<latest run_id>/crash-*``), of
    ``output_dir/sub-*/log/`` and of the top of ``--work-dir``, attributed to the subject named
    in the crashed node's name (``sub_01``); a missing-metrics entry of a subject (and session)
    with a crash is left out, the crash explains it. Subjects or images a run selected but gave
    no job (one session in longitudinal mode, unusable input files) are listed too, unless a
    later run of the subject registered it; so are network metrics made with other weights
    than the latest run of that job asked for ("stale outputs": a rerun stopped before it
    replaced them all), and subjects of ``bids_dir`` with an image of the runs' suffix that no
    run record mentions ("not processed": a job that never started). The group level exits 0
    when it wrote its outputs, even when it lists failures (the participant level already
    exited 1 for them).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from regpipe.bids_app.bids import IDENTITY_ENTITIES, bids_layout, job_source, natural_key
from regpipe.bids_app.exit_codes import AppError, ExitCode
from regpipe.bids_app.parser import NETWORK_METHOD
from regpipe.bids_app.run import run_records

from regpipe.atomic import atomic_write_text

__all__ = ["collect_rows", "find_failures", "method_datasets", "run_group", "write_tsv"]

LOGGER = logging.getLogger("regpipe.bids_app")
GROUP_DIR = "group"
TSV_NAME = "group_metrics.tsv"
HTML_NAME = "group_report.html"
ID_COLUMNS = ("subject", "session", "method", "fixed_space", "target", *IDENTITY_ENTITIES)


def target_label(fixed_space: str | None, subject: str, file_name: str) -> str:
    """What a registration was made against, for grouping: the template space with the
    ``cohort``/``res`` of its file name (``MNI152NLin2009cAsym res-2``), or, for longitudinal
    registrations (each subject has its own reference), ``own reference`` and the reference's
    session (``own reference ses1``: runs with another ``--reference-session`` stay apart)."""
    if fixed_space is None:
        return "unknown"
    if fixed_space.startswith(f"sub{subject}"):
        return " ".join(["own reference", fixed_space[len(f"sub{subject}"):]]).strip()
    extra = [m.group(0)[1:] for key in ("cohort", "res")
             if (m := re.search(rf"_{key}-[A-Za-z0-9]+", file_name))]
    return " ".join([fixed_space, *extra])
_MISSING = "n/a"


def method_datasets(output_dir: Path) -> dict[str, Path]:
    """``{method: dataset root}`` of the participant outputs present in ``output_dir``."""
    datasets: dict[str, Path] = {}
    if (output_dir / "dataset_description.json").is_file():
        datasets[NETWORK_METHOD] = output_dir
    derivatives = output_dir / "derivatives"
    if derivatives.is_dir():
        for folder in sorted(derivatives.glob("regpipe-*")):
            if (folder / "dataset_description.json").is_file():
                datasets[folder.name[len("regpipe-"):]] = folder
    return datasets


def _number(value: Any) -> Any:
    """TSV text to a number where it is one; ``n/a`` and empty to ``None``."""
    if not isinstance(value, str):
        return value
    if value.strip() in ("", _MISSING):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar values of a nested mapping, keys joined with ``_``; lists are left out."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}_"))
        elif value is None or isinstance(value, (str, int, float, bool)):
            flat[name] = _number(value)
    return flat


def read_metrics(path: Path) -> dict[str, Any]:
    """The metrics of one file: a TSV (a header and one row, as the workflows write it, or a
    ``metric``/``value`` table) or a JSON object (its ``metrics`` member when present)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            data = data["metrics"]
        return flatten(data) if isinstance(data, dict) else {}
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    if len(header) == 2 and header[0].lower() in ("metric", "name", "key"):
        return {row[0]: _number(row[1]) for row in body if len(row) == 2}
    if not body:
        return {}
    return {key: _number(value) for key, value in zip(header, body[0], strict=False)}


def _metrics_files(root: Path) -> list[tuple[dict[str, Any], Path]]:
    """(entities, file) of every metrics file in a dataset, the TSV when both exist (the JSON
    beside a TSV is its sidecar: column descriptions, Dice, settings)."""
    # no sidecar metadata: the metrics TSVs' JSON sidecars describe their columns ("space",
    # "subject"...), which pybids would otherwise read as conflicting entity values
    layout = bids_layout(root, derivative=True)
    chosen: dict[str, tuple[dict[str, Any], Path]] = {}
    elsewhere: dict[Path, None] = {}  # a TSV and its JSON: one registration
    for bids_file in layout.get(return_type="object", suffix="metrics",
                                extension=[".json", ".tsv"]):
        path = Path(bids_file.path)
        entities = bids_file.get_entities(metadata=False)
        if "subject" not in entities:
            continue  # the group level's own group/group_metrics.tsv, not a registration
        if not _in_bids_folder(path.relative_to(root), entities):
            elsewhere[path.with_name(path.name.rsplit(".", 1)[0])] = None  # a copy kept
            continue  # by hand (anat.bak/), not an output
        stem = path.name.rsplit(".", 1)[0]
        key = str(path.with_name(stem))
        if key not in chosen or path.suffix == ".tsv":
            chosen[key] = (entities, path)
    if elsewhere:
        LOGGER.warning("%d metrics file(s) outside the sub-<label>/[ses-<label>/]<datatype>/ "
                       "folders of %s left out (a copy kept by hand?), e.g. %s.*", len(elsewhere),
                       root, next(iter(elsewhere)).relative_to(root))
    return [chosen[key] for key in sorted(chosen)]


#: BIDS datatype folders (BIDS 1.10)
BIDS_DATATYPES = frozenset(("anat", "func", "dwi", "fmap", "perf", "meg", "eeg", "ieeg", "beh",
                            "pet", "micr", "nirs", "motion", "mrs"))


def _in_bids_folder(relative: Path, entities: Mapping[str, Any]) -> bool:
    """Whether a file lies where BIDS puts it: ``sub-<label>/[ses-<label>/]<datatype>/``."""
    folders = relative.parts[:-1]
    expected = [f"sub-{entities['subject']}"]
    if entities.get("session") is not None:
        expected.append(f"ses-{entities['session']}")
    return list(folders[:-1]) == expected and folders[-1] in BIDS_DATATYPES


def collect_rows(output_dir: Path, participant_label: Sequence[str] | None = None
                 ) -> list[dict[str, Any]]:
    """One dict per metrics file of every method dataset (see the module docstring)."""
    rows = []
    keep = set(participant_label or [])
    for method, root in method_datasets(output_dir).items():
        for entities, path in _metrics_files(root):
            subject = str(entities.get("subject", ""))
            if keep and subject not in keep:
                continue
            row: dict[str, Any] = {
                "subject": subject,
                "session": None if entities.get("session") is None else str(entities["session"]),
                "method": method,
                "fixed_space": entities.get("space") or entities.get("to"),
            }
            row["target"] = target_label(row["fixed_space"], subject, path.name)
            row.update({key: str(entities[key]) for key in IDENTITY_ENTITIES if key in entities})
            row["metrics_file"] = path.relative_to(output_dir).as_posix()
            try:
                metrics = read_metrics(path)
            except (OSError, ValueError) as error:
                LOGGER.warning("cannot read %s: %s", path, error)
                metrics = {}
            for key in _PER_IMAGE_IDS:  # the row's subject, session, fixed_space, target
                metrics.pop(key, None)
            for key, value in metrics.items():
                if key != "space":  # the TSV's copy of fixed_space
                    row.setdefault(key, value)
            if (row.get("weights_sha256") not in (None, "", "n/a")
                    and row.get("network_passes") in (None, "", "n/a")):
                row["network_passes"] = 1  # written before --network-passes existed: one
            rows.append(row)
    return sorted(rows, key=lambda r: (natural_key(r["subject"]), natural_key(r["session"]),
                                       r["method"], r["metrics_file"]))


# --------------------------------------------------------------------------- failures


def _row_matches(row: Mapping[str, Any], job: Mapping[str, Any], method: str) -> bool:
    if row["method"] != method or row["subject"] != job["subject"]:
        return False
    if row["session"] != job.get("session"):
        return False
    entities = job.get("entities") or {}
    if any(key in row and row[key] != entities.get(key) for key in IDENTITY_ENTITIES):
        return False
    if "target" in row and row["target"] != job_target(job):  # res-1 metrics are not res-2's
        return False
    return row.get("fixed_space") in (None, job.get("fixed_space"))


def job_target(job: Mapping[str, Any]) -> str:
    """:func:`target_label` of a recorded job (its file names are not needed)."""
    fixed_entities = job.get("fixed_entities") or {}
    name = "".join(f"_{key}-{fixed_entities[key]}" for key in ("cohort", "res")
                   if key in fixed_entities)
    return target_label(job.get("fixed_space"), str(job["subject"]), name)


def _crash_summary(crash: Path) -> tuple[str | None, str | None, str]:
    """(subject, session, one line) of a Nipype crash file."""
    text = ""
    if crash.suffix == ".txt":
        try:
            text = crash.read_text(errors="replace")
        except OSError:
            pass
    node_line = next((line for line in text.splitlines() if line.startswith("Node:")), "")
    node = node_line[len("Node:"):].strip() or crash.name
    errors = [line.strip() for line in text.splitlines()
              if re.match(r"^\s*[A-Za-z_.]*(Error|Exception)\b.*:", line)]
    where = f"{node} ({errors[-1]})" if errors else node
    subject = re.search(r"sub[-_]([A-Za-z0-9]+)", f"{node} {crash.parent}")
    session = re.search(r"ses[-_]([A-Za-z0-9]+)", node)
    return (subject.group(1) if subject else None, session.group(1) if session else None,
            where)


def _crash_files(output_dir: Path, records: Sequence[tuple[Path, Mapping[str, Any]]],
                 work_dir: Path | None) -> list[Path]:
    """Crash files of the latest run (dataset level) and of each subject's latest run: a
    crash that a later run of the same subject got past is history, not a failure."""
    found: list[Path] = []
    latest_run: dict[str, str] = {}
    for folder, record in records:  # oldest first (run ids start with the time)
        for job in record.get("jobs", []):
            latest_run[str(job["subject"])] = folder.name
    if records:
        found += sorted(records[-1][0].glob("crash-*"))
    for crash in sorted(output_dir.glob("sub-*/log/**/crash-*")):
        folder, _, run = crash.relative_to(output_dir).parts[:3]  # sub-<label>/log/<run id>
        subject = folder[len("sub-"):]
        if subject not in latest_run or latest_run[subject] == run:
            found.append(crash)
    if work_dir is not None and work_dir.is_dir():
        found += sorted(work_dir.glob("crash-*"))
    return list(dict.fromkeys(found))


def find_failures(output_dir: Path, rows: Sequence[Mapping[str, Any]], *,
                  work_dir: Path | None = None,
                  participant_label: Sequence[str] | None = None,
                  bids_dir: Path | None = None) -> list[dict[str, Any]]:
    """Jobs without metrics and crash files (see the module docstring), one dict each:
    ``subject``, ``session``, ``method``, ``reason`` (and ``crash_file`` for crashes); with
    ``bids_dir``, also its subjects that no participant-level run covered."""
    keep = set(participant_label or [])
    records = run_records(output_dir)
    failures: list[dict[str, Any]] = []
    latest: dict[tuple, tuple[Mapping[str, Any], str]] = {}
    for _, record in records:  # oldest first: a later run's job replaces an earlier one's
        for job in record.get("jobs", []):
            if keep and job["subject"] not in keep:
                continue
            for method in record.get("methods", [NETWORK_METHOD]):
                key = (job["subject"], job.get("session"), job_source(job), job_target(job),
                       method)
                latest.pop(key, None)
                latest[key] = (job, method)
    by_subject: dict[tuple, list[Mapping[str, Any]]] = {}  # one pass: not rows x jobs
    for row in rows:
        by_subject.setdefault((row["method"], row["subject"], row["session"]), []).append(row)
    for job, method in latest.values():
        candidates = by_subject.get((method, job["subject"], job.get("session")), [])
        matches = [row for row in candidates if _row_matches(row, job, method)]
        where = f"{Path(job['moving']).name} to {job_target(job)}"
        if not matches:
            failures.append({"subject": job["subject"], "session": job.get("session"),
                             "method": method, "reason": f"no metrics for {where}"})
            continue
        wanted = job.get("weights_sha256")
        made = {str(row.get("weights_sha256")) for row in matches}
        if method == NETWORK_METHOD and wanted and made - {str(wanted)}:
            failures.append({  # a rerun with other weights stopped before this one's end
                "subject": job["subject"], "session": job.get("session"), "method": method,
                "reason": f"stale outputs for {where}: its metrics come from weights "
                          f"{', '.join(sorted(sha[:12] for sha in made))}, but the latest "
                          f"run asked for {str(wanted)[:12]} and did not finish it (some "
                          "files may be from either run); rerun that participant"})
    crashes = []
    for crash in _crash_files(output_dir, records, work_dir):
        subject, session, where = _crash_summary(crash)
        if keep and subject not in keep:
            continue
        crashes.append({"subject": subject or "unknown", "session": session, "method": None,
                        "reason": f"crash in {where}",
                        "crash_file": os.path.relpath(crash, output_dir)})

    def explained(failure: Mapping[str, Any]) -> bool:  # its crash is listed: one failure
        return any(c["subject"] == failure["subject"]
                   and c["session"] in (None, failure["session"]) for c in crashes)

    with_metrics = {str(row.get("subject")) for row in rows}
    missing = (_not_processed(bids_dir, records, keep, with_metrics)
               if bids_dir is not None else [])
    return [f for f in failures if not explained(f)] + crashes + _skipped(records, keep) + missing


def _not_processed(bids_dir: Path, records: Sequence[tuple[Path, Mapping[str, Any]]],
                   keep: set[str], with_metrics: set[str]) -> list[dict[str, Any]]:
    """Subjects of ``bids_dir`` with an image of a suffix the runs registered (``T1w``...) that
    no run record mentions, neither as a job nor as skipped: an array task that never started,
    or died before writing its record (a time limit in the queue, a node failure). Without
    this, they would be missing from the group page without a word. Only the sessions the
    runs selected count (``--session-label``); runs with a ``--bids-filter-file`` skip the
    check, whose selection the folder names cannot tell."""
    options = [record.get("options") or {} for _, record in records]
    if any(option.get("bids_filters") for option in options):
        return []  # a filter file's selection cannot be told from the folder names
    suffixes = {str(option.get("suffix") or "T1w") for option in options} or {"T1w"}
    sessions: set[str] | None = set()  # None: any session (a run without --session-label)
    for option in options:
        if sessions is not None and option.get("session_label"):
            sessions |= {str(label) for label in option["session_label"]}
        else:
            sessions = None
    covered = {str(job["subject"]) for _, record in records for job in record.get("jobs", [])}
    covered |= {str(entry.get("subject")) for _, record in records
                for entry in record.get("skipped", []) if isinstance(entry, Mapping)}
    covered |= with_metrics  # outputs of a run without a record (an older regpipe)
    missing = []
    for folder in sorted(Path(bids_dir).glob("sub-*")):
        label = folder.name[len("sub-"):]
        if not folder.is_dir() or label in covered or (keep and label not in keep):
            continue
        found = [path for suffix in suffixes for path in folder.rglob(f"*_{suffix}.nii*")]
        if sessions is not None:  # only the sessions the runs selected
            found = [path for path in found
                     if any(f"ses-{session}" in path.parts for session in sessions)]
        if found:
            missing.append({"subject": label, "session": None, "method": None,
                            "reason": "not processed: no participant-level run in this output "
                                      "folder covered it (a job that never started, or died "
                                      "before writing its run record?)"})
    return missing


def _skipped(records: Sequence[tuple[Path, Mapping[str, Any]]], keep: set[str]
             ) -> list[dict[str, Any]]:
    """Selected subjects or images that their latest run gave no job (one session in
    longitudinal mode, unusable input files): failures too, or they would vanish from the
    group page. A later run that registered that subject's session (any session, for a
    subject-level entry) supersedes the entry; a later entry replaces it."""
    latest: dict[tuple[str, str | None], dict[str, Any] | None] = {}
    for _, record in records:  # oldest first
        for job in record.get("jobs", []):
            subject = str(job["subject"])
            latest[(subject, job.get("session"))] = None
            latest[(subject, None)] = None  # the subject has sessions to register now
        for entry in record.get("skipped", []):
            if isinstance(entry, Mapping):
                key = (str(entry.get("subject")), entry.get("session"))
                latest[key] = {"subject": key[0], "session": key[1], "method": None,
                               "reason": f"skipped: {entry.get('reason')}"}
    return [entry for (subject, _), entry in latest.items()
            if entry is not None and (not keep or subject in keep)]


# --------------------------------------------------------------------------- writing


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    first = [c for c in ID_COLUMNS if c in keys] + (["metrics_file"] if "metrics_file" in keys
                                                     else [])
    return first + sorted(k for k in keys if k not in first)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


#: Identity columns of a per-image metrics TSV that the group table has under its own names.
_PER_IMAGE_IDS = ("participant_id", "session_id", "target_space", "target_cohort", "target_res")
#: The group table's own columns (its JSON sidecar; metric columns are described as in the
#: per-image metrics sidecars).
GROUP_COLUMNS = {
    "subject": "Subject label (sub-<label> without the prefix)",
    "session": "Session label (n/a without sessions)",
    "method": "Registration method (network, ants-syn, ants-synquick, ants-affine)",
    "fixed_space": "Space of the fixed image (a template, or sub<label><session> for a "
                   "subject's own reference in longitudinal mode)",
    "target": "What the image was registered to: the template with its cohort and resolution "
              "(MNI152NLin2009cAsym res-2), or 'own reference' and the reference session",
    "metrics_file": "The per-image metrics file of the row, relative to the output folder",
    **{key: f"BIDS entity {key} of the moving image" for key in IDENTITY_ENTITIES},
}


def write_sidecar(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The TSV's JSON sidecar: a description (and units) per column."""
    from regpipe.workflows.steps import METRIC_COLUMNS

    described: dict[str, Any] = {}
    for column in _columns(rows) or list(ID_COLUMNS[:3]):  # the columns write_tsv writes
        if column in GROUP_COLUMNS:
            described[column] = {"Description": GROUP_COLUMNS[column]}
        elif column in METRIC_COLUMNS:
            units, text = METRIC_COLUMNS[column]
            described[column] = {"Description": text, **({"Units": units} if units else {})}
        elif column.startswith("dice_"):
            described[column] = {"Description": f"Dice overlap of label {column[5:]}"}
        else:
            described[column] = {"Description": f"{column} from the per-image metrics file"}
    return atomic_write_text(path, json.dumps(described, indent=2) + "\n", parents=True)


def write_tsv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write ``rows`` as a BIDS-style TSV (``n/a`` for missing values), atomically."""
    columns = _columns(rows) or list(ID_COLUMNS[:3])
    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return atomic_write_text(path, table.getvalue(), parents=True)


def _ignore_group_folder(output_dir: Path) -> None:
    """Add ``group/`` to ``output_dir/.bidsignore`` (idempotent) so validators skip it; under
    the dataset lock, so participant runs merging their own lines meanwhile lose nothing."""
    from regpipe.workflows.derivatives import merge_bidsignore

    merge_bidsignore(output_dir, [f"{GROUP_DIR}/"])


#: Metrics columns of a conditional network's condition (n/a for other rows)
CONDITION_COLUMNS = ("condition_region", "condition_pair_type", "condition_lam")


def _warn_mixed_models(rows: Sequence[Mapping[str, Any]]) -> None:
    """Say so when different weights, ``--network-passes`` or conditions (region, pair type,
    lam of a conditional network) made one method's rows for a target (subjects run again with
    other options, others not): the report splits them, the TSV keeps one method."""
    values: dict[tuple[str, str, str], set[str]] = {}
    for row in rows:
        for column in ("weights_sha256", "network_passes", *CONDITION_COLUMNS):
            if row.get(column) not in (None, "", "n/a"):
                values.setdefault((column, str(row["method"]), str(row.get("target"))),
                                  set()).add(str(row[column]))
    for (column, method, target), found in sorted(values.items()):
        if len(found) < 2:
            continue
        if column == "network_passes":
            LOGGER.warning("%s results for %s were made with different --network-passes (%s): "
                           "the group report summarises each separately", method, target,
                           ", ".join(sorted(found)))
        elif column in CONDITION_COLUMNS:
            LOGGER.warning("%s results for %s were made with different conditions (%s: %s): "
                           "the group report summarises each separately", method, target,
                           column, ", ".join(sorted(found)))
        else:
            LOGGER.warning(
                "%s results for %s were made with %d different weights (sha256 %s): the group "
                "report summarises each separately, and the weights_sha256 column of %s tells "
                "them apart; run the participant level again with one --weights to compare "
                "the subjects on one model", method, target, len(found),
                ", ".join(sorted(sha[:12] for sha in found)), TSV_NAME)


def run_group(args: argparse.Namespace) -> int:
    """The group level; returns the exit code (66 without participant outputs)."""
    output_dir: Path = args.output_dir
    if not method_datasets(output_dir):
        raise AppError(ExitCode.NO_INPUT,
                       f"no participant outputs in {output_dir} (no dataset_description.json); "
                       "run the participant level first")
    rows = collect_rows(output_dir, args.participant_label)
    failures = find_failures(output_dir, rows, work_dir=args.work_dir,
                             participant_label=args.participant_label,
                             bids_dir=getattr(args, "bids_dir", None))
    unprocessed_only = all(f["reason"].startswith("not processed") for f in failures)
    if not rows and unprocessed_only:
        if args.participant_label:
            others = sorted({str(row["subject"]) for row in collect_rows(output_dir)})
            if others:
                raise AppError(
                    ExitCode.FILTERS_EMPTY,
                    f"no metrics for participant(s) {', '.join(args.participant_label)} in "
                    f"{output_dir} (it has metrics for {', '.join(others)})")
        raise AppError(ExitCode.NO_INPUT, f"no *_metrics.json/.tsv files in {output_dir}")
    group_dir = output_dir / GROUP_DIR
    try:
        group_dir.mkdir(parents=True, exist_ok=True)
        tsv = write_tsv(rows, group_dir / TSV_NAME)
        write_sidecar(rows, tsv.with_suffix(".json"))
        _ignore_group_folder(output_dir)
    except OSError as error:
        raise AppError(ExitCode.CANT_CREATE, f"cannot write {group_dir}: {error}") from None
    LOGGER.info("%d registration(s), %d failure(s); metrics in %s", len(rows), len(failures),
                tsv)
    _warn_mixed_models(rows)
    for failure in failures:
        LOGGER.warning("failure: sub-%s%s%s: %s", failure["subject"],
                       f" ses-{failure['session']}" if failure.get("session") else "",
                       f" [{failure['method']}]" if failure.get("method") else "",
                       failure["reason"])
    from regpipe.reports import write_group_report

    report = write_group_report(rows, failures, group_dir / HTML_NAME)
    LOGGER.info("group report: %s", report)
    print(f"regpipe: group report {report}", flush=True)
    return ExitCode.SUCCESS
