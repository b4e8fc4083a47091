"""Registration targets from TemplateFlow, found offline first, and ``regpipe-templates``.

``--template`` takes a TemplateFlow identifier with optional qualifiers, or a NIfTI file::

    MNI152NLin2009cAsym                  res-01 (1 mm) whole-head T1w (the default)
    MNI152NLin2009cAsym:res-2            the 2 mm image
    MNI152NLin2009cAsym:desc-brain       the skull-stripped image (tpl-..._desc-brain_T1w)
    MNIPediatricAsym:cohort-4:res-1      a cohort of a template
    /path/to/my_template.nii.gz          any NIfTI file (space label from its name)

Files are looked up directly in ``$TEMPLATEFLOW_HOME/tpl-<ID>/`` by their TemplateFlow names,
without building TemplateFlow's pybids index (about 10 s) and without any network access. The
TemplateFlow wheel ships a skeleton of 0-byte placeholders; a placeholder or a missing file is
downloaded through TemplateFlow only when downloads are allowed (``REGPIPE_OFFLINE`` unset);
otherwise, or when the download fails, :class:`~regpipe.errors.TemplateError` names the file and
the command that pre-fetches it (``regpipe-templates fetch <ID>``), before any work starts.

``TEMPLATEFLOW_HOME`` is read when a template is resolved (default: TemplateFlow's own,
``~/.cache/templateflow``) and exported before ``templateflow`` is first imported, because
TemplateFlow reads it at import time.

Example
-------
>>> spec = parse_template_spec("MNI152NLin2009cAsym:res-2:desc-brain")
>>> spec.identifier, spec.resolution, spec.desc
('MNI152NLin2009cAsym', '2', 'brain')
>>> template_filename("MNI152NLin2009cAsym", "T1w", resolution="2", desc="brain")
'tpl-MNI152NLin2009cAsym_res-02_desc-brain_T1w.nii.gz'
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from regpipe.errors import RegpipeError, TemplateError

__all__ = [
    "ResolvedTemplate",
    "TemplateSpec",
    "fetch_template",
    "main",
    "parse_template_spec",
    "resolve_template",
    "template_filename",
    "templateflow_home",
]

LOGGER = logging.getLogger("regpipe.bids_app")
ENV_HOME = "TEMPLATEFLOW_HOME"
TEMPLATEFLOW_S3 = "https://templateflow.s3.amazonaws.com"
_ID_RE = re.compile(r"^[A-Za-z0-9]+$")
_QUALIFIER_RE = re.compile(r"^(res|cohort|desc)-([A-Za-z0-9]+)$")


@dataclass(frozen=True)
class TemplateSpec:
    """What ``--template`` asked for: a TemplateFlow identifier (with qualifiers) or a file."""

    identifier: str | None = None
    resolution: str | None = None
    cohort: str | None = None
    desc: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        parts = [str(self.identifier)]
        parts += [f"{key}-{value}" for key, value in
                  (("cohort", self.cohort), ("res", self.resolution), ("desc", self.desc))
                  if value is not None]
        return ":".join(parts)


@dataclass(frozen=True)
class ResolvedTemplate:
    """A registration target on disk.

    Attributes
    ----------
    space:
        Space label for output names (``space-``/``to-``): the TemplateFlow identifier, or a
        label made from a file's name (``tpl-<ID>`` prefix if present, else its letters and
        digits).
    image:
        The template image (absolute path, non-empty).
    mask:
        The template's ``desc-brain_mask`` at the same resolution, or ``None`` when the template
        has none or it is not available offline.
    suffix:
        Contrast of ``image`` (``T1w`` unless the template has the requested suffix).
    uri:
        Public address of ``image`` (TemplateFlow's S3 URL) or its path, for ``SpatialReference``.
    """

    space: str
    image: Path
    mask: Path | None
    suffix: str
    uri: str
    identifier: str | None = None
    resolution: str | None = None
    cohort: str | None = None
    desc: str | None = None


def parse_template_spec(value: str) -> TemplateSpec:
    """Parse ``--template``; raises :class:`ValueError` with the reason when malformed."""
    text = value.strip()
    if text.endswith((".nii", ".nii.gz")) or os.sep in text or text.startswith("~"):
        return TemplateSpec(path=Path(text).expanduser())
    identifier, *qualifiers = text.split(":")
    if not _ID_RE.match(identifier):
        raise ValueError(
            f"--template {value!r}: expected a TemplateFlow identifier such as "
            "MNI152NLin2009cAsym[:res-2][:desc-brain], or a .nii/.nii.gz file"
        )
    found: dict[str, str] = {}
    for qualifier in qualifiers:
        match = _QUALIFIER_RE.match(qualifier)
        if not match or match.group(1) in found:
            raise ValueError(
                f"--template {value!r}: unknown or repeated qualifier {qualifier!r} "
                "(use res-N, cohort-N, desc-brain)"
            )
        found[match.group(1)] = match.group(2)
    resolution = found.get("res")
    if resolution is not None and resolution.isdigit():
        resolution = str(int(resolution))
    return TemplateSpec(identifier=identifier, resolution=resolution,
                        cohort=found.get("cohort"), desc=found.get("desc"))


def templateflow_home() -> Path:
    """Return TemplateFlow's folder: ``$TEMPLATEFLOW_HOME``, else TemplateFlow's default."""
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser().absolute()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # pragma: no cover - platformdirs comes with templateflow
        return Path.home() / ".cache" / "templateflow"
    return Path(user_cache_dir("templateflow")).absolute()


def template_filename(identifier: str, suffix: str, *, resolution: str | None = None,
                      cohort: str | None = None, desc: str | None = None,
                      extension: str = ".nii.gz") -> str:
    """Return the TemplateFlow file name (numeric resolutions written as ``res-01``)."""
    parts = [f"tpl-{identifier}"]
    if cohort is not None:
        parts.append(f"cohort-{cohort}")
    if resolution is not None:
        parts.append(f"res-{int(resolution):02d}" if resolution.isdigit() else f"res-{resolution}")
    if desc is not None:
        parts.append(f"desc-{desc}")
    return "_".join(parts) + f"_{suffix}{extension}"


def _folder(home: Path, spec: TemplateSpec) -> Path:
    folder = home / f"tpl-{spec.identifier}"
    return folder / f"cohort-{spec.cohort}" if spec.cohort is not None else folder


def _candidates(home: Path, spec: TemplateSpec, suffix: str, desc: str | None
                ) -> dict[str | None, Path]:
    """Files ``tpl-<ID>[_cohort-][_res-R][_desc-D]_<suffix>.nii[.gz]`` by resolution label."""
    folder = _folder(home, spec)
    if not folder.is_dir():
        return {}
    pattern = re.compile(
        rf"^tpl-{re.escape(str(spec.identifier))}"
        + (rf"_cohort-{re.escape(spec.cohort)}" if spec.cohort is not None else "")
        + r"(?:_res-(?P<res>[A-Za-z0-9]+))?"
        + (rf"_desc-{re.escape(desc)}" if desc is not None else "")
        + rf"_{re.escape(suffix)}\.nii(?:\.gz)?$"
    )
    found: dict[str | None, Path] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match:
            res = match.group("res")
            found.setdefault(str(int(res)) if res and res.isdigit() else res, path)
    return found


def _pick_resolution(found: dict[str | None, Path], wanted: str | None) -> str | None:
    if wanted is not None or not found:
        return wanted if wanted is not None else "1"
    numeric = [(int(r), r) for r in found if r is not None and r.isdigit()]
    if "1" in found:
        return "1"
    if numeric:
        return min(numeric)[1]
    return min(found, key=str)


def _usable(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def downloads_allowed() -> bool:
    """Return ``False`` when ``REGPIPE_OFFLINE`` forbids downloads (see :mod:`regpipe.weights`)."""
    from regpipe.weights import is_offline

    return not is_offline()


def _fetch_command(spec: TemplateSpec, resolution: str | None, suffix: str) -> str:
    command = f"regpipe-templates fetch {spec.identifier}"
    if spec.cohort is not None:
        command += f" --cohort {spec.cohort}"
    if resolution is not None:
        command += f" --resolution {resolution}"
    if suffix != "T1w":
        command += f" --suffix {suffix}"
    return command


def _client(home: Path):
    """A TemplateFlow client rooted at ``home`` (``TEMPLATEFLOW_HOME`` exported first)."""
    os.environ.setdefault(ENV_HOME, str(home))
    from templateflow.client import TemplateFlowClient

    client = TemplateFlowClient(root=home)
    # Placeholders for files a hand-made TEMPLATEFLOW_HOME lacks (from the wheel, no network);
    # existing files are never overwritten.
    client.cache.update(local=True, overwrite=False, silent=True)
    return client


def _download(home: Path, spec: TemplateSpec, **query) -> list[Path]:
    """Download the files of ``query`` through TemplateFlow; return them (maybe none)."""
    client = _client(home)
    if spec.cohort is not None:
        query["cohort"] = spec.cohort
    resolution = query.get("resolution")
    if isinstance(resolution, str) and resolution.isdigit():
        query["resolution"] = int(resolution)
    result = client.get(spec.identifier, extension=".nii.gz", **query)
    paths = result if isinstance(result, list) else [result]
    return [Path(p) for p in paths]


def _try_download(home: Path, spec: TemplateSpec, target: Path, query: dict) -> str | None:
    """Download ``target``; return ``None`` on success, else why it is still unavailable."""
    if not downloads_allowed():
        return "REGPIPE_OFFLINE forbids downloading it"
    LOGGER.info("downloading %s through TemplateFlow", target.name)
    try:
        _download(home, spec, **query)
    except (RegpipeError, OSError, RuntimeError, ValueError) as error:
        return f"downloading it failed ({type(error).__name__}: {str(error).splitlines()[0]})"
    except Exception as error:  # requests' errors share no base we import
        return f"downloading it failed ({type(error).__name__})"
    return None if _usable(target) else "the download left no file"


def _resolve_file(spec: TemplateSpec, suffix: str) -> ResolvedTemplate:
    path = spec.path.absolute() if spec.path is not None else Path()
    if not path.is_file():
        raise TemplateError(f"--template {path} does not exist")
    if path.stat().st_size == 0:
        raise TemplateError(f"--template {path} is an empty (0-byte) file")
    from regpipe.errors import InputError
    from regpipe.imageio import load_image

    try:  # before any subject is processed: a bad target would fail every one of them
        image = load_image(path, "image", f"--template {path}")
    except InputError as error:
        raise TemplateError(str(error)) from None
    if suffix == "CT" and float(image.data.min()) > -500:
        # both images are normalised with the CT window: an MRI template would be flattened
        LOGGER.warning("--template %s has no values below -500 HU (CT air is -1000): it does "
                       "not look like a CT, and regpipe normalises it as one (the HU window), "
                       "like the CT images registered to it; give a CT template", path)
    match = re.match(r"^tpl-([A-Za-z0-9]+)", path.name)
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name)
    space = match.group(1) if match else (re.sub(r"[^A-Za-z0-9]", "", stem) or "custom")
    # a file named the TemplateFlow way says its cohort and resolution (output names use them)
    found = {key: m.group(1) for key in ("cohort", "res")
             if match and (m := re.search(rf"_{key}-([A-Za-z0-9]+)", path.name))}
    return ResolvedTemplate(space=space, image=path, mask=None, suffix=suffix,
                            uri=path.as_uri(), cohort=found.get("cohort"),
                            resolution=found.get("res"))


def resolve_template(spec: TemplateSpec | str, *, suffix: str = "T1w",
                     download: bool | None = None) -> ResolvedTemplate:
    """Find the registration target of ``spec`` for images of ``suffix``; fail fast if absent.

    Parameters
    ----------
    spec:
        A :class:`TemplateSpec` or a ``--template`` string.
    suffix:
        Contrast of the moving images; the template's image of that contrast is used when the
        template has one (``T2w`` for ``MNI152NLin2009cAsym``), else its ``T1w``.
    download:
        Allow downloading placeholders through TemplateFlow; ``None`` (default): unless
        ``REGPIPE_OFFLINE`` is set.

    Raises
    ------
    TemplateError
        The file is missing or a 0-byte placeholder and cannot be downloaded; the message
        names the file and the pre-fetch command.
    """
    if isinstance(spec, str):
        spec = parse_template_spec(spec)
    if spec.path is not None:
        return _resolve_file(spec, suffix)
    home = templateflow_home()
    contrast = suffix
    found = _candidates(home, spec, contrast, spec.desc)
    if not found and suffix == "CT":
        raise TemplateError(
            f"template {spec.identifier} has no CT image: regpipe normalises the template like "
            "the images registered to it, and an MRI template through the CT window (-1000 to "
            "1000 HU) keeps almost no contrast; give a CT template as a file (--template FILE)")
    if not found and suffix != "T1w":
        contrast, found = "T1w", _candidates(home, spec, "T1w", spec.desc)
        LOGGER.info("template %s has no %s image; using its T1w", spec.identifier, suffix)
    resolution = _pick_resolution(found, spec.resolution)
    image = found.get(resolution) or _folder(home, spec) / template_filename(
        str(spec.identifier), contrast, resolution=resolution, cohort=spec.cohort, desc=spec.desc)
    if not _usable(image):
        problem = _catalogue_problem(spec, contrast)
        if problem is not None:  # no download could help
            raise TemplateError(problem)
        state = "a 0-byte placeholder" if image.is_file() else "missing"
        why = None
        if download is not False:
            why = _try_download(home, spec, image, {"resolution": resolution, "suffix": contrast,
                                                    "desc": spec.desc})
        else:
            why = "downloading was not allowed"
        if why is not None:
            local = _local_alternatives(home, spec, contrast)
            raise TemplateError(
                f"template file {image} is {state} and {why}; pre-fetch it on a machine with "
                f"internet access: `{ENV_HOME}={home} "
                f"{_fetch_command(spec, resolution, contrast)}` (or pass --template a NIfTI file"
                + (f"; available here: --template {' or '.join(local)}" if local else "") + ")"
            )
    if spec.resolution is None and resolution != "1":
        LOGGER.warning("template %s: using res-%s, the only resolution here (the default is "
                       "res-1; give --template %s:res-N to choose)", spec.identifier, resolution,
                       spec.identifier)
    _check_template_image(image, "image")
    mask = _find_mask(home, spec, resolution, download)
    if mask is not None:
        try:
            _check_template_image(mask, "mask")
        except TemplateError as error:
            LOGGER.warning("%s; continuing without the template's brain mask", error)
            mask = None
    relative = image.relative_to(home).as_posix()
    return ResolvedTemplate(
        space=str(spec.identifier), image=image.absolute(), mask=mask, suffix=contrast,
        uri=f"{TEMPLATEFLOW_S3}/{relative}", identifier=spec.identifier, resolution=resolution,
        cohort=spec.cohort, desc=spec.desc,
    )


def _check_template_image(path: Path, kind: str) -> None:
    """Read the whole file once: a truncated or corrupt template would fail every subject."""
    from regpipe.errors import InputError
    from regpipe.imageio import load_image

    try:
        load_image(path, "mask" if kind == "mask" else "image", f"template {kind}")
    except InputError as error:
        raise TemplateError(f"{error} (a damaged download? delete it and fetch it again)"
                            ) from None


@functools.lru_cache(maxsize=1)
def _catalogue() -> tuple[str, ...]:
    """File paths of TemplateFlow's archive skeleton (shipped with the templateflow package,
    read without network or writing), or none when it is not there."""
    try:
        import templateflow.conf as conf

        with zipfile.ZipFile(Path(conf.__file__).parent / "templateflow-skel.zip") as archive:
            return tuple(archive.namelist())
    except (ImportError, OSError, zipfile.BadZipFile):
        return ()


def _catalogue_problem(spec: TemplateSpec, suffix: str) -> str | None:
    """Why TemplateFlow cannot give ``spec``'s ``suffix`` image at all (an unknown name, a
    missing cohort, no such contrast), from its skeleton; ``None`` when it can or we cannot
    tell."""
    names = _catalogue()
    if not names:
        return None
    identifier = str(spec.identifier)
    known = sorted({n.split("/")[0][len("tpl-"):] for n in names if n.startswith("tpl-")})
    if identifier not in known:
        return (f"{identifier} is not a TemplateFlow template (known: {', '.join(known)}); "
                "or pass --template a NIfTI file")
    own = [n for n in names if n.startswith(f"tpl-{identifier}/")]
    cohorts = sorted({m.group(1) for n in own if (m := re.search(r"/cohort-([^/]+)/", n))},
                     key=lambda c: (len(c), c))
    if cohorts and spec.cohort is None:
        return (f"{identifier} has one template per cohort: give one, e.g. --template "
                f"{identifier}:cohort-{cohorts[0]} (cohorts: {', '.join(cohorts)})")
    if spec.cohort is not None and spec.cohort not in cohorts:
        return (f"{identifier} has no cohort {spec.cohort}"
                + (f" (cohorts: {', '.join(cohorts)})" if cohorts else " (it has no cohorts)"))
    contrasts = sorted({m.group(1) for n in own
                        if (m := re.search(r"_([A-Za-z0-9]+)\.nii\.gz$", n.split("/")[-1]))
                        and m.group(1) not in ("mask", "dseg", "probseg")})
    if suffix not in contrasts and "T1w" not in contrasts:
        return (f"{identifier} has no {' or '.join(dict.fromkeys([suffix, 'T1w']))} image"
                + (f" (it has {', '.join(contrasts)})" if contrasts else "")
                + ": pass --template a NIfTI file")
    return None


def _local_alternatives(home: Path, spec: TemplateSpec, suffix: str) -> list[str]:
    """``--template`` values of the usable ``suffix`` images of the template in ``home``."""
    folder = _folder(home, spec)
    if not folder.is_dir():
        return []
    pattern = re.compile(
        rf"^tpl-{re.escape(str(spec.identifier))}(?:_cohort-(?P<cohort>[A-Za-z0-9]+))?"
        rf"(?:_res-(?P<res>[A-Za-z0-9]+))?(?:_desc-(?P<desc>[A-Za-z0-9]+))?"
        rf"_{re.escape(suffix)}\.nii(?:\.gz)?$"
    )
    found = []
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match and _usable(path):
            parts = [str(spec.identifier)]
            for key in ("cohort", "res", "desc"):
                value = match.group(key)
                if value is not None:
                    parts.append(f"{key}-{int(value) if value.isdigit() else value}")
            found.append(":".join(parts))
    return found


def _find_mask(home: Path, spec: TemplateSpec, resolution: str | None,
               download: bool | None) -> Path | None:
    """The template's brain mask at ``resolution``, or ``None`` (logged) when unavailable."""
    found = _candidates(home, spec, "mask", "brain")
    mask = found.get(resolution)
    if mask is None:
        LOGGER.info("template %s has no res-%s desc-brain mask here", spec.identifier,
                    resolution)
        return None
    if not _usable(mask) and download is not False:
        why = _try_download(home, spec, mask, {"resolution": resolution, "suffix": "mask",
                                               "desc": "brain"})
        if why is not None:
            LOGGER.warning("template brain mask %s is not available (%s); continuing without "
                           "it", mask, why)
    return mask.absolute() if _usable(mask) else None


# --------------------------------------------------------------------------- regpipe-templates


def fetch_template(identifier: str, *, resolution: str | None = "1", cohort: str | None = None,
                   suffixes: Sequence[str] = ("T1w",)) -> list[Path]:
    """Download a template's images (whole-head and brain) and brain mask; return the files.

    Raises :class:`~regpipe.errors.TemplateError` when downloads are forbidden
    (``REGPIPE_OFFLINE``), TemplateFlow fails (offline), or the template has no image of the
    first suffix at that resolution.
    """
    spec = TemplateSpec(identifier=identifier, resolution=resolution, cohort=cohort)
    home = templateflow_home()
    if not downloads_allowed():
        raise TemplateError(
            f"REGPIPE_OFFLINE is set, so {identifier} is not downloaded into {home}; unset it "
            "on a machine with internet access"
        )
    wanted = [(suffix, None) for suffix in suffixes] + [("T1w", "brain"), ("mask", "brain")]
    fetched: list[Path] = []
    for i, (suffix, desc) in enumerate(dict.fromkeys(wanted)):
        name = template_filename(identifier, suffix, resolution=resolution, cohort=cohort,
                                 desc=desc)
        try:
            paths = _download(home, spec, resolution=resolution, suffix=suffix, desc=desc)
        except Exception as error:  # requests' errors share no base we import
            detail = str(error).splitlines()[0] if str(error) else ""
            raise TemplateError(
                f"could not download {name} into {home} ({type(error).__name__}: {detail}); "
                "check the internet connection and the template identifier"
            ) from None
        if not paths and i == 0:
            raise TemplateError(
                f"TemplateFlow has no {name} (check the identifier, --resolution and --suffix)"
            )
        fetched += paths
    return fetched


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe-templates",
        description="Pre-fetch TemplateFlow templates for offline use (HPC compute nodes, "
        "containers), into $TEMPLATEFLOW_HOME.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download a template's images and brain mask")
    fetch.add_argument("identifier", help="TemplateFlow identifier, e.g. MNI152NLin2009cAsym")
    fetch.add_argument("--resolution", default="1", help="resolution index (default 1)")
    fetch.add_argument("--cohort", default=None, help="cohort label, for cohort templates")
    fetch.add_argument("--suffix", nargs="+", default=["T1w"],
                       help="contrasts to fetch (default T1w)")
    path = commands.add_parser("path", help="print the files --template would use (offline)")
    path.add_argument("template", help="as --template: ID[:res-N][:desc-brain] or a file")
    path.add_argument("--suffix", default="T1w")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``regpipe-templates fetch ID [--resolution N]`` and ``regpipe-templates path SPEC``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "fetch":
            resolution = args.resolution if args.resolution.lower() != "none" else None
            for path in fetch_template(args.identifier, resolution=resolution,
                                       cohort=args.cohort, suffixes=args.suffix):
                print(path)
        else:
            resolved = resolve_template(args.template, suffix=args.suffix, download=False)
            print(resolved.image)
            if resolved.mask is not None:
                print(resolved.mask)
    except (RegpipeError, ValueError) as error:
        print(f"regpipe-templates: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
