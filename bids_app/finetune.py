"""``regpipe-finetune BIDS_DIR OUTPUT_DIR --weights W``: finetune a network on a BIDS dataset.

::

    regpipe-finetune /data/bids /models/mydata --weights unigradicon --pairs both \\
        --labels /data/bids/derivatives/synthseg --dice-weight 0.5 --steps 2000 --budget 2h
    regpipe /data/bids /data/out participant --weights /models/mydata/weights.pt

Order of work, so that foreseeable failures come before any training:

1. parse the command line (64); check that ``OUTPUT_DIR`` is not inside ``BIDS_DIR`` unless
   under ``derivatives/`` (64);
2. index ``BIDS_DIR`` with pybids and select the images of ``--suffix`` with the BIDS App's
   filters (16 invalid dataset, 66 no image, 18 filters selected nothing);
3. form the pairs (66 when none is possible, with the reason): ``inter`` every ordered pair of
   images of two different subjects, ``intra`` every ordered pair of images of one subject in
   two different sessions, ``both`` the two kinds drawn 50/50 (only the available kind when one
   has no pair);
4. with ``--labels DERIV_DIR``, find each image's brain mask (``*_desc-brain_mask``) and,
   with ``--dice-weight > 0``, its label map (``*_dseg``) for a soft-Dice term (the BIDS
   App's rules; 64 / 66 when no label map can be used);
5. load the starting network offline (66 when its file is missing): ``default``, a registry
   name or a file; the finetuned network keeps its configuration and the ``grid_mode`` of its
   model card; a checkpoint already in ``OUTPUT_DIR`` must come from the same network and
   starting weights (64 otherwise), and is resumed;
6. train with :func:`regpipe.training.train` (GradICON objective, pairs placed on the grid the
   way registration places them, affinely pre-aligned unless ``--affine-init none``) and
   write ``OUTPUT_DIR/weights.pt``, ``weights.md`` (model card), ``checkpoint.pt`` and
   ``log.csv``; print how to use the weights with the BIDS App. Images are prepared as the App
   prepares them: N4 bias correction of MRI (inside the brain mask; ``--no-n4`` skips it,
   the results are kept in ``OUTPUT_DIR/preprocessed/`` for the next run), zero outside the
   brain mask, the App's intensity normalisation.

Running the same command again continues the run (up to ``--steps`` in all); ``--budget``
stops cleanly (exit 0) and a signal stops after the current step (exit 130), both with a
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regpipe.bids_app.exit_codes import AppError, ExitCode, UsageError

from regpipe.errors import RegpipeError, WeightsError

__all__ = ["PAIR_KINDS", "build_parser", "form_pairs", "main", "run_finetune"]

LOGGER = logging.getLogger("regpipe.finetune")
PAIR_KINDS = ("inter", "intra", "both")

EXAMPLE = """example:
  regpipe-finetune /data/bids /models/mydata --weights unigradicon --pairs both \\
      --labels /data/bids/derivatives/synthseg --dice-weight 0.5 --steps 2000 --budget 2h
  regpipe /data/bids /data/out participant --weights /models/mydata/weights.pt

Running the same command again continues the run in OUTPUT_DIR."""

Pair = tuple[Any, Any]  # (moving, fixed) :class:`regpipe.bids_app.bids.Image`


def build_parser() -> argparse.ArgumentParser:
    """The command line (usage errors raise :class:`UsageError`, exit 64)."""
    from regpipe.bids_app.parser import _filter_file, _labels_from, _Parser, _region, _suffix

    from regpipe.cli.train import add_training_options
    from regpipe.training_data import REGIONS

    parser = _Parser(
        prog="regpipe-finetune",
        description="Finetune a registration network on the images of a BIDS dataset; "
        "writes OUTPUT_DIR/weights.pt for `regpipe ... --weights`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (never written to)")
    parser.add_argument("output_dir", type=Path,
                        help="run folder: weights.pt, weights.md, checkpoint.pt, log.csv")
    parser.add_argument("--weights", required=True,
                        help="starting weights: 'default', a registry name (unigradicon, "
                        "multigradicon) or a file")
    parser.add_argument("--pairs", choices=PAIR_KINDS, default="inter",
                        help="inter: pairs of different subjects; intra: sessions of one "
                        "subject; both: 50/50 (default inter)")
    parser.add_argument("--participant-label", "--participant_label", dest="participant_label",
                        nargs="+", type=_labels_from("sub-"), metavar="LABEL")
    parser.add_argument("--session-label", "--session_label", dest="session_label",
                        nargs="+", type=_labels_from("ses-"), metavar="LABEL")
    parser.add_argument("--suffix", type=_suffix, default="T1w", help="default T1w")
    parser.add_argument("--labels", type=Path, metavar="DERIV_DIR",
                        help="derivative dataset with label maps (*_dseg, for --dice-weight) "
                        "and brain masks (*_desc-brain_mask), as for the BIDS App")
    parser.add_argument("--no-masks", dest="use_masks", action="store_false",
                        help="do not zero the images outside the brain masks of --labels")
    parser.add_argument("--no-n4", dest="bias_correct", action="store_false",
                        help="skip the N4 bias correction of MRI images that the BIDS App "
                        "applies before registration (for images already bias-corrected)")
    parser.add_argument("--bids-filter-file", dest="bids_filters", type=_filter_file,
                        metavar="FILE")
    parser.add_argument("--skip-bids-validation", "--skip_bids_validation",
                        dest="skip_bids_validation", action="store_true")
    parser.add_argument("--affine-init", choices=["ours", "none"], default="ours",
                        help="affine pre-alignment of each pair, as in registration "
                        "(default ours)")
    parser.add_argument("--region", type=_region, default="auto",
                        help="body region of the pairs (a conditional network's condition: "
                        f"{', '.join(REGIONS)} or an alias such as lung); auto (default) is "
                        "what the BIDS App uses, brain for MRI, head_neck for CT")
    add_training_options(parser)
    what = {"lam": "GradICON weight", "lam_range": "per-step lam range of a conditional network",
            "similarity": "similarity (lncc or lncc2)", "lncc_sigma": "LNCC window in grid voxels"}
    for action in parser._actions:  # INHERITED_OPTIONS: not regpipe-train's fixed defaults
        if action.dest in what:
            action.help = (f"{what[action.dest]} (default: what the starting weights were "
                           "trained with, from their model card, else regpipe-train's)")
    return parser


# --------------------------------------------------------------------------- pairs


def _sessions(images: Sequence[Any]) -> dict[str, set[str | None]]:
    found: dict[str, set[str | None]] = {}
    for image in images:
        found.setdefault(image.subject, set()).add(image.session)
    return found


def inter_pairs(images: Sequence[Any]) -> list[Pair]:
    """Every ordered pair ``(moving, fixed)`` of images of two different subjects."""
    return [(a, b) for a in images for b in images if a.subject != b.subject]


def intra_pairs(images: Sequence[Any]) -> list[Pair]:
    """Every ordered pair of one subject's images from two different sessions."""
    return [(a, b) for a in images for b in images
            if a.subject == b.subject and a.session is not None and b.session is not None
            and a.session != b.session]


def _why_no_inter(images: Sequence[Any]) -> str:
    subjects = sorted(_sessions(images))
    return (f"inter-subject pairs need images of two or more subjects, and the selection has "
            f"{len(images)} image(s) of sub-{subjects[0]} only")


def _why_no_intra(images: Sequence[Any]) -> str:
    counts = []
    for subject, sessions in sorted(_sessions(images).items()):
        named = sorted(s for s in sessions if s is not None)
        counts.append(f"sub-{subject}: " + (f"{len(named)} session(s)" if named else "no session"))
    shown = "; ".join(counts[:8]) + (f"; and {len(counts) - 8} more" if len(counts) > 8 else "")
    return ("intra-subject pairs need a subject with images in two or more sessions, and none "
            f"of the selected subjects has that ({shown})")


def form_pairs(images: Sequence[Any], kind: str) -> dict[str, list[Pair]]:
    """``{"inter": [...], "intra": [...]}`` for ``kind``; :class:`AppError` 66 when empty.

    ``both`` keeps whichever kinds have pairs (a log line names a missing kind).
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"unknown pair kind {kind!r}")
    found: dict[str, list[Pair]] = {}
    reasons = []
    for name, pairs_of, why in (("inter", inter_pairs, _why_no_inter),
                                ("intra", intra_pairs, _why_no_intra)):
        if kind not in (name, "both"):
            continue
        pairs = pairs_of(images)
        if pairs:
            found[name] = pairs
        else:
            reasons.append(why(images))
    if not found:
        hint = ""
        if kind == "inter" and intra_pairs(images):
            hint = " (--pairs intra would give pairs)"
        elif kind == "intra" and inter_pairs(images):
            hint = " (--pairs inter would give pairs)"
        raise AppError(ExitCode.NO_INPUT, "no training pairs: " + "; ".join(reasons) + hint)
    for reason in reasons:
        LOGGER.warning("--pairs both: %s; using %s pairs only", reason, ", ".join(found))
    return found


# --------------------------------------------------------------------------- labels, network


def find_label_maps(labels_dir: Path, images: Sequence[Any], kind: str = "dseg"
                    ) -> dict[Path, Path]:
    """``{image path: file}`` for the images with a label map (``kind="dseg"``) or a brain
    mask (``kind="mask"``) in ``labels_dir``, found by the BIDS App's rules."""
    from regpipe.bids_app import bids

    layout = bids.load_derivatives(labels_dir)
    finder = bids.find_labels if kind == "dseg" else bids.find_mask
    found = {}
    for image in images:
        path = finder(layout, image)
        if path is not None:
            found[image.path] = path
    LOGGER.info("%s: %d of %d image(s) in %s", "label maps" if kind == "dseg" else "brain masks",
                len(found), len(images), labels_dir)
    return found


def load_starting_network(weights: str):
    """``(network, file, sha256, name)`` of ``--weights``, offline (WeightsError if missing)."""
    from regpipe.networks import network_from_file
    from regpipe.weights import default_weights_name, resolve_weights, sha256sum

    name = default_weights_name() if weights == "default" else weights
    path = resolve_weights(name)
    network = network_from_file(path)
    return network, Path(path).absolute(), sha256sum(path), name


def check_resumable(folder: Path, network, sha256: str,
                    selection: dict[str, Any] | None = None) -> bool:
    """``True`` when ``folder`` holds a checkpoint to resume; 64 when it is another run's
    (another network, other starting weights, or another ``selection``: the card's
    ``finetuning`` entries a resumed run must keep), before any image is prepared."""
    import torch

    from regpipe.run_folder import CHECKPOINT

    path = folder / CHECKPOINT
    if not path.exists():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file gets the same advice
        raise UsageError(f"{path} cannot be read ({type(error).__name__}); remove it to start "
                         "again or use another OUTPUT_DIR") from None
    from regpipe.networks.checkpoint import saved_config

    card = saved.get("card") or {}
    if "finetuning" not in card:  # a regpipe-train run folder, say: never taken over
        raise UsageError(f"{folder} holds a run that is not a finetuning run; use another "
                         "OUTPUT_DIR")
    config = saved_config(network)  # with the controller's, for a conditional network
    (was, saved_rest), (now, rest) = (_split_lam_range(c) for c in (saved.get("config"),
                                                                     config))
    if was != now and saved_rest == rest:
        raise UsageError(f"{folder} holds a finetuning run with --lam-range {was} (this "
                         f"command: {now}); continue it with the same --lam-range or use "
                         "another OUTPUT_DIR")
    if saved.get("config") != config:
        raise UsageError(
            f"{folder} holds a finetuning run of another network configuration "
            f"({_describe(saved.get('config'))}), while --weights gives {_describe(config)}; "
            "use another OUTPUT_DIR, or the same --weights to continue that run")
    started = (saved.get("card") or {}).get("finetuning", {}).get("starting_weights_sha256")
    if started is not None and started != sha256:
        raise UsageError(
            f"{folder} holds a finetuning run started from other weights (sha256 "
            f"{started[:12]}..., --weights has {sha256[:12]}...); use another OUTPUT_DIR, "
            "or the same --weights to continue that run")
    from regpipe.run_folder import finetuning_changes

    changes = finetuning_changes(card.get("finetuning") or {}, selection or {})
    if changes:
        raise UsageError(f"{folder} holds a finetuning run with other settings "
                         f"({'; '.join(changes)}); continue it with the same ones or use "
                         "another OUTPUT_DIR")
    return True


def _split_lam_range(config: Any) -> tuple[str, Any]:
    """``("LOW HIGH", the rest of config)`` of a saved network configuration."""
    if not isinstance(config, dict) or not isinstance(config.get("conditional"), dict):
        return "none", config
    conditional = dict(config["conditional"])
    range_ = conditional.pop("lam_range", None)
    text = " ".join(f"{float(v):g}" for v in range_) if range_ else "none"
    return text, {**config, "conditional": conditional}


def _describe(config: Any) -> str:
    if not isinstance(config, dict):
        return "unknown"
    return (f"grid {config.get('grid_shape')}, {config.get('n_steps')} U-Net(s), channels "
            f"{config.get('down_channels')}/{config.get('up_channels')}")


# --------------------------------------------------------------------------- run


def _dataset_name(bids_dir: Path) -> str:
    try:
        description = json.loads((bids_dir / "dataset_description.json").read_text())
        return str(description.get("Name") or bids_dir.name)
    except (OSError, ValueError, AttributeError):
        return bids_dir.name


def build_source(pairs: dict[str, list[Pair]], shape: Sequence[int], *, labels: dict[Path, Path],
                 modality: str, region: str, grid_mode: str, affine: str,
                 preparation: Any = None):
    """One :class:`~regpipe.training_data.ImagePairSource` per pair kind, mixed 50/50
    (``preparation``: :class:`regpipe.image_pairs.Preparation`, shared)."""
    from regpipe.training_data import ImagePairSource, MixedSource

    sources = []
    prepared: dict[Path, Any] = {}  # each image is read and prepared once for both kinds
    for kind, kind_pairs in pairs.items():
        paths = [(m.path, f.path) for m, f in kind_pairs]
        sources.append(ImagePairSource(paths, shape, region=region, modality=modality,
                                       labels=labels, pair_type=kind, grid_mode=grid_mode,
                                       affine=affine, name=f"bids-{kind}",
                                       preparation=preparation, image_cache=prepared))
    return sources[0] if len(sources) == 1 else MixedSource(sources, [1.0] * len(sources))


def selection_record(args: argparse.Namespace, masked: int) -> dict[str, Any]:
    """The card's ``finetuning`` entries that fix what a run trains on
    (:data:`regpipe.run_folder.FIXED_FINETUNING`)."""
    return {
        "dataset_path": str(args.bids_dir),
        "suffix": args.suffix,
        "pair_type": args.pairs,
        "participant_label": args.participant_label,
        "session_label": args.session_label,
        "bids_filters": args.bids_filters,
        "labels": str(args.labels) if args.labels else None,
        "affine_init": args.affine_init,
        "region": args.region,
        "preprocessing": {"bias_correct": bool(args.bias_correct and args.suffix != "CT"),
                          "masked_images": masked},
    }


def app_options(args: argparse.Namespace, weights: Path) -> str:
    """The BIDS App options that register with these weights as they were finetuned: with
    ``--region`` when the App's ``--region auto`` would condition on another region."""
    from regpipe.workflows.jobs import AUTO_REGIONS

    options = f"--weights {weights}"
    auto = AUTO_REGIONS["ct" if args.suffix == "CT" else "mri"]
    if args.region not in ("auto", auto):
        options += f" --region {args.region}"
    return options


def model_card(args: argparse.Namespace, *, start: dict[str, Any], dataset: str,
               pairs: dict[str, list[Pair]], labelled: int, grid_mode: str,
               masked: int = 0) -> dict[str, Any]:
    """The card saved with the weights (the training record is added by ``train``)."""
    images = {i.path for kind in pairs.values() for pair in kind for i in pair}
    subjects = {i.subject for kind in pairs.values() for pair in kind for i in pair}
    slug = "".join(c if c.isalnum() else "-" for c in dataset).strip("-").lower() or "bids"
    weights = Path(args.output_dir) / "weights.pt"
    # what stays true of the finetuned weights (architecture, placement, licence...); the
    # starting file's own history (training, averaging, its card file) is kept under
    # finetuning.starting_card, not presented as this file's
    history = ("name", "description", "training", "finetuning", "usage", "averaged_from",
               "model_card")
    base = {k: v for k, v in start["card"].items() if k not in history}
    suffix = f"-finetuned-{slug}"
    name = start["name"] if str(start["name"]).endswith(suffix) else f"{start['name']}{suffix}"
    return {
        **base,
        "name": args.name or name,
        "description": args.description or (
            f"{start['name']} finetuned on {dataset} ({args.suffix}, {args.pairs} pairs)"),
        "grid_mode": grid_mode,
        "region": args.region,
        "usage": f"regpipe BIDS_DIR OUT participant {app_options(args, weights)}",
        "finetuning": {
            "starting_weights": start["name"],
            "starting_weights_file": str(start["file"]),
            "starting_weights_sha256": start["sha256"],
            "dataset": dataset,
            "subjects": len(subjects),
            "images": len(images),
            "pairs_inter": len(pairs.get("inter", [])),
            "pairs_intra": len(pairs.get("intra", [])),
            "labelled_pairs": labelled,
            **selection_record(args, masked),
            "starting_card": {k: v for k, v in start["card"].items() if k != "usage"},
        },
    }


def _check_output(args: argparse.Namespace) -> None:
    bids_dir, output = args.bids_dir.resolve(), args.output_dir.resolve()
    weights = Path(str(args.weights)).expanduser()
    if weights.exists() and output in weights.resolve().parents:
        raise UsageError(f"--weights {args.weights} is inside OUTPUT_DIR {args.output_dir}, "
                         "where this run writes weights.pt: copy it elsewhere first")
    derivatives = bids_dir / "derivatives"
    if (output == bids_dir or bids_dir in output.parents) and derivatives not in output.parents:
        raise UsageError(f"OUTPUT_DIR {args.output_dir} is inside BIDS_DIR {args.bids_dir}, "
                         f"which is never written to; use a folder outside it or under "
                         f"{derivatives}/")


def _normalise_args(args: argparse.Namespace) -> argparse.Namespace:
    for name in ("participant_label", "session_label"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, sorted({label for group in value for label in group}))
    for name in ("bids_dir", "output_dir", "labels"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, value.expanduser().absolute())
    if args.weights.lower() == "default":
        args.weights = "default"
    if args.dice_weight and args.labels is None:
        raise UsageError("--dice-weight needs label maps: give --labels DERIV_DIR")
    # training settings and the device are checked before the dataset is indexed or any
    # folder is made
    from regpipe.cli.train import options_from
    from regpipe.device import select_device
    from regpipe.errors import InputError, ResourceError

    try:
        options_from(vars(args))
        if (args.device or "auto") != "auto":
            select_device(args.device)
    except (InputError, ResourceError) as error:
        raise UsageError(str(error)) from None
    return args


#: Loss settings a finetune takes from the starting weights' own training when not given: the
#: objective the network was trained with (the bundled model's LNCC window is 2 grid voxels,
#: not uniGradICON's 5; a conditional network's lam range).
INHERITED_OPTIONS = ("similarity", "lncc_sigma", "lam", "lam_range")


def check_condition_options(args: argparse.Namespace, network: Any) -> None:
    """Refuse (64) what ``regpipe-train`` and the BIDS App refuse: ``--lam-range``,
    ``--region`` and ``--trainable controller`` without a conditional network, ``--lam`` with
    one (it draws lam per step from ``--lam-range``); before any image is prepared."""
    conditional = getattr(network, "conditioning", None) is not None
    what = f"--weights {args.weights} is not a conditional network"
    if not conditional:
        if args.lam_range is not None:
            raise UsageError(f"--lam-range draws lam for a conditional network; {what} (give "
                             "one --lam)")
        if args.region != "auto":
            raise UsageError(f"--region is the condition of a conditional network; {what}")
        if args.trainable == "controller":
            raise UsageError(f"--trainable controller trains a conditional network's "
                             f"controller; {what}")
    elif args.lam is not None:
        raise UsageError("--lam sets the GradICON weight of an unconditional network; a "
                         "conditional network draws it from --lam-range at every step")


def _inherit_loss_settings(args: argparse.Namespace, card: dict[str, Any]) -> None:
    trained = ((card.get("training") or {}).get("options") or {})
    taken = {}
    for key in INHERITED_OPTIONS:
        if getattr(args, key, None) is None and trained.get(key) is not None:
            setattr(args, key, trained[key])
            taken[key] = trained[key]
    if taken:
        LOGGER.info("loss settings of the starting weights' training: %s",
                    ", ".join(f"{k} {v}" for k, v in taken.items()))


def run_finetune(args: argparse.Namespace) -> int:
    """Steps 1-6 of the module docstring; returns the exit code."""
    from regpipe.bids_app import bids

    from regpipe.device import set_threads

    started = time.monotonic()  # --budget counts image preparation too
    _check_output(args)
    if args.threads:
        set_threads(args.threads)
    layout = bids.load_layout(args.bids_dir, validate=not args.skip_bids_validation)
    images = bids.collect_images(layout, suffix=args.suffix,
                                 participant_label=args.participant_label,
                                 session_label=args.session_label, filters=args.bids_filters)
    pairs = form_pairs(images, args.pairs)
    LOGGER.info("%d %s image(s); pairs: %s", len(images), args.suffix,
                ", ".join(f"{len(v)} {k}" for k, v in pairs.items()))
    labels: dict[Path, Path] = {}
    masks: dict[Path, Path] = {}
    paired = {image.path for kind in pairs.values() for pair in kind for image in pair}
    if args.labels is not None:
        masks = find_label_maps(args.labels, images, kind="mask")  # 66 when missing
        masks = {path: mask for path, mask in masks.items()
                 if path in paired and args.use_masks}
        if args.dice_weight:
            labels = find_label_maps(args.labels, images)
            if not any(all(image.path in labels for image in pair)
                       for kind in pairs.values() for pair in kind):
                raise AppError(ExitCode.NO_INPUT, f"--dice-weight: no pair has label maps for "
                               f"both images in {args.labels}")  # before any preparation
        else:
            LOGGER.info("--dice-weight is 0: label maps are not used")
    network, path, sha256, name = load_starting_network(args.weights)
    check_condition_options(args, network)
    _inherit_loss_settings(args, network.metadata)
    if args.lam_range is not None:  # conditional (checked): the range this run trains on
        network.conditioning = dataclasses.replace(network.conditioning,
                                                   lam_range=tuple(args.lam_range))
    if args.region == "auto":  # the condition the BIDS App will register with
        from regpipe.workflows.jobs import AUTO_REGIONS

        args.region = AUTO_REGIONS["ct" if args.suffix == "CT" else "mri"]
    grid_mode = str(network.metadata.get("grid_mode", "squash"))
    resuming = check_resumable(args.output_dir, network, sha256,
                               selection_record(args, len(masks)))
    from regpipe.training import folder_lock

    with folder_lock(args.output_dir):  # before preparing: a second run stops at once
        return _prepare_and_train(args, started, pairs, labels, masks, network, path, sha256,
                                  name, grid_mode, resuming)


def _prepare_and_train(args: argparse.Namespace, started: float, pairs: dict[str, list[Pair]],
                       labels: dict[Path, Path], masks: dict[Path, Path], network: Any,
                       path: Path, sha256: str, name: str, grid_mode: str,
                       resuming: bool) -> int:
    from regpipe.cli.train import options_from
    from regpipe.image_pairs import Preparation
    from regpipe.training import train

    preparation = Preparation(bias_correct=args.bias_correct, masks=masks,
                              cache_dir=args.output_dir / "preprocessed", threads=args.threads)
    source = build_source(pairs, network.config.grid_shape, labels=labels,
                          modality="ct" if args.suffix == "CT" else "mri", region=args.region,
                          grid_mode=grid_mode, affine=args.affine_init, preparation=preparation)
    kinds = getattr(source, "sources", [source])
    labelled = sum(s.n_labelled_pairs for s in kinds)
    if args.dice_weight and not labelled:
        raise AppError(ExitCode.NO_INPUT,
                       f"--dice-weight: no pair has label maps for both images in {args.labels}")
    label = network.metadata.get("name") or (Path(name).stem if Path(name).suffix else name)
    start = {"name": label, "file": path, "sha256": sha256, "card": dict(network.metadata)}
    card = model_card(args, start=start, dataset=_dataset_name(args.bids_dir), pairs=pairs,
                      labelled=labelled, grid_mode=grid_mode, masked=len(masks))
    options = options_from(vars(args))
    if options.budget_seconds is not None:
        spent = time.monotonic() - started
        LOGGER.info("%.0f s of --budget spent on reading and preparing the images", spent)
        options = dataclasses.replace(options, budget_seconds=max(options.budget_seconds - spent,
                                                                  0.0))
    LOGGER.info("%s %s from %s (%s grid %s) in %s", "resuming" if resuming else "finetuning",
                card["name"], name, grid_mode, network.config.grid_shape, args.output_dir)
    state = train(network, source, args.output_dir, options, card)
    weights = args.output_dir / "weights.pt"
    print(json.dumps(state.summary()))
    if state.stopped_by != "steps":
        print(f"stopped at step {state.step} of {options.steps} ({state.stopped_by}); run the "
              "same command again to continue")
    print(f"finetuned weights: {weights} (model card {weights.with_suffix('.md')})\n"
          f"use them with: regpipe {args.bids_dir} OUT participant "
          f"{app_options(args, weights)}")
    return 130 if state.stopped_by == "signal" else int(ExitCode.SUCCESS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``regpipe-finetune``; returns the exit code (see the module docstring)."""
    try:
        args = _normalise_args(build_parser().parse_args(argv))
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    except AppError as error:
        print(f"regpipe-finetune: error: {error}", file=sys.stderr)
        return int(error.code)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: "
                        "%(message)s", datefmt="%y%m%d-%H:%M:%S")
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    try:
        return run_finetune(args)
    except AppError as error:
        print(f"regpipe-finetune: error: {error}", file=sys.stderr)
        return int(error.code)
    except WeightsError as error:
        print(f"regpipe-finetune: error: {error}", file=sys.stderr)
        return int(ExitCode.NO_INPUT)
    except RegpipeError as error:
        print(f"regpipe-finetune: error: {error}", file=sys.stderr)
        return int(ExitCode.FAILURE)
    except OSError as error:  # an output folder that cannot be made, a full disk...
        from regpipe.cli._common import os_error_message

        print(f"regpipe-finetune: error: {os_error_message(error)}", file=sys.stderr)
        return int(ExitCode.CANT_CREATE)
    except KeyboardInterrupt:
        print("regpipe-finetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
