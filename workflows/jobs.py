"""The jobs of the regpipe BIDS App: what one registration needs, checked before any work.

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
``fixed_entities``  dict (optional)           ``cohort``/``res`` of a TemplateFlow target,
                                              written after ``space-`` in the names of the
                                              images and metrics (as fMRIPrep does), so
                                              targets at other resolutions or cohorts never
                                              share a file name; default ``{}``
==================  ========================  ================================================

:func:`validate_job` checks a job and returns it normalised (paths as ``str``, optional keys
filled); every workflow factory (:mod:`regpipe.workflows.base`) calls it. Outputs are described
in :mod:`regpipe.workflows.derivatives`.

Example
-------
>>> job = validate_job({
...     "subject": "01", "session": None, "suffix": "T1w", "modality": "mri",
...     "moving": "/data/bids/sub-01/anat/sub-01_T1w.nii.gz",
...     "entities": {"subject": "01", "suffix": "T1w", "datatype": "anat"},
...     "fixed": "/templates/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz",
...     "fixed_space": "MNI152NLin2009cAsym", "pair_type": "inter",
...     "source_uri": "bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
... })
>>> job["fixed_mask"], job["fixed_uri"]
(None, 'file:///templates/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz')
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regpipe.workflows.derivatives import output_paths

from regpipe.errors import InputError

#: Keys of a job (see the module docstring); ``fixed_uri`` and ``fixed_entities`` are optional.
JOB_KEYS: tuple[str, ...] = (
    "subject", "session", "moving", "entities", "suffix", "modality", "fixed", "fixed_space",
    "pair_type", "fixed_mask", "moving_mask", "fixed_labels", "moving_labels", "source_uri",
    "weights_sha256",
)  # fmt: skip
OPTIONAL_JOB_KEYS: tuple[str, ...] = ("fixed_uri", "fixed_entities")
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
    """Settings shared by every job of a run (see
    :func:`regpipe.workflows.base.init_regpipe_wf`)."""

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
    #: the smoothness asked for, when ``smoothness`` is that value clamped to the trained range
    smoothness_requested: float | None = None
    mixed_precision: bool = False
    network_passes: int = 1


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
    condition = {"region": region, "pair_type": job["pair_type"], "smoothness": options.smoothness}
    if options.smoothness_requested is not None:  # clamped by init_regpipe_wf: recorded
        condition["smoothness_requested"] = options.smoothness_requested
    return condition


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


def raw_root(job: Mapping[str, Any]) -> Path | None:
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
    fixed_entities = out["fixed_entities"] or {}
    if not isinstance(fixed_entities, Mapping) or set(fixed_entities) - {"cohort", "res"} or \
            not all(isinstance(v, str) and _LABEL.match(v) for v in fixed_entities.values()):
        raise fail(f"fixed_entities must map 'cohort'/'res' to labels, got {fixed_entities!r}")
    out["fixed_entities"] = dict(fixed_entities)
    if not out["fixed_uri"]:
        root = raw_root(out)
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
