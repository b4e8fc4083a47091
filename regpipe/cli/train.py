"""``regpipe-train``: train a registration network (from scratch or from weights).

Data sources come from options or from a JSON recipe (``--recipe``), mixed by weight::

    regpipe-train runs/compact --recipe training/compact.json --data-root ../shared/data \\
        --budget 2h

Running the same command again continues the run in that folder (``checkpoint.pt``).
``--conditional film|dynamic`` trains a conditional network (region, pair type and lam steer
the flow heads) on top of the built or ``--init`` network; each step draws lam from
``--lam-range`` (default 0.3 6) and uses it as the GradICON weight.
A recipe is a JSON object whose keys are the long option names (``"steps"``, ``"lr"``,
``"grid"``...) plus ``"sources"``: a list of ``{"type": "label-maps" | "random-shapes" |
"images" | "pairs", "paths": [...], "weight": w, "region": ..., ...}``. Options given on the
command line override the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regpipe.cli._common import run_cli
from regpipe.errors import InputError

LOGGER = logging.getLogger("regpipe.train")

#: The configuration of the bundled compact model.
PRESETS: dict[str, dict[str, Any]] = {
    "compact": {"grid": [64, 64, 64], "unets": 2, "down_channels": [8, 16, 32, 64, 128],
                "up_channels": [8, 16, 32, 64, 64]},
    "unigradicon": {"grid": [175, 175, 175], "unets": 4, "down_channels": [16, 32, 64, 256, 512],
                    "up_channels": [16, 32, 64, 128, 256]},
}


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def parse_duration(text: str | float) -> float:
    """Seconds from ``"3600"``, ``"90m"``, ``"2h"``, ``"1h30m"`` or ``"45s"``."""
    if isinstance(text, (int, float)):
        return float(text)
    pattern = (r"\s*(?:(\d+(?:\.\d+)?)h)?"
               r"\s*(?:(\d+(?:\.\d+)?)m)?"
               r"\s*(?:(\d+(?:\.\d+)?)s?)?\s*")
    match = re.fullmatch(pattern, text)
    if not text.strip() or match is None or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"cannot read the duration {text!r} (try 90m, 2h, 3600)")
    if (match.group(1) or match.group(2)) and match.group(3) and not text.strip().endswith("s"):
        # "2h30" reads as 2 h 30 s to the pattern but means 2 h 30 min to most people
        raise argparse.ArgumentTypeError(f"the duration {text!r} is ambiguous: write its last "
                                         f"number's unit (2h30m, 1m30s)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Optimisation options shared by ``regpipe-train`` and ``regpipe-finetune``."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--steps", type=int, help="total steps of the run (default 1000)")
    group.add_argument("--batch-size", type=int, help="pairs per step (default 1)")
    group.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    group.add_argument("--lam", type=float, help="GradICON weight (default 1.5)")
    group.add_argument("--lam-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="draw the GradICON weight log-uniformly per step in this range "
                       "(default for a conditional network: 0.3 6)")
    group.add_argument("--similarity", choices=["lncc", "lncc2"], help="default lncc")
    group.add_argument("--lncc-sigma", type=float,
                       help="LNCC Gaussian window in grid voxels (default 5, uniGradICON's at "
                       "175^3)")
    group.add_argument("--dice-weight", type=float,
                       help="soft-Dice weight on labelled pairs (default 0)")
    group.add_argument("--dice-labels", type=int, metavar="N",
                       help="score N randomly drawn shared labels per step instead of all "
                       "(cheaper steps; default all)")
    group.add_argument("--seed", type=int, help="random seed (default 0)")
    group.add_argument("--device", help="auto, cpu or cuda (default auto)")
    group.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA")
    group.add_argument("--threads", type=int, help="CPU threads")
    group.add_argument("--workers", type=int,
                       help="threads drawing the next pairs while a step runs (default: "
                       "min(8, CPUs - 1) on a GPU, 0 on the CPU); the run is the same with any "
                       "number")
    group.add_argument("--checkpoint-every", type=int,
                       help="steps between checkpoints (default 100)")
    group.add_argument("--average-from", type=int, metavar="STEP",
                       help="weight averaging: keep the mean of the weights of every "
                       "--average-every-th step from STEP on, written as weights-avg.pt")
    group.add_argument("--average-every", type=int, metavar="N",
                       help="steps between the snapshots of the average (default 50)")
    group.add_argument("--budget", type=parse_duration,
                       help="stop cleanly after this wall-clock time (e.g. 90m, 2h); run again to "
                       "continue")
    group.add_argument("--trainable", choices=["all", "controller"],
                       help="all parameters (default) or only a conditional network's controller")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--name", help="model name for the card")
    group.add_argument("--description", help="one line for the model card")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe-train",
        description="Train a GradICON registration network on synthetic and/or real pairs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("output",
                        help="run folder (checkpoint.pt, weights.pt, weights.md, log.csv)")
    parser.add_argument("--recipe", help="JSON recipe (options and data sources)")
    parser.add_argument("--data-root", default=".", help="folder relative recipe paths start from")
    net = parser.add_argument_group("network")
    net.add_argument("--preset", choices=sorted(PRESETS), help="network shape (default compact)")
    net.add_argument("--init", help="start from these weights (a file or a registry name)")
    net.add_argument("--grid", type=_ints, help="network grid: N or N0,N1,N2")
    net.add_argument("--unets", type=int, help="number of U-Nets (1-4)")
    net.add_argument("--down-channels", type=_ints)
    net.add_argument("--up-channels", type=_ints)
    net.add_argument("--conditional", choices=["film", "dynamic"],
                     help="train a conditional network: a controller steers the flow heads by "
                     "region, pair type and lam (FiLM or generated head deltas)")
    data = parser.add_argument_group("data (mixed by weight)")
    data.add_argument("--label-maps", nargs="+", help="label-map files, folders or globs")
    data.add_argument("--label-maps-weight", type=float, default=1.0)
    data.add_argument("--region", default="brain", help="region of --label-maps/--images/--pairs")
    data.add_argument("--strip-labels-from", type=int,
                      help="labels >= this are non-brain: rendered as background half of the time")
    data.add_argument("--random-shapes-weight", type=float, default=0.0,
                      help="weight of random-shape label maps (used alone when no data is given)")
    data.add_argument("--images", nargs="+",
                      help="image files, folders or BIDS datasets (intra pairs)")
    data.add_argument("--images-weight", type=float, default=1.0)
    data.add_argument("--modality", default="mri", choices=["mri", "ct"])
    data.add_argument("--pairs", help="CSV of 'moving,fixed' paths (real inter-subject pairs)")
    data.add_argument("--pairs-weight", type=float, default=1.0)
    add_training_options(parser)
    return parser


def expand_paths(patterns: Sequence[str], root: Path) -> list[Path]:
    """Files from files, folders (their images) and glob patterns, relative to ``root``."""
    from regpipe.training_data import find_images

    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            found.extend(find_images(path))
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path)))
            if not matches:
                raise InputError(f"no file matches {pattern!r} (looked in {root})")
            found.extend(matches)
    return found


def build_source(specs: list[dict[str, Any]], shape: Sequence[int], root: Path,
                 grid_mode: str = "squash"):
    """A :class:`~regpipe.training_data.MixedSource` from recipe source entries."""
    from regpipe import training_data as td
    from regpipe.networks.condition import canonical_region
    from regpipe.synth import DeformationRange, IntensityRange

    ranges = {"deformation": DeformationRange, "placement": DeformationRange,
              "intensity": IntensityRange}
    if not isinstance(specs, list) or not all(isinstance(spec, dict) for spec in specs):
        raise InputError('recipe "sources" must be a list of objects, e.g. [{"type": '
                         '"random-shapes", "weight": 1}]')
    sources, weights = [], []
    for spec in specs:
        spec = dict(spec)
        if isinstance(spec.get("paths"), str):
            spec["paths"] = [spec["paths"]]  # one pattern
        kind = spec.pop("type", None)
        weight = float(spec.pop("weight", 1.0))
        if weight <= 0:
            continue
        region = canonical_region(spec.pop("region", "other" if kind == "random-shapes"
                                           else "brain"))  # an unknown one: InputError now
        for key, kind_of_range in ranges.items():
            if isinstance(spec.get(key), dict):
                values = dict(spec[key])
                if "warp_resolution" in values:
                    values["warp_resolution"] = tuple(values["warp_resolution"])
                try:
                    spec[key] = kind_of_range(**values)
                except TypeError as error:
                    raise InputError(
                        f"recipe source {kind!r}: bad {key} {values}: {error}"
                    ) from error
        try:
            source = _make_source(td, kind, spec, shape, root, grid_mode, region)
        except TypeError as error:  # an unknown or misspelt key of the source
            raise InputError(f"recipe source {kind!r}: {error}".replace(
                "__init__() ", "")) from None
        except KeyError as error:
            raise InputError(f"recipe source {kind!r} needs {error}") from None
        LOGGER.info("data source %s (%s), weight %g", source.name, region, weight)
        sources.append(source)
        weights.append(weight)
    return td.MixedSource(sources, weights)


def _make_source(td: Any, kind: Any, spec: dict[str, Any], shape: Sequence[int], root: Path,
                 grid_mode: str, region: str) -> Any:
    """One source of a recipe entry (``spec`` without its type, weight and region)."""
    if kind == "random-shapes":
        return td.RandomShapesSource(region=region, **spec)
    if kind == "label-maps":
        paths = expand_paths(spec.pop("paths"), root)
        strip = spec.pop("strip_labels_from", None)
        background = range(int(strip), 100000) if strip is not None else ()
        return td.LabelMapSource(paths, shape, region=region, background_labels=background,
                                 **spec)
    if kind == "images":
        return td.ImageSource(expand_paths(spec.pop("paths"), root), shape, region=region,
                              **spec)
    if kind == "pairs":
        spec.setdefault("grid_mode", grid_mode)
        pair_paths = _read_pairs(Path(spec.pop("csv")), root)
        return td.ImagePairSource(pair_paths, shape, region=region, **spec)
    raise InputError(f"unknown source type {kind!r} (label-maps, random-shapes, images, pairs)")


def _read_pairs(path: Path, root: Path) -> list[tuple[Path, Path]]:
    import csv

    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise InputError(f"pair list {path} does not exist")
    pairs = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if not row or row[0].startswith("#") or row[0] == "moving":
                continue
            if len(row) < 2:
                raise InputError(f"{path}: each row needs 'moving,fixed', got {row}")
            pairs.append(tuple(
                (root / p.strip()) if not Path(p.strip()).is_absolute() else Path(p.strip())
                for p in row[:2]
            ))
    return pairs  # type: ignore[return-value]


def _sources_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    if args.label_maps:
        specs.append({"type": "label-maps", "paths": args.label_maps,
                      "weight": args.label_maps_weight, "region": args.region,
                      "strip_labels_from": args.strip_labels_from})
    if args.images:
        specs.append({"type": "images", "paths": args.images, "weight": args.images_weight,
                      "region": args.region, "modality": args.modality})
    if args.pairs:
        specs.append({"type": "pairs", "csv": args.pairs, "weight": args.pairs_weight,
                      "region": args.region, "modality": args.modality})
    if args.random_shapes_weight > 0:
        specs.append({"type": "random-shapes", "weight": args.random_shapes_weight})
    return specs


def merged_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe values overridden by the options given on the command line."""
    settings: dict[str, Any] = {}
    if args.recipe:
        try:
            settings = json.loads(Path(args.recipe).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"cannot read the recipe {args.recipe}: {error}") from error
        check_recipe(settings, args.recipe)
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("recipe", "output")}
    for key in ("no_amp", "no_progress"):
        if not given.get(key):
            given.pop(key, None)
    sources = _sources_from_args(args)
    if sources:
        settings["sources"] = sources
    for key, value in given.items():
        if (key.endswith("_weight") and key != "dice_weight") or key in (
            "label_maps", "images", "pairs", "region", "modality", "strip_labels_from"
        ):
            continue
        if key == "data_root" and value == "." and "data_root" in settings:
            continue
        settings[key] = value
    if not settings.get("sources"):
        settings["sources"] = [{"type": "random-shapes", "weight": 1.0}]
    return settings


#: Recipe keys that are not command-line options.
_RECIPE_ONLY = ("sources", "grid_mode", "held_out")
#: Types of recipe values (a JSON integer also passes for a number).
_RECIPE_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("steps", "batch_size", "seed", "checkpoint_every", "average_from",
                     "average_every", "unets", "workers", "threads", "dice_labels"), (int,)),
    **dict.fromkeys(("lr", "lam", "dice_weight", "lncc_sigma"), (int, float)),
    **dict.fromkeys(("name", "description", "preset", "similarity", "init", "data_root",
                     "device", "trainable", "conditional", "grid_mode"), (str,)),
    "grid": (list, int),
    **dict.fromkeys(("down_channels", "up_channels", "lam_range"), (list,)),
    **dict.fromkeys(("no_amp", "no_progress"), (bool,)),
    "budget": (str, int, float),
    "sources": (list,),
}


def _check_recipe_items(recipe: dict[str, Any], path: Any) -> None:
    """Element types of list values and source weights (one line each, not a traceback)."""
    for key in ("grid", "down_channels", "up_channels"):
        value = recipe.get(key)
        if isinstance(value, list) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise InputError(f"{path}: {key} must be a list of integers, not {value!r}")
    lam_range = recipe.get("lam_range")
    if lam_range is not None and not (
            len(lam_range) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in lam_range)):
        raise InputError(f"{path}: lam_range must be [low, high], not {lam_range!r}")
    if recipe.get("sources") == []:
        raise InputError(f"{path}: sources is empty; name at least one data source (or leave "
                         "the key out for random shapes only)")
    for number, source in enumerate(recipe.get("sources") or [], 1):
        weight = source.get("weight", 1.0) if isinstance(source, dict) else 1.0
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InputError(f"{path}: source {number}: weight must be a number, not {weight!r}")
        if isinstance(source, dict):
            problem = _source_value_problem(source)
            if problem:
                raise InputError(f"{path}: source {number}: {problem}")


#: Scalar options of recipe sources and what they must be.
_SOURCE_FLAGS = ("align",)
_SOURCE_PROBABILITIES = ("inter_probability", "same_contrast_probability", "strip_probability")


def _source_value_problem(source: dict[str, Any]) -> str | None:
    """What is wrong with a source's scalar options (``"align": "false"`` would be true)."""
    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    for key in _SOURCE_FLAGS:
        if key in source and not isinstance(source[key], bool):
            return f"{key} must be true or false, not {source[key]!r}"
    for key in _SOURCE_PROBABILITIES:
        if key in source and not (number(source[key]) and 0 <= source[key] <= 1):
            return f"{key} must be a number from 0 to 1, not {source[key]!r}"
    value = source.get("strip_labels_from")
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"strip_labels_from must be an integer label, not {value!r}"
    value = source.get("labels_range")
    if value is not None and not (isinstance(value, list) and len(value) == 2
                                  and all(number(v) for v in value)):
        return f"labels_range must be [low, high], not {value!r}"
    return None


def check_recipe(recipe: Any, path: Any = "recipe") -> None:
    """Refuse a recipe with unknown keys or values of the wrong type, naming them (a typo such
    as ``"step"`` would otherwise be ignored and the default used)."""
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: a recipe is a JSON object {{...}}, not {type(recipe).__name__}")
    known = {a.dest for a in build_parser()._actions} | set(_RECIPE_ONLY)
    unknown = sorted(set(recipe) - known - {"help", "output", "recipe"})
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(known - {'help', 'output', 'recipe'}))})")
    for key, value in recipe.items():
        types = _RECIPE_TYPES.get(key)
        if value is None or types is None:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise InputError(f"{path}: {key} must be {names}, not {value!r}")
    _check_recipe_items(recipe, path)
    if "budget" in recipe:
        try:
            parse_duration(recipe["budget"])
        except argparse.ArgumentTypeError as error:
            raise InputError(f"{path}: budget: {error}") from None


#: lam range of a conditional run when none is given.
DEFAULT_CONDITIONAL_LAM_RANGE = (0.3, 6.0)


def build_network_from(settings: dict[str, Any]):
    """The network to train: ``init`` weights (resized to ``grid`` if given) or a preset.

    With ``settings["conditional"]`` (``"film"`` or ``"dynamic"``) the result is a
    :class:`~regpipe.networks.ConditionalRegistrationNetwork` around that network (its
    controller neutral, so it starts as the ``init`` network); a conditional ``init`` file
    stays conditional (and must have the same mode). A conditional network without
    ``lam_range`` gets :data:`DEFAULT_CONDITIONAL_LAM_RANGE` (written into ``settings``).
    """
    from regpipe.networks import (
        ConditionalRegistrationNetwork,
        ConditioningConfig,
        NetworkConfig,
        RegistrationNetwork,
        build_network,
        load_weights,
    )
    from regpipe.networks.checkpoint import infer_config, read_checkpoint

    preset = dict(PRESETS[settings.get("preset", "compact")])
    init = settings.get("init")
    checkpoint = None
    if init:
        from regpipe.weights import resolve_weights

        checkpoint = read_checkpoint(resolve_weights(init))
        config = checkpoint.config or infer_config(checkpoint.state_dict)
        preset = {"grid": list(config.grid_shape), "unets": config.n_steps,
                  "down_channels": list(config.down_channels),
                  "up_channels": list(config.up_channels)}
    for key in ("grid", "unets", "down_channels", "up_channels"):
        if settings.get(key) is not None:
            preset[key] = settings[key]
    grid = [preset["grid"]] if isinstance(preset["grid"], int) else list(preset["grid"])
    grid = grid * 3 if len(grid) == 1 else grid
    if len(grid) != 3:
        raise InputError(f"grid must be one size or three, got {preset['grid']!r}")
    config = NetworkConfig((int(grid[0]), int(grid[1]), int(grid[2])), int(preset["unets"]),
                           tuple(preset["down_channels"]), tuple(preset["up_channels"]))
    mode = settings.get("conditional")
    lam_range = settings.get("lam_range")
    hidden = ConditioningConfig().hidden
    if checkpoint is not None and checkpoint.conditioning is not None:
        if mode and mode != checkpoint.conditioning.mode:
            raise InputError(f"--init {init} is a {checkpoint.conditioning.mode} conditional "
                             f"network, not {mode}")
        mode, hidden = checkpoint.conditioning.mode, checkpoint.conditioning.hidden
        if lam_range is None and checkpoint.conditioning.lam_range is not None:
            # continue on the range the file was trained on unless --lam-range says otherwise
            lam_range = settings["lam_range"] = list(checkpoint.conditioning.lam_range)
            LOGGER.info("conditional network: lam drawn in %s, as --init was trained",
                        tuple(lam_range))
    if mode and lam_range is None:
        lam_range = settings["lam_range"] = list(DEFAULT_CONDITIONAL_LAM_RANGE)
        LOGGER.info("conditional network: lam drawn in %s", DEFAULT_CONDITIONAL_LAM_RANGE)
    if not mode:
        _check_unconditional(settings)
    elif settings.get("lam") is not None:
        raise InputError("--lam sets the GradICON weight of an unconditional network; a "
                         "conditional network draws it from --lam-range at every step")
    network: RegistrationNetwork
    if mode:
        conditioning = ConditioningConfig(mode, hidden=hidden,
                                          lam_range=tuple(lam_range) if lam_range else None)
        network = ConditionalRegistrationNetwork(config, conditioning)
    else:
        network = build_network(config)
    if checkpoint is not None:
        load_weights(network, checkpoint)
    return network, checkpoint


def _check_unconditional(settings: dict[str, Any]) -> None:
    """Options that only mean something for a conditional network are refused without one."""
    if settings.get("lam_range") is not None:
        raise InputError("--lam-range draws lam for a conditional network; add --conditional "
                         "film (or --init a conditional file), or give one --lam")
    if settings.get("trainable") == "controller":
        raise InputError("--trainable controller needs a conditional network (--conditional "
                         "film, or --init a conditional file)")


def options_from(settings: dict[str, Any]):
    from regpipe.training import TrainingOptions

    fields = {"steps", "batch_size", "lr", "lam", "lam_range", "similarity", "lncc_sigma",
              "dice_weight", "dice_labels", "seed", "device", "checkpoint_every", "trainable",
              "workers", "average_from", "average_every"}
    values = {k: settings[k] for k in fields if settings.get(k) is not None}
    if settings.get("lam_range") is not None:
        values["lam_range"] = tuple(settings["lam_range"])
    if settings.get("budget") is not None:
        values["budget_seconds"] = parse_duration(settings["budget"])
    values["amp"] = not settings.get("no_amp", False)
    values["progress"] = not settings.get("no_progress", False) and sys.stderr.isatty()
    return TrainingOptions(**values)


#: Sources whose images are placed on the grid RAS-reoriented (``squash-ras``).
_RAS_SOURCES = ("label-maps", "images")


def training_grid_mode(settings: Mapping[str, Any], checkpoint: Any = None) -> str:
    """The grid placement the weights will be used with (written into their card).

    Label-map and image sources place their data RAS-reoriented, so the weights are
    ``squash-ras`` ones; otherwise the recipe's ``grid_mode``, else the ``--init`` card's, else
    ``squash`` (uniGradICON's). A recipe ``grid_mode`` the sources contradict is refused.
    """
    from regpipe.spaces import GRID_MODES

    asked = settings.get("grid_mode")
    if asked is not None and asked not in GRID_MODES:
        raise InputError(f"recipe grid_mode must be one of {', '.join(GRID_MODES)}, got "
                         f"{asked!r}")
    ras = [spec.get("type") for spec in settings.get("sources", [])
           if spec.get("type") in _RAS_SOURCES and float(spec.get("weight", 1.0)) > 0]
    if ras:
        if asked not in (None, "squash-ras"):
            raise InputError(f"grid_mode {asked!r} does not match the {ras[0]} source, whose "
                             f"images are placed RAS-reoriented: use squash-ras")
        return "squash-ras"
    if asked is not None:
        return str(asked)
    card = getattr(checkpoint, "card", None) or {}
    return str(card.get("grid_mode") or "squash")


def _resumed_start(settings: dict[str, Any], output: Path) -> dict[str, Any]:
    """The settings to build the network from. ``--init`` is recorded with its SHA-256 (so a
    resumed run may name the same file another way). A run resumed without ``--init`` or
    ``--conditional`` keeps those it started with: its record is copied into ``settings``, and
    a network started from a file is built from the run's own ``weights.pt`` (same
    architecture and grid placement; the checkpoint's weights replace it anyway), so that file
    need not still be where it was."""
    from regpipe.networks.checkpoint import read_checkpoint
    from regpipe.weights import resolve_weights, sha256sum

    if settings.get("init"):
        settings["init_sha256"] = sha256sum(resolve_weights(settings["init"]))
    weights = output / "weights.pt"
    if not ((output / "checkpoint.pt").is_file() and weights.is_file()):
        return settings
    recipe = ((read_checkpoint(weights).card or {}).get("training") or {}).get("recipe") or {}
    if recipe.get("conditional") and not settings.get("conditional"):
        settings["conditional"] = recipe["conditional"]
    if settings.get("init") or not recipe.get("init"):
        return settings
    settings["init"], settings["init_sha256"] = recipe["init"], recipe.get("init_sha256")
    LOGGER.info("resuming the run started from --init %s", recipe["init"])
    return {**settings, "init": str(weights)}


def run_training(settings: dict[str, Any], output: Path, card: dict[str, Any]) -> int:
    from regpipe.device import set_threads
    from regpipe.training import train

    started = time.monotonic()
    if settings.get("threads"):
        set_threads(int(settings["threads"]))
    import torch

    from regpipe.device import select_device

    select_device(settings.get("device") or "auto")  # no CUDA: fail before any work
    torch.manual_seed(int(settings.get("seed") or 0))  # --seed also sets the initial weights
    root = Path(settings.get("data_root", ".")).expanduser().resolve()
    settings["data_root"] = str(root)  # a resumed run from another folder finds the same data
    start = _resumed_start(settings, output)
    network, checkpoint = build_network_from(start)
    settings.update({k: v for k, v in start.items() if k != "init"})  # lam_range it filled in
    grid_mode = training_grid_mode(settings, checkpoint)
    source = build_source(settings["sources"], network.config.grid_shape, root, grid_mode)
    options = options_from(settings)
    if options.budget_seconds is not None:  # reading the data counts, as in regpipe-finetune
        spent = time.monotonic() - started
        LOGGER.info("%.0f s of --budget spent on reading the data sources", spent)
        options = dataclasses.replace(options,
                                      budget_seconds=max(options.budget_seconds - spent, 0.0))
    card = {"name": settings.get("name") or output.name, **card}
    if settings.get("description"):
        card["description"] = settings["description"]
    card.setdefault("training", {})["recipe"] = {
        k: v for k, v in settings.items()
        if k not in ("no_progress", "threads", "device", "workers")
    }
    card["grid_mode"] = grid_mode
    conditioning = getattr(network, "conditioning", None)
    if conditioning is not None:
        card["conditioning"] = {
            **conditioning.to_dict(),
            "vector": "one-hot region (7), one-hot pair type (2), log(lam / 1.5) / log(10)",
            "training": "region and pair type of each pair; lam drawn per step, also the "
                        "GradICON weight of that step",
        }
    state = train(network, source, output, options, card)
    LOGGER.info("stopped after step %d (%s), %.1f h in all; weights: %s", state.step,
                state.stopped_by, state.elapsed_seconds / 3600, output / "weights.pt")
    print(json.dumps(state.summary()))
    return 130 if state.stopped_by == "signal" else 0  # like regpipe-finetune: not "done"


def _main(args: argparse.Namespace) -> int:
    settings = merged_settings(args)
    return run_training(settings, Path(args.output), {})


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
