"""Command line of the regpipe BIDS App: ``regpipe bids_dir output_dir {participant,group}``.

The three positional arguments follow the BIDS Apps 1.0 convention; the options follow
fMRIPrep's spelling where one exists (``--participant-label``, ``--bids-filter-file``,
``--nprocs``, ``--omp-nthreads``, ``--mem``, ``-w/--work-dir``...). Every value is checked
here, at parse time, so a bad command line fails in a second with exit code 64 (usage) and a
one-line reason; an unknown analysis level is left to :mod:`regpipe.bids_app.run`, which
returns 17 as the execution specification asks.

Example
-------
>>> args = parse_args(["/data", "/out", "participant", "--participant-label", "sub-01", "02"])
>>> args.participant_label
['01', '02']
>>> parse_args(["/data", "/out", "participant", "--mem", "16G"]).mem_gb
16.0
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from regpipe.bids_app.exit_codes import UsageError
from regpipe.bids_app.templates import parse_template_spec

from regpipe import __version__
from regpipe.cli._common import network_passes_argument, region_argument, smoothness_argument

__all__ = [
    "ANALYSIS_LEVELS",
    "COMPARE_METHODS",
    "NETWORK_METHOD",
    "build_parser",
    "normalize_label",
    "parse_args",
    "parse_memory_gb",
]

ANALYSIS_LEVELS = ("participant", "group")
NETWORK_METHOD = "network"
"""Name of the network method in the ``methods`` list given to the workflow (its outputs are
the top level of ``output_dir``; ``ants-<m>`` go to
``output_dir/derivatives/regpipe-ants-<m>/``)."""
COMPARE_METHODS = ("ants-syn", "ants-synquick", "ants-affine")
"""Values of ``--compare``: the ANTs methods run on the same preprocessed images."""
AFFINE_INIT = ("ours", "ants", "none")
MODES = ("template", "longitudinal")
DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"
DEFAULT_IO_ITERATIONS = 50

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9]+$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_MEMORY_UNIT_GB = {"K": 1 / 1024**2, "": 1 / 1024, "M": 1 / 1024, "G": 1.0, "T": 1024.0}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` only where it informs: not for unset values (``None``,
    ``False``, empty lists) and not where the help text already says the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, []) or re.search(r"\bdefault[: ]", text):
            return text
        return super()._get_help_string(action) or text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise :class:`UsageError` (exit 64, not 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def normalize_label(value: str, prefix: str) -> str:
    """Return a BIDS label without its ``prefix`` (``"sub-01"`` -> ``"01"``); check it.

    Raises :class:`argparse.ArgumentTypeError` when the label is not alphanumeric (BIDS labels
    are ``[a-zA-Z0-9]+``).
    """
    label = value.strip()
    label = label.removeprefix(prefix)
    if not _LABEL_RE.match(label):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a BIDS label (letters and digits only, optionally after "
            f"{prefix!r})"
        )
    return label


def _labels_from(prefix: str):
    """Type function: one label, or a file of labels: white-space separated, or a ``.tsv``
    (such as ``participants.tsv``) whose first column holds them under a header."""

    def parse(value: str) -> list[str]:
        path = Path(value).expanduser()
        # a valid label is a label (a file "01" in the current folder does not change that);
        # a file is named with a folder or an extension: ./subjects, participants.tsv
        looks_like_file = os.sep in value or "/" in value or "." in value
        if not path.is_file() or (_LABEL_RE.match(value.removeprefix(prefix))
                                  and not looks_like_file):
            return [normalize_label(value, prefix)]
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # a spreadsheet's BOM
        except (OSError, UnicodeDecodeError) as error:
            raise argparse.ArgumentTypeError(f"cannot read labels from {path}: {error}") from None
        if path.suffix.lower() == ".tsv":  # participants.tsv: the first column, no header
            words = [line.split("\t")[0].strip() for line in lines]
            words = [w for w in words if w and w not in ("participant_id", "session_id")]
        else:
            words = " ".join(lines).split()
        if not words:
            raise argparse.ArgumentTypeError(f"{path} holds no labels")
        return [normalize_label(word, prefix) for word in words]

    return parse


def parse_memory_gb(value: str) -> float:
    """Return a memory amount in GB; a bare number is MB (as fMRIPrep's ``--mem``).

    >>> parse_memory_gb("16G"), parse_memory_gb("8000MB"), parse_memory_gb("2048")
    (16.0, 7.8125, 2.0)
    """
    match = _MEMORY_RE.match(value)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an amount of memory (examples: 16G, 16GB, 8000MB, 8000)"
        )
    amount = float(match.group(1)) * _MEMORY_UNIT_GB[match.group(2).upper()]
    if amount <= 0:
        raise argparse.ArgumentTypeError("--mem must be positive")
    return amount


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _seed(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {value!r}") from None
    if not 0 <= number < 2**32:
        raise argparse.ArgumentTypeError("the seed must be in [0, 2**32)")
    return number


def _io_iterations(value: str) -> int | None:
    if value.lower() in ("none", "0"):
        return None if value.lower() == "none" else 0
    number = _positive_int(value)
    return number


#: Anatomical suffixes in BIDS's own spelling, for ``--suffix t1w`` and the like.
_KNOWN_SUFFIXES = ("T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2",
                   "angio", "T1map", "T2map", "UNIT1", "CT")


def _suffix(value: str) -> str:
    if not _SUFFIX_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a BIDS suffix (e.g. T1w, T2w, CT)")
    # suffixes are case-sensitive in BIDS: take the standard spelling of a known one
    return next((known for known in _KNOWN_SUFFIXES if known.lower() == value.lower()), value)


def _device(value: str) -> str:
    if not _DEVICE_RE.match(value.lower()):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device (auto, cpu, cuda, cuda:N)")
    return value.lower()


def _json_object(value: str, what: str) -> dict[str, Any]:
    """Parse ``value`` as a JSON object, or read one from the file it names."""
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{what}: {value!r} is neither JSON nor a file")
        try:
            text = path.read_text()
        except OSError as error:
            raise argparse.ArgumentTypeError(f"{what}: cannot read {path}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{what}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{what}: expected a JSON object {{...}}")
    return data


def _plugin_args(value: str) -> dict[str, Any]:
    args = _json_object(value, "--plugin-args")
    # regpipe's own entries (workflows.base.run_workflow), checked here rather than mid-run
    if "node_resources" in args and not isinstance(args["node_resources"], bool):
        raise argparse.ArgumentTypeError("--plugin-args: node_resources must be true or false")
    for key, example in (("parallel_environment", "smp"), ("memory_resource", "h_vmem")):
        value = args.get(key)  # Grid Engine's names, see the README
        if value is not None and not (isinstance(value, str)
                                      and re.fullmatch(r"[\w.-]+", value)):
            raise argparse.ArgumentTypeError(
                f"--plugin-args: {key} must be a name such as {example}")
    poll = args.get("poll_sleep_duration")
    if poll is not None and (isinstance(poll, bool) or not isinstance(poll, (int, float))
                             or poll < 0):
        raise argparse.ArgumentTypeError(
            "--plugin-args: poll_sleep_duration must be a number of seconds >= 0")
    return args


def _filter_file(value: str) -> dict[str, dict[str, Any]]:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"--bids-filter-file {value} does not exist")
    data = _json_object(str(path), "--bids-filter-file")
    filters: dict[str, dict[str, Any]] = {}
    for key, query in data.items():
        if not isinstance(query, dict):
            raise argparse.ArgumentTypeError(
                f"--bids-filter-file: the value of {key!r} must be an object of BIDS entities, "
                'e.g. {"t1w": {"datatype": "anat", "suffix": "T1w", "session": "1"}}'
            )
        if key.lower() in filters:  # keys name a suffix: "T1w" and "t1w" are the same
            raise argparse.ArgumentTypeError(f"--bids-filter-file: {key!r} is given twice")
        unknown = sorted(set(query) - _bids_entities())
        derivative = [name for name in unknown if name in _bids_entities("derivatives")]
        if derivative:
            raise argparse.ArgumentTypeError(
                f"--bids-filter-file: {key!r} filters on {', '.join(derivative)}, an entity of "
                "derivative datasets: bids_dir must be a raw BIDS dataset (brain masks and "
                "label maps of a derivative dataset come in through --labels)"
            )
        if unknown:
            raise argparse.ArgumentTypeError(
                f"--bids-filter-file: {key!r} has unknown BIDS entities {', '.join(unknown)} "
                f"(pybids names them in full: acquisition, reconstruction, session, run...)"
            )
        filters[key.lower()] = query
    return filters


def _bids_entities(config: str = "bids") -> set[str]:
    """Entity names pybids queries accept (``acquisition``, not ``acq``) with ``config``."""
    from bids.layout.models import Config

    return set(Config.load(config).entities)


def _region(value: str) -> str:
    """``--region``: ``auto`` (derived from the modality) or a region of the conditional model."""
    return "auto" if value.lower() == "auto" else region_argument(value)


def _template(value: str):
    try:
        return parse_template_spec(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (usage errors raise :class:`UsageError`)."""
    parser = _Parser(
        prog="regpipe",
        description="regpipe BIDS App: register anatomical images with a foundation network "
        "and compare with ANTs; writes BIDS Derivatives and QC reports.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset (never written to)")
    parser.add_argument("output_dir", type=Path,
                        help="the output derivative dataset (for 'group': the participant "
                        "outputs); inside bids_dir only under bids_dir/derivatives/")
    parser.add_argument("analysis_level", metavar="{participant,group}",
                        help="participant: register the images; group: collect the metrics "
                        "of all participants into a TSV and an HTML report")
    parser.add_argument("--version", action="version", version=f"regpipe {__version__}")

    bids = parser.add_argument_group("selecting the input")
    bids.add_argument("--participant-label", "--participant_label", dest="participant_label",
                      nargs="+", type=_labels_from("sub-"), metavar="LABEL",
                      help="participants to process, with or without 'sub-' (or a text file "
                      "of labels); default: all")
    bids.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                      type=_labels_from("ses-"), metavar="LABEL",
                      help="sessions to process, with or without 'ses-'; subjects without "
                      "sessions are not filtered out")
    bids.add_argument("--bids-filter-file", dest="bids_filters", type=_filter_file,
                      metavar="FILE",
                      help='JSON of PyBIDS queries keyed by lower-case suffix, e.g. '
                      '{"t1w": {"acquisition": "mprage", "run": null}}: each key given '
                      "replaces the default's (null: entity absent, \"*\": any value)")
    bids.add_argument("--skip-bids-validation", "--skip_bids_validation",
                      dest="skip_bids_validation", action="store_true",
                      help="do not validate bids_dir (also indexes non-standard suffixes "
                      "such as CT)")
    bids.add_argument("--suffix", type=_suffix, default="T1w",
                      help="BIDS suffix of the images to register (T1w, T2w, FLAIR, CT...)")
    bids.add_argument("--labels", type=Path, metavar="DERIV_DIR",
                      help="derivative dataset holding label maps (*_dseg.nii.gz, for Dice) and "
                      "brain masks (*_desc-brain_mask.nii.gz) in each image's space")

    reg = parser.add_argument_group("registration")
    reg.add_argument("--mode", choices=MODES, default="template",
                     help="template: every image to --template; longitudinal: every session "
                     "to the subject's reference session")
    reg.add_argument("--reference-session", type=_labels_from("ses-"), metavar="LABEL",
                     help="longitudinal mode: the session the others are registered to "
                     "(default: the first session in natural order)")
    reg.add_argument("--template", type=_template, default=DEFAULT_TEMPLATE,
                     help="TemplateFlow identifier with optional qualifiers "
                     "(MNI152NLin2009cAsym:res-2, ...:desc-brain for the skull-stripped "
                     "image) or a NIfTI file")
    reg.add_argument("--weights", default="default",
                     help="network weights: 'default' (bundled model), 'unigradicon', "
                     "'multigradicon', a checkpoint file, or 'none' (affine and instance "
                     "optimisation only)")
    reg.add_argument("--region", type=_region, default="auto",
                     help="conditional weights only: body region of the condition (brain, "
                     "head_neck, thorax, abdomen, pelvis, knee, other); auto: brain for MRI, "
                     "head_neck for CT. The pair type follows --mode (template: inter; "
                     "longitudinal: intra)")
    reg.add_argument("--smoothness", type=smoothness_argument, default=None, metavar="LAM",
                     help="conditional weights only: regularisation weight lam of the "
                     "condition (larger: smoother; default 1.5)")
    reg.add_argument("--io-iterations", type=_io_iterations, default=DEFAULT_IO_ITERATIONS,
                     metavar="N", help="instance-optimisation steps (0 or None: off)")
    reg.add_argument("--affine-init", choices=AFFINE_INIT, default="ours",
                     help="affine pre-alignment before the network")
    reg.add_argument("--compare", nargs="+", choices=COMPARE_METHODS, default=[],
                     metavar="METHOD",
                     help=f"also run these ANTs methods ({', '.join(COMPARE_METHODS)})")
    reg.add_argument("--device", type=_device, default="auto",
                     help="compute device of the network: auto, cpu, cuda, cuda:N")
    reg.add_argument("--mixed-precision", "--mixed_precision", dest="mixed_precision",
                     action="store_true",
                     help="run the network in bfloat16 autocast on a GPU (ignored on the CPU)")
    reg.add_argument("--network-passes", "--network_passes", dest="network_passes",
                     type=network_passes_argument, default=1, metavar="N",
                     help="apply the network N times, each pass to the moving image warped by "
                     "the ones before (default 1; see the README for what 2 measured)")
    reg.add_argument("--random-seed", type=_seed, default=0, metavar="SEED",
                     help="seed of Python, NumPy, PyTorch and ANTs")

    perf = parser.add_argument_group("performance and execution")
    perf.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                      help="Nipype work directory; reuse it to resume a run")
    perf.add_argument("--nprocs", "--nthreads", dest="nprocs", type=_positive_int,
                      default=None, help="maximum number of CPUs for all processes "
                      "(default: the CPUs available)")
    perf.add_argument("--omp-nthreads", type=_positive_int, default=None,
                      help="maximum threads per process (default: min(nprocs, 8))")
    perf.add_argument("--mem", "--mem-mb", "--mem_mb", dest="mem_gb", type=parse_memory_gb,
                      default=None, metavar="MEM",
                      help="memory limit for all processes; units K, M, G, T (bare number: "
                      "MB)")
    perf.add_argument("--plugin", default="MultiProc",
                      help="Nipype plugin: MultiProc, Linear, SLURM, SGE, PBS, LSF, ...")
    perf.add_argument("--plugin-args", type=_plugin_args, default=None, metavar="JSON",
                      help="plugin arguments as a JSON object or a JSON file, e.g. "
                      "'{\"sbatch_args\": \"--time=2:00:00\"}'")
    perf.add_argument("--stop-on-first-crash", action="store_true",
                      help="stop at the first node that fails (default: finish the others)")
    perf.add_argument("--reports-only", action="store_true",
                      help="only (re)write the reports from existing outputs")
    return parser


def _finalize(args: argparse.Namespace) -> argparse.Namespace:
    """Flatten label lists, fill CPU defaults, check option combinations."""
    for name in ("participant_label", "session_label"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, sorted({label for group in value for label in group}))
    if args.reference_session is not None:
        if len(args.reference_session) != 1:
            raise UsageError("--reference-session takes one session label")
        args.reference_session = args.reference_session[0]
        if args.mode != "longitudinal":
            raise UsageError("--reference-session applies to --mode longitudinal only")
    args.compare = list(dict.fromkeys(args.compare))
    if args.nprocs is None:
        from regpipe.device import available_cpus  # torch: not for --help

        args.nprocs = available_cpus()
    if args.omp_nthreads is None:
        args.omp_nthreads = min(args.nprocs, 8)
    # a batch plugin (SLURM, SGE, OAR...) runs each node in its own job: --nprocs (this
    # machine's CPUs by default, a login node's) bounds a node's threads only on this machine
    local = args.plugin.lower() in ("multiproc", "legacymultiproc", "linear", "debug")
    if args.omp_nthreads > args.nprocs and local:
        raise UsageError(
            f"--omp-nthreads {args.omp_nthreads} exceeds --nprocs {args.nprocs}"
        )
    if args.weights.lower() in ("none", "default"):
        args.weights = args.weights.lower()
    args.methods = [NETWORK_METHOD, *args.compare]
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; raises :class:`UsageError` on bad usage.

    The analysis level is returned as given (``main`` checks it and exits with 17).
    """
    return _finalize(build_parser().parse_args(argv))
