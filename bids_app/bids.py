"""BIDS queries of the App: the input images, their masks and label maps, and the job list.

The input dataset is indexed with pybids (``validate=True`` unless ``--skip-bids-validation``:
pybids then refuses a folder without a valid ``dataset_description.json``, exit 16, and skips
files whose names are not valid BIDS, such as ``_CT`` images). Nothing is ever written into it:
pybids keeps its index in memory. Sidecar metadata is not indexed (not needed, and a sidecar
key equal to an entity name makes pybids fail).

Selection
    The default query for ``--suffix S`` is ``{"datatype": "anat", "suffix": S, "extension":
    [".nii", ".nii.gz"]}``. ``--bids-filter-file`` follows fMRIPrep: a JSON object keyed by the
    lower-case suffix (``"t1w"``, ``"t2w"``, ``"flair"``, ``"ct"``) whose entities *replace*
    the default's, key by key (``null``: the entity must be absent, ``"*"``: any value; other
    keys of the file are ignored; ``subject``/``session`` values may carry ``sub-``/``ses-``).
    ``--participant-label`` keeps those subjects (a label not in the dataset is an error) and
    replaces a filter's ``subject``; ``--session-label`` keeps those sessions (a label no
    subject has is an error), and, as the BIDS Apps execution specification says, images
    without a session are not filtered out. No image of the suffix at all is exit 66; images
    that the filters all remove is exit 18. Files named like images of the suffix that pybids
    did not index (invalid names) are listed in a warning; an image whose name gives another
    subject/session than its folders is left out; of ``x.nii`` and ``x.nii.gz`` the latter is
    used.

Masks and labels (``--labels DERIV_DIR``, a derivative dataset)
    For each image, a label map ``sub-<s>[_ses-<t>][_<entities>][_desc-<d>]_dseg.nii[.gz]``
    and a brain mask ``..._desc-brain_mask.nii[.gz]`` without ``space-`` (or with
    ``space-<suffix>``) on the image's own grid. A file lacking ``acq``/``ce``/``rec``/``run``
    matches any value of the image; a file with another value does not. Among several label
    maps ``desc-aseg`` wins, then no ``desc``, then the first by name (a warning names them).
    In template mode the template's label map is ``DERIV_DIR/tpl-<ID>/tpl-<ID>[_res-<r>]*_dseg
    .nii[.gz]`` when present (same labelling as the subjects', for Dice).

Jobs
    A job is a plain dict (picklable, JSON-serialisable) describing one registration, the
    contract of :mod:`regpipe.workflows.jobs`:

    ===============  ==========================================================================
    key              value
    ===============  ==========================================================================
    subject          label without ``sub-``
    session          label without ``ses-``, or ``None``
    moving           absolute path of the input image
    entities         the image's BIDS entities (``subject``, ``session``, ``acquisition``,
                     ``run``, ``datatype``, ``suffix``, ``extension``...; values as strings)
    suffix           the image's suffix (``T1w``...)
    modality         ``"ct"`` when suffix is ``CT``, else ``"mri"`` (intensity normalisation)
    fixed            absolute path of the template or of the reference-session image
    fixed_space      label for ``space-``/``to-``: the template identifier
                     (``MNI152NLin2009cAsym``) or, longitudinal, the reference image's label
                     (:func:`regpipe.workflows.jobs.reference_space_label`: ``sub01ses1``)
    fixed_uri        ``SpatialReference`` of the fixed space: TemplateFlow URL, file URI or
                     ``bids:raw:...`` of the reference image (optional key of the contract)
    pair_type        ``"inter"`` (template mode) or ``"intra"`` (longitudinal)
    fixed_mask       template brain mask / reference image's brain mask, or ``None``
    moving_mask      the image's brain mask from ``--labels``, or ``None``
    fixed_labels     label map of the fixed image, or ``None``   } both or neither (Dice needs
    moving_labels    label map of the image from ``--labels``, or ``None`` } both; logged)
    source_uri       ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz`` (needs ``DatasetLinks.raw``)
    weights_sha256   SHA-256 of the network weights file, or ``None`` without a network
    fixed_entities   template mode: ``{"res": "2"}`` / ``{"cohort": "1"}`` for a TemplateFlow
                     target at a resolution other than 1 or with a cohort (output names get
                     ``space-<ID>[_cohort-<c>][_res-<r>]``); longitudinal: absent
    ===============  ==========================================================================

Checked before any work (:func:`usable_jobs`)
    Every file of every job is opened once for its header: a job whose image, reference,
    mask or label map is missing, a dangling link (a DataLad file not fetched), a git-annex
    placeholder, unreadable, 2-D or a 4-D series, or whose mask is not on its image's grid, is
    left out with one error line naming the file; the others run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regpipe.bids_app.exit_codes import AppError, ExitCode
from regpipe.workflows.derivatives import SOURCE_ENTITIES

__all__ = [
    "Image",
    "build_jobs",
    "collect_images",
    "image_query",
    "load_derivatives",
    "load_layout",
    "natural_key",
    "usable_jobs",
]

LOGGER = logging.getLogger("regpipe.bids_app")
IMAGE_EXTENSIONS = [".nii", ".nii.gz"]
IDENTITY_ENTITIES = tuple(name for name, _ in SOURCE_ENTITIES[2:])
"""Entities that tell two images of one session apart (besides the suffix): every source
entity kept in output names after ``sub``/``ses`` (acquisition, run, echo, part...)."""


@dataclass(frozen=True)
class Image:
    """One input image: subject and session labels, absolute path, BIDS entities."""

    subject: str
    session: str | None
    path: Path
    entities: dict[str, str] = field(hash=False, compare=False)
    relpath: str = ""

    @property
    def source_uri(self) -> str:
        return f"bids:raw:{self.relpath}"


def natural_key(label: str | None) -> tuple:
    """Sort key putting ``2`` before ``10`` (``None`` first)."""
    if label is None:
        return ()
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.findall(r"\d+|\D+", label))


def bids_layout(root: Path, *, validate: bool = False, derivative: bool = False):
    """A pybids layout of ``root`` without sidecar metadata (derivative entities when asked)."""
    from bids import BIDSLayout
    from bids.layout.index import BIDSLayoutIndexer

    config = ["bids", "derivatives"] if derivative else None
    return BIDSLayout(str(Path(root).absolute()), validate=validate, config=config,
                      indexer=BIDSLayoutIndexer(validate=validate, index_metadata=False))


def load_layout(bids_dir: Path, *, validate: bool):
    """Index ``bids_dir`` with pybids; exit 66 when missing, 16 when not valid BIDS."""
    from bids.exceptions import BIDSValidationError

    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise AppError(ExitCode.NO_INPUT, f"bids_dir {bids_dir} does not exist or is not a folder")
    try:
        return bids_layout(bids_dir, validate=validate)
    except BIDSValidationError as error:
        reason = str(error).splitlines()[0]
        raise AppError(
            ExitCode.VALIDATION,
            f"{bids_dir} is not a valid BIDS dataset: {reason} (--skip-bids-validation "
            "skips this check)",
        ) from None


def load_derivatives(path: Path):
    """Index a derivative dataset (``--labels``) without validation; exit 66 when missing."""
    path = Path(path)
    if not path.is_dir():
        raise AppError(ExitCode.NO_INPUT, f"--labels {path} does not exist or is not a folder")
    return bids_layout(path, derivative=True)


def image_query(suffix: str, filters: Mapping[str, Mapping[str, Any]] | None = None
                ) -> dict[str, Any]:
    """The pybids query for images of ``suffix``, with ``--bids-filter-file`` entities applied."""
    from bids.layout import Query

    query: dict[str, Any] = {"datatype": "anat", "suffix": suffix,
                             "extension": IMAGE_EXTENSIONS}
    for key, value in (filters or {}).get(suffix.lower(), {}).items():
        if value is None:
            query[key] = Query.NONE
        elif value == "*":
            query[key] = Query.ANY
        elif key in _PREFIXES:  # "sub-01" as the CLI takes it: pybids wants "01"
            query[key] = _unprefixed(value, _PREFIXES[key])
        else:
            query[key] = value
    return query


_PREFIXES = {"subject": "sub-", "session": "ses-"}


def _unprefixed(value: Any, prefix: str) -> Any:
    """A filter value (or list of them) without ``prefix``; non-strings unchanged."""
    if isinstance(value, list):
        return [_unprefixed(v, prefix) for v in value]
    return value.removeprefix(prefix) if isinstance(value, str) else value


def _entities(bids_file) -> dict[str, str]:
    return {key: str(value) for key, value in bids_file.get_entities(metadata=False).items()}


def _to_image(bids_file, root: Path) -> Image:
    entities = _entities(bids_file)
    path = Path(bids_file.path).absolute()
    return Image(subject=entities["subject"], session=entities.get("session"), path=path,
                 entities=entities, relpath=path.relative_to(root).as_posix())


def collect_images(layout, *, suffix: str, participant_label: Sequence[str] | None = None,
                   session_label: Sequence[str] | None = None,
                   filters: Mapping[str, Mapping[str, Any]] | None = None) -> list[Image]:
    """Select the images to register (sorted by subject, session, path).

    Raises :class:`AppError` 66 when the dataset has no image of ``suffix``, 18 when the
    filters remove them all or a ``participant_label`` is not in the dataset.
    """
    root = Path(layout.root).absolute()
    unfiltered = layout.get(return_type="object", **image_query(suffix))
    _warn_unindexed(root, suffix, unfiltered)
    if not unfiltered:
        raise AppError(
            ExitCode.NO_INPUT,
            f"no {suffix} images in {root} (looked for sub-*/[ses-*/]anat/*_{suffix}.nii[.gz]"
            + ("; non-standard suffixes need --skip-bids-validation" if suffix == "CT" else "")
            + ")",
        )
    query = image_query(suffix, filters)
    if participant_label:
        subjects = set(layout.get_subjects())
        missing = sorted(set(participant_label) - subjects)
        if missing:
            raise AppError(
                ExitCode.FILTERS_EMPTY,
                f"participant(s) {', '.join(missing)} not found in {root} (it has "
                f"{_summarise(sorted(subjects, key=natural_key))})",
            )
        if "subject" in query:
            LOGGER.warning("--participant-label %s replaces the subject of --bids-filter-file "
                           "(%s)", " ".join(participant_label), query["subject"])
        query["subject"] = list(participant_label)
    if session_label:
        sessions = set(layout.get_sessions())
        missing = sorted(set(session_label) - sessions, key=natural_key)
        if missing:
            raise AppError(
                ExitCode.FILTERS_EMPTY,
                f"session(s) {', '.join(missing)} not found in {root} ("
                + (f"it has {_summarise(sorted(sessions, key=natural_key))})" if sessions
                   else "it has no sessions)"),
            )
    selected = layout.get(return_type="object", **query)
    images = _bids_named(_to_image(f, root) for f in selected)
    if session_label:
        images = [i for i in images if i.session is None or i.session in set(session_label)]
    if not images:
        used = []
        if participant_label:
            used.append(f"--participant-label {' '.join(participant_label)}")
        if session_label:
            used.append(f"--session-label {' '.join(session_label)}")
        if filters and suffix.lower() in filters:
            used.append(f"--bids-filter-file {suffix.lower()}={dict(filters[suffix.lower()])}")
        raise AppError(
            ExitCode.FILTERS_EMPTY,
            f"the filters ({'; '.join(used) or 'default query'}) selected none of the "
            f"{len(unfiltered)} {suffix} image(s) in {root}",
        )
    if participant_label:
        found = {i.subject for i in images}
        without = [label for label in participant_label if label not in found]
        if without:
            LOGGER.warning("no %s image selected for participant(s) %s: nothing to do for them",
                           suffix, ", ".join(without))
    if filters:
        ignored = sorted(set(filters) - {suffix.lower()})
        if ignored:
            LOGGER.warning("--bids-filter-file: ignoring keys %s (only %r applies to --suffix "
                           "%s)", ", ".join(ignored), suffix.lower(), suffix)
    return sorted(images, key=lambda i: (natural_key(i.subject), natural_key(i.session),
                                         str(i.path)))


def _bids_named(images: Iterable[Image]) -> list[Image]:
    """``images`` whose file names and folders give the same subject and session (pybids
    reads ``sub-x-y`` as subject ``x`` without validation, and takes the folders' labels over
    the file name's), one per name (``.nii.gz`` over a ``.nii`` twin)."""
    kept: dict[str, Image] = {}
    for image in images:
        folders = image.relpath.split("/")
        expected = [f"sub-{image.subject}"] + ([f"ses-{image.session}"] if image.session else [])
        # pybids reads subject and session from the folders: the file name must say the same
        name = folders[-1]
        if folders[: len(expected)] != expected or not name.startswith(
                "_".join(expected) + "_") or (not image.session and "_ses-" in name):
            LOGGER.warning("%s: its name does not give its folders' subject/session (labels "
                           "are letters and digits only): left out", image.relpath)
            continue
        stem = image.relpath.removesuffix(".gz").removesuffix(".nii")
        twin = kept.get(stem)
        if twin is not None:
            keep = image if image.relpath.endswith(".gz") else twin
            LOGGER.warning("%s and %s are the same image name twice: using %s", twin.relpath,
                           Path(image.relpath).name, Path(keep.relpath).name)
            image = keep
        kept[stem] = image
    return list(kept.values())


def _warn_unindexed(root: Path, suffix: str, indexed) -> None:
    """Name the files that look like images of ``suffix`` but that pybids did not index
    (invalid BIDS names, such as ``sub-AB_C``), instead of dropping them silently."""
    known = {Path(f.path).absolute() for f in indexed}
    on_disk = [p.absolute() for pattern in (f"sub-*/anat/*_{suffix}.nii*",
                                            f"sub-*/ses-*/anat/*_{suffix}.nii*")
               for p in root.glob(pattern) if p.name.endswith((".nii", ".nii.gz"))]
    missed = sorted(p.relative_to(root).as_posix() for p in on_disk if p not in known)
    if missed:
        LOGGER.warning("%d file(s) named like %s images are not valid BIDS names and were not "
                       "indexed: %s", len(missed), suffix, _summarise(missed, limit=5))


def _summarise(labels: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


# --------------------------------------------------------------------------- masks and labels


def _compatible(candidate: Mapping[str, Any], image: Image) -> int | None:
    """Score of a derivative file for ``image``: ``None`` when it belongs to another image."""
    score = 0
    for key in IDENTITY_ENTITIES:
        value = candidate.get(key)
        if value is None:
            continue
        if str(value) != image.entities.get(key):
            return None
        score += 1
    space = candidate.get("space")
    if space is not None and space != image.entities.get("suffix"):
        return None
    return score


def _find_derivative(layout, image: Image, *, suffix: str, desc: str | None,
                     prefer: Iterable[str | None] = ()) -> Path | None:
    """The best ``suffix`` file of ``layout`` on ``image``'s grid, or ``None``."""
    from bids.layout import Query

    query: dict[str, Any] = {"subject": image.subject, "suffix": suffix,
                             "extension": IMAGE_EXTENSIONS,
                             "session": image.session if image.session else Query.NONE}
    if desc is not None:
        query["desc"] = desc
    scored = []
    for bids_file in layout.get(return_type="object", **query):
        entities = bids_file.get_entities(metadata=False)
        score = _compatible(entities, image)
        if score is not None:
            scored.append((score, entities.get("desc"), Path(bids_file.path).absolute()))
    if not scored:
        return None
    best_score = max(s for s, _, _ in scored)
    best = [(d, p) for s, d, p in scored if s == best_score]
    order = list(prefer)
    best.sort(key=lambda dp: (order.index(dp[0]) if dp[0] in order else len(order), str(dp[1])))
    if len(best) > 1:
        LOGGER.warning("several %s files for %s: using %s (others: %s)", suffix,
                       image.path.name, best[0][1].name, ", ".join(p.name for _, p in best[1:]))
    return best[0][1]


def find_labels(layout, image: Image) -> Path | None:
    """The label map (``dseg``) of ``image`` in the derivative ``layout``, or ``None``."""
    return _find_derivative(layout, image, suffix="dseg", desc=None, prefer=("aseg", None))


def find_mask(layout, image: Image) -> Path | None:
    """The brain mask (``desc-brain_mask``) of ``image`` in ``layout``, or ``None``."""
    return _find_derivative(layout, image, suffix="mask", desc="brain")


def find_template_labels(labels_dir: Path, identifier: str | None,
                         resolution: str | None, cohort: str | None = None) -> Path | None:
    """``labels_dir/tpl-<ID>[/cohort-<c>]/tpl-<ID>[_cohort-<c>][_res-<r>]*_dseg.nii[.gz]``, or
    ``None``: of the template's cohort only (none: files without a cohort), at its resolution
    (else one without ``res-``), ``desc-aseg`` first, then no ``desc``, as for the images'
    label maps; a warning names the others when several remain."""
    if identifier is None:
        return None
    folders = [Path(labels_dir) / f"tpl-{identifier}"]
    if cohort is not None:
        folders.append(folders[0] / f"cohort-{cohort}")
    found = sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir()
                   if p.name.startswith(f"tpl-{identifier}_")
                   and re.search(r"_dseg\.nii(\.gz)?$", p.name)
                   and _entity(p.name, "cohort") == cohort)
    if resolution is not None:
        same = [p for p in found if _resolution_of(p.name) == _normal_res(resolution)]
        found = same or [p for p in found if _resolution_of(p.name) is None]
    if not found:
        return None
    order: list[str | None] = ["aseg", None]
    found.sort(key=lambda p: order.index(_entity(p.name, "desc"))
               if _entity(p.name, "desc") in order else len(order))
    if len(found) > 1:
        LOGGER.warning("several label maps of template %s: using %s (others: %s)", identifier,
                       found[0].name, ", ".join(p.name for p in found[1:]))
    return found[0].absolute()


def _entity(name: str, key: str) -> str | None:
    match = re.search(rf"_{key}-([A-Za-z0-9]+)_", name)
    return match.group(1) if match else None


def _normal_res(label: str) -> str:
    return str(int(label)) if label.isdigit() else label


def _resolution_of(name: str) -> str | None:
    res = _entity(name, "res")
    return None if res is None else _normal_res(res)


# --------------------------------------------------------------------------- jobs


def _job(image: Image, *, fixed: Path, fixed_space: str, fixed_uri: str, pair_type: str,
         fixed_mask: Path | None, fixed_labels: Path | None, labels_layout,
         weights_sha256: str | None) -> dict[str, Any]:
    suffix = image.entities.get("suffix", "")
    moving_labels = _maybe(find_labels, labels_layout, image)
    if (fixed_labels is None) != (moving_labels is None):
        LOGGER.info("%s: label maps for %s image only; Dice needs both, so none is used",
                    image.path.name, "the fixed" if moving_labels is None else "the moving")
        fixed_labels = moving_labels = None
    return {
        "subject": image.subject,
        "session": image.session,
        "moving": str(image.path),
        "entities": dict(image.entities),
        "suffix": suffix,
        "modality": "ct" if suffix == "CT" else "mri",
        "fixed": str(fixed),
        "fixed_space": fixed_space,
        "fixed_uri": fixed_uri,
        "pair_type": pair_type,
        "fixed_mask": None if fixed_mask is None else str(fixed_mask),
        "moving_mask": _maybe(find_mask, labels_layout, image),
        "fixed_labels": None if fixed_labels is None else str(fixed_labels),
        "moving_labels": moving_labels,
        "source_uri": image.source_uri,
        "weights_sha256": weights_sha256,
    }


def _maybe(finder, layout, image: Image) -> str | None:
    if layout is None:
        return None
    path = finder(layout, image)
    return None if path is None else str(path)


def template_jobs(images: Sequence[Image], template, *, labels_layout=None,
                  weights_sha256: str | None = None) -> list[dict[str, Any]]:
    """One ``"inter"`` job per image, to the resolved template (see the module docstring)."""
    fixed_labels = None
    if labels_layout is not None:
        fixed_labels = find_template_labels(Path(labels_layout.root), template.identifier,
                                            template.resolution, template.cohort)
    return [
        {**_job(image, fixed=template.image, fixed_space=template.space,
                fixed_uri=template.uri, pair_type="inter", fixed_mask=template.mask,
                fixed_labels=fixed_labels, labels_layout=labels_layout,
                weights_sha256=weights_sha256),
         "fixed_entities": template_entities(template)}
        for image in images
    ]


def template_entities(template) -> dict[str, str]:
    """``cohort``/``res`` of a TemplateFlow target for output names: the cohort when there is
    one, the resolution unless it is TemplateFlow's default 1 (``space-X_res-2``)."""
    entities = {}
    if getattr(template, "cohort", None):
        entities["cohort"] = str(template.cohort)
    resolution = getattr(template, "resolution", None)
    if resolution not in (None, "1", "01"):
        entities["res"] = str(int(resolution)) if str(resolution).isdigit() else str(resolution)
    return entities


def longitudinal_pairs(images: Sequence[Image], reference_session: str | None = None,
                       skipped: list[dict[str, Any]] | None = None,
                       report: set[str] | None = None) -> list[tuple[Image, Image]]:
    """(moving, reference) pairs: every image of a subject to its reference-session image.

    The reference session is ``reference_session`` or the subject's first session in natural
    order; its first image (by name) is the reference and is not registered. Subjects with
    fewer than two sessions, or without the requested reference session, are skipped with a
    log line (and an entry in ``skipped``: ``subject``, ``reason``); with ``report``, only the
    skipped subjects in it are logged (the others were not selected).
    """
    skipped = [] if skipped is None else skipped
    by_subject: dict[str, list[Image]] = {}
    for image in images:
        by_subject.setdefault(image.subject, []).append(image)
    pairs = []
    skipped_here: dict[str, list[str]] = {}  # one log line per reason, not one per subject
    for subject, own in by_subject.items():
        sessions = sorted({i.session for i in own if i.session is not None}, key=natural_key)
        if len(sessions) < 2:
            reason = f"{len(sessions)} session(s); longitudinal mode needs two"
            skipped_here.setdefault(reason, []).append(subject)
            skipped.append({"subject": subject, "reason": reason})
            continue
        reference = reference_session or sessions[0]
        if reference not in sessions:
            reason = f"no reference session {reference} (sessions: {', '.join(sessions)})"
            skipped_here.setdefault(f"no reference session {reference}", []).append(subject)
            skipped.append({"subject": subject, "reason": reason})
            continue
        candidates = sorted((i for i in own if i.session == reference), key=lambda i: str(i.path))
        fixed = candidates[0]
        if len(candidates) > 1:
            LOGGER.info("sub-%s ses-%s has %d %s images; the reference is %s", subject,
                        reference, len(candidates), fixed.entities.get("suffix"),
                        fixed.path.name)
        pairs += [(image, fixed) for image in own if image is not fixed]
    for reason, subjects in skipped_here.items():
        subjects = [label for label in subjects if report is None or label in report]
        if not subjects:
            continue
        LOGGER.warning("%d subject(s) skipped, %s: %s", len(subjects), reason,
                       _summarise([f"sub-{label}" for label in subjects]))
    return pairs


def longitudinal_jobs(images: Sequence[Image], *, reference_session: str | None = None,
                      labels_layout=None, weights_sha256: str | None = None,
                      reference_pool: Sequence[Image] | None = None,
                      skipped: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``"intra"`` jobs of :func:`longitudinal_pairs` (see the module docstring).

    ``reference_pool``: the images among which references are chosen, when ``images`` was
    narrowed by ``--session-label`` (a new session registered to the subject's reference
    session, which the label does not select); only ``images`` are registered. ``skipped``
    gets an entry per selected subject without a pair (see :func:`longitudinal_pairs`).
    """
    from regpipe.workflows.jobs import reference_space_label

    selected = {image.path for image in images}
    pool = list(reference_pool) if reference_pool is not None else list(images)
    in_pool = {image.path for image in pool}
    pool += [image for image in images if image.path not in in_pool]
    jobs = []
    selected_subjects = {image.subject for image in images}
    subjects_skipped: list[dict[str, Any]] = []
    pairs = longitudinal_pairs(pool, reference_session, subjects_skipped,
                               report=selected_subjects)
    if skipped is not None:
        skipped += [s for s in subjects_skipped if s["subject"] in selected_subjects]
    references = {fixed.path for _, fixed in pairs}
    for image in images:  # a selected session that is its subject's reference: nothing to do
        if image.path in references and reference_pool is not None:
            LOGGER.warning("%s is sub-%s's reference image: nothing to register it to",
                           image.relpath, image.subject)
    for moving, fixed in pairs:
        if moving.path not in selected:
            continue
        jobs.append(_job(
            moving, fixed=fixed.path, fixed_space=reference_space_label(fixed.entities),
            fixed_uri=fixed.source_uri, pair_type="intra",
            fixed_mask=None if labels_layout is None else find_mask(labels_layout, fixed),
            fixed_labels=None if labels_layout is None else find_labels(labels_layout, fixed),
            labels_layout=labels_layout, weights_sha256=weights_sha256,
        ))
    return jobs


def job_source(job: Mapping[str, Any]) -> str:
    """Which image a recorded job registered, independent of where the dataset was mounted
    (a container bind, a symlink): its BIDS URI (``bids:raw:sub-01/anat/...``), else its
    path (records written before the URI was recorded)."""
    return str(job.get("source_uri") or job["moving"])


#: Files of a job: key, the key of the image whose grid it must share, what it is.
_JOB_FILES = (
    ("moving", None, "image"),
    ("fixed", None, "reference image"),
    ("moving_mask", "moving", "brain mask"),
    ("fixed_mask", "fixed", "reference brain mask"),
    ("moving_labels", None, "label map"),
    ("fixed_labels", None, "reference label map"),
)


def usable_jobs(jobs: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Split ``jobs`` into those whose input files can be used and a line per left-out job.

    Headers only (:func:`regpipe.imageio.read_grid`), each file once, so that a dataset with
    one unfetched or malformed file fails that job at selection, by the file's own name,
    instead of the whole run at workflow construction or a subject mid-run.
    """
    from regpipe.errors import InputError
    from regpipe.imageio import read_grid
    from regpipe.spaces import ras_reoriented

    grids: dict[str, Any] = {}

    def grid(path: str, what: str):
        if path not in grids:
            try:
                grids[path] = read_grid(path, what)
            except InputError as error:
                grids[path] = error
        return grids[path]

    usable, left_out = [], []
    for job in jobs:
        problems = []
        for key, owner, what in _JOB_FILES:
            if job.get(key) is None:
                continue
            found = grid(job[key], what)
            if isinstance(found, InputError):
                problems.append(str(found))
                continue
            own = None if owner is None else grid(job[owner], "")
            if own is not None and not isinstance(own, InputError) \
                    and not ras_reoriented(own).same_as(ras_reoriented(found), atol=1e-3):
                # a derivative mask without space- is in its source image's space, which
                # need not be this image's (sMRIPrep's T1w mask for a T2w image): not used
                LOGGER.warning(
                    "%s: %s %s (%s) is not on its grid (%s): registering without it (resample "
                    "it onto the image to use it)", Path(job[owner]).name, what, job[key],
                    "x".join(map(str, found.shape)), "x".join(map(str, own.shape)))
                job[key] = None
        if problems:
            left_out.append(f"{Path(job['moving']).name}: " + "; ".join(problems))
        else:
            usable.append(job)
    return usable, left_out


def build_jobs(images: Sequence[Image], *, mode: str, template=None,
               reference_session: str | None = None, labels_layout=None,
               weights_sha256: str | None = None,
               reference_pool: Sequence[Image] | None = None,
               skipped: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The job list of ``mode`` (``"template"`` or ``"longitudinal"``); exit 66 when empty.
    ``reference_pool``, ``skipped``: see :func:`longitudinal_jobs`."""
    if mode == "template":
        if template is None:
            raise ValueError("template mode needs a resolved template")
        jobs = template_jobs(images, template, labels_layout=labels_layout,
                             weights_sha256=weights_sha256)
    elif mode == "longitudinal":
        jobs = longitudinal_jobs(images, reference_session=reference_session,
                                 labels_layout=labels_layout, weights_sha256=weights_sha256,
                                 reference_pool=reference_pool, skipped=skipped)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if not jobs:
        raise AppError(
            ExitCode.NO_INPUT,
            "longitudinal mode made no pair: no subject with two or more sessions"
            + (f" including session {reference_session}" if reference_session else "")
            + " among the selected images"
            + (", or only subjects' reference sessions selected (see the warnings above)"
               if reference_pool is not None else ""),
        )
    return jobs
