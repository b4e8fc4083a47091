"""Benchmark pairs: what a pair is, how pairs files are read and written, loading one.

A :class:`PairSpec` names a fixed and a moving image with optional label maps (Dice, HD95),
Slicer ``.fcsv`` landmark files (TRE), modalities, a mask and the labels to score.
:func:`read_pairs` reads them from YAML, JSON or CSV; :func:`load_pair` reads a pair's files
once for all methods (:mod:`regpipe.bench`).

Example pairs file (YAML; paths relative to the file's folder)::

    - name: sub-02_to_sub-01
      fixed: sub-01_T1w.nii.gz
      moving: sub-02_T1w.nii.gz
      fixed_labels: sub-01_aseg.nii.gz
      moving_labels: sub-02_aseg.nii.gz
      labels: 2-5,7,8,10-18
    - fixed: MNI152_T1_1mm_brain.nii.gz
      moving: colin27.nii.gz
      fixed_landmarks: tpl-MNI152NLin6Asym_afids.fcsv
      moving_landmarks: tpl-Colin27_afids.fcsv
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from regpipe.atomic import atomic_write
from regpipe.errors import InputError
from regpipe.evaluation import match_landmarks, read_fcsv
from regpipe.imageio import Image, check_same_grid, load_image
from regpipe.metrics import MANY_LABELS

__all__ = ["LoadedPair", "PairSpec", "check_pair_files", "load_pair", "read_pairs",
           "write_pairs"]


@dataclass(frozen=True)
class PairSpec:
    """One image pair and what it can be evaluated with.

    ``fixed``/``moving`` are images; ``fixed_labels``/``moving_labels`` label maps on their
    image's grid (Dice, HD95); ``fixed_landmarks``/``moving_landmarks`` Slicer ``.fcsv`` files
    (TRE); ``mask`` a region on the fixed grid for folding, SD log J and NCC (default: the
    fixed labels > 0, else the fixed image's foreground); ``labels`` the labels scored
    (default: those present in both maps); ``subset`` a group name for the tables.
    """

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None
    fixed_modality: str = "mri"
    moving_modality: str = "mri"
    mask: Path | None = None
    labels: tuple[int, ...] | None = None
    subset: str = "pairs"

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in _PATH_FIELDS and value is not None and not isinstance(value, Path):
                object.__setattr__(self, item.name, Path(value))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        for what in ("fixed_modality", "moving_modality"):
            if getattr(self, what) not in ("mri", "ct"):
                raise InputError(f"pair {self.name}: {what} must be mri or ct, "
                                 f"got {getattr(self, what)!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> PairSpec:
        """A pair from a mapping (a pairs-file entry); relative paths are taken from ``base``;
        ``modality`` sets both modalities; ``labels`` may be a list or a ``"1,2,5-9"`` string."""
        from regpipe.evaluation import parse_label_list

        data = {k: v for k, v in data.items() if v not in (None, "")}
        known = {f.name for f in fields(cls)} | {"modality"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown pair field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        for key in ("fixed", "moving"):
            if key not in data:
                raise InputError(f"a pair needs '{key}': {data}")
        modality = data.pop("modality", None)
        if modality is not None:
            data.setdefault("fixed_modality", modality)
            data.setdefault("moving_modality", modality)
        for key in ("fixed_modality", "moving_modality"):
            if key in data:
                data[key] = str(data[key]).lower()
        for key in _PATH_FIELDS:
            if key in data:
                path = Path(os.path.expanduser(str(data[key])))
                data[key] = path if path.is_absolute() or base is None else base / path
        labels = data.get("labels")
        try:
            if isinstance(labels, (str, int)):
                data["labels"] = parse_label_list(str(labels))
            elif isinstance(labels, list):  # items may be ranges too: [2, "5-7"]
                data["labels"] = [v for item in labels for v in parse_label_list(str(item))]
        except (TypeError, ValueError) as error:
            raise InputError(f"labels {labels!r}: {error}") from None
        data.setdefault("name", f"{_stem(data['fixed'])}__{_stem(data['moving'])}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:  # a value of the wrong kind
            raise InputError(f"pair {data.get('name')}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (paths as strings, ``None`` fields left out)."""
        out = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            out[key] = str(value) if isinstance(value, Path) else (
                list(value) if isinstance(value, tuple) else value)
        return out


_PATH_FIELDS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks",
                "moving_landmarks", "mask")


def _stem(path: Any) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class LoadedPair:
    """A pair's images and evaluation data in memory (loaded once for all methods)."""

    spec: PairSpec
    fixed: Image
    moving: Image
    region: NDArray[np.bool_]
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    landmarks: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
    notes: list[str] = field(default_factory=list)


def check_pair_files(pairs: Sequence[PairSpec]) -> None:
    """Every file the pairs name exists: a typo fails before a long run starts (and before
    ``--overwrite`` removes earlier results), not at pair 37 hours later. A file that exists
    but cannot be read still becomes that pair's error rows, as any failure does.

    Raises
    ------
    InputError
        Naming up to five missing files.
    """
    missing = [f"{spec.name}: {key.replace('_', ' ')} {path}"
               for spec in pairs for key in _PATH_FIELDS
               if (path := getattr(spec, key)) is not None and not Path(path).exists()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError("missing file(s): " + "; ".join(missing[:5]) + more)


def load_pair(spec: PairSpec) -> LoadedPair:
    """Read and check a pair's files (see :class:`PairSpec` for the default region)."""
    from regpipe.preprocess import normalize_intensity

    fixed = load_image(spec.fixed, "image", f"{spec.name}: fixed image")
    moving = load_image(spec.moving, "image", f"{spec.name}: moving image")
    pair = LoadedPair(spec, fixed, moving, np.ones(fixed.geometry.shape, bool))
    if spec.fixed_labels is not None:
        pair.fixed_labels = load_image(spec.fixed_labels, "labels", f"{spec.name}: fixed labels")
        check_same_grid(fixed, pair.fixed_labels, "fixed labels")
    if spec.moving_labels is not None:
        pair.moving_labels = load_image(spec.moving_labels, "labels",
                                        f"{spec.name}: moving labels")
        check_same_grid(moving, pair.moving_labels, "moving labels")
    if spec.mask is not None:
        mask = load_image(spec.mask, "mask", f"{spec.name}: mask")
        check_same_grid(fixed, mask, "mask")
        pair.region = np.asarray(mask.data) != 0
    elif pair.fixed_labels is not None and np.any(pair.fixed_labels.data):
        pair.region = np.asarray(pair.fixed_labels.data) != 0
    else:
        pair.region = normalize_intensity(fixed.data, spec.fixed_modality) > 0.05
    if (spec.fixed_landmarks is None) != (spec.moving_landmarks is None):
        pair.notes.append("TRE needs both landmark files; only one was given")
    elif spec.fixed_landmarks is not None and spec.moving_landmarks is not None:
        fixed_points = read_fcsv(spec.fixed_landmarks)
        moving_points = read_fcsv(spec.moving_landmarks)
        try:
            points_f, points_m, _ = match_landmarks(fixed_points, moving_points)
        except InputError as error:  # no TRE for this pair; its Dice and the rest still count
            pair.notes.append(f"no TRE: {spec.fixed_landmarks.name} and "
                              f"{spec.moving_landmarks.name}: {error}")
        else:
            pair.landmarks = (points_f, points_m)
            left_out = len(fixed_points) + len(moving_points) - 2 * len(points_f)
            if left_out:
                pair.notes.append(f"TRE over the {len(points_f)} landmark(s) both files name; "
                                  f"{left_out} point(s) named in one file only are left out")
    if (pair.fixed_labels is None) != (pair.moving_labels is None):
        pair.notes.append("Dice and HD95 need both label maps; only one was given")
    elif spec.labels is None and pair.fixed_labels is not None \
            and pair.moving_labels is not None:
        in_fixed = set(np.unique(pair.fixed_labels.data).tolist()) - {0}
        in_moving = set(np.unique(pair.moving_labels.data).tolist()) - {0}
        one_side = sorted(in_fixed ^ in_moving)
        if one_side:
            pair.notes.append(
                f"{len(one_side)} label(s) are in one label map only "
                f"({', '.join(map(str, one_side[:12]))}{' ...' if len(one_side) > 12 else ''})"
                ": they are not scored")
        if len(in_fixed | in_moving) > MANY_LABELS:
            pair.notes.append(f"{len(in_fixed | in_moving)} distinct labels: is a label map an "
                              "intensity image?")
    elif spec.labels is not None and pair.fixed_labels is not None \
            and pair.moving_labels is not None:
        present = set(np.unique(pair.fixed_labels.data)) & set(np.unique(pair.moving_labels.data))
        absent = [label for label in spec.labels if label not in present]
        if absent:
            pair.notes.append(
                f"{len(absent)} of the {len(spec.labels)} labels asked for are not in both label "
                f"maps ({', '.join(map(str, absent[:12]))}{' ...' if len(absent) > 12 else ''})"
                ": they are not scored (Dice and HD95 average the others)")
    return pair



def read_pairs(path: str | os.PathLike) -> list[PairSpec]:
    """Pair specs from a YAML, JSON or CSV file (relative paths are taken from its folder).

    YAML and JSON hold a list of mappings (or a mapping with a ``pairs`` list); CSV has a
    header row with the :class:`PairSpec` field names (empty cells = not given).
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark: not a name
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InputError("YAML pair files need PyYAML (pip install pyyaml); "
                                 "JSON and CSV work without it") from None
            try:
                data: Any = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise InputError(f"pairs file {path} cannot be parsed: {error}") from None
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            data = []
            for number, row in enumerate(reader, 2):
                if None in row:
                    raise InputError(f"pairs file {path}: row {number} has more cells than the "
                                     'header (quote a value holding commas: "2-5,7")')
                data.append({str(key).strip(): value for key, value in row.items()})
        else:
            raise InputError(f"pairs file {path}: use .yaml, .yml, .json, .csv or .tsv")
    except ValueError as error:  # JSON and YAML syntax errors
        raise InputError(f"pairs file {path} cannot be parsed: {error}") from None
    if isinstance(data, dict):
        data = data.get("pairs")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise InputError(f"pairs file {path} must hold a non-empty list of pairs")
    base = path.parent.resolve()  # rows compare equal however the file was named
    pairs = []
    for number, entry in enumerate(data, 1):
        try:
            pairs.append(PairSpec.from_dict(entry, base=base))
        except InputError as error:
            raise InputError(f"pairs file {path}, pair {number}: {error}") from None
    return pairs


def write_pairs(pairs: Sequence[PairSpec], path: str | os.PathLike) -> Path:
    """Write pair specs as JSON (readable by :func:`read_pairs`; paths made absolute)."""
    entries = []
    for pair in pairs:
        entry = pair.to_dict()
        for key in _PATH_FIELDS:
            if key in entry:
                entry[key] = str(Path(entry[key]).absolute())
        entries.append(entry)
    text = json.dumps({"pairs": entries}, indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
