"""The output dataset: naming of every derivative file and the dataset-level files.

Output names are made here only (:func:`output_paths`); :mod:`regpipe.workflows.outputs`
builds the sink workflows that write them.

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
``SpatialReference``. A job's ``fixed_entities`` (``cohort``, ``res`` of a TemplateFlow target)
follow ``space-`` in the images' and metrics' names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from regpipe.atomic import atomic_write_text, json_ready

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
    ("inv", "inv"),  # pybids' own names for these two
    ("mt", "mt"),
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


def section_label(job: Mapping[str, Any], method: str) -> str:
    """Title of a job's QC report section: ``T1w ses-2 run-1 -> MNI152NLin2009cAsym (network)``,
    ``... -> MNI152NLin2009cAsym res-2 (network)`` for another resolution (the subject is the
    page's)."""
    parts = [f"{key}-{job['entities'][name]}" for name, key in SOURCE_ENTITIES[1:]
             if job["entities"].get(name) not in (None, "")]
    target = [f"{key}-{value}" for key, value in (job.get("fixed_entities") or {}).items()]
    return " ".join([job["suffix"], *parts, "->", job["fixed_space"], *target, f"({method})"])


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
    target = job.get("fixed_entities") or {}
    for key, value in (
        ("from", from_),
        ("to", to),
        ("mode", mode),
        ("space", space),
        ("cohort", target.get("cohort") if space else None),
        ("res", target.get("res") if space else None),
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
# ENOSYS: Lustre mounted with noflock
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


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


def to_json(data: Any) -> str:
    """Deterministic JSON text (sorted keys, NaN written as ``null``)."""
    return json.dumps(json_ready(data), indent=2, sort_keys=True) + "\n"


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
                LOGGER.warning("%s exists with other content: kept as it is%s", path,
                               _links_changed(path, content))
            return "identical" if same else "kept"
        atomic_write_text(path, text, parents=True)
    return "written"


def _links_changed(path: Path, content: Mapping[str, Any]) -> str:
    """The consequence worth a user's attention when a kept ``dataset_description.json``
    names another raw dataset than this run's (an output folder reused for another dataset,
    or the same one mounted elsewhere): its ``bids:raw:`` URIs resolve against the old one."""
    try:
        kept = json.loads(path.read_text()).get("DatasetLinks", {}).get("raw")
    except (OSError, ValueError, AttributeError):
        return ""
    new = (content.get("DatasetLinks") or {}).get("raw")
    if kept and new and kept != new:
        return (f"; it links bids:raw: to {kept}, not to this run's {new}: if that is another "
                "dataset, use another output folder (the URIs of this run's sidecars resolve "
                "against the old one)")
    return ""


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
            atomic_write_text(path, "\n".join([*existing, *missing]) + "\n", parents=True)
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


def _antspyx_version() -> str:
    """antspyx's installed version, from its metadata (importing ants takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("antspyx")
    except PackageNotFoundError:
        return "unknown"


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
        entries = [generated, {"Name": "ANTs", "Version": f"antspyx {_antspyx_version()}",
                               "Description": "antsRegistration via antspyx"}]
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
