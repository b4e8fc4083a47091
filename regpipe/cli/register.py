"""``regpipe-register``: pairwise registration, a drop-in for ``unigradicon-register`` 1.0.6.

Every option of ``unigradicon-register`` 1.0.6 is accepted with the same spelling and meaning;
each also has a kebab-case twin (``--fixed-modality``). regpipe adds the inverse transform,
the Jacobian map, a metrics file, affine pre-alignment, the grid mode, device, threads, mixed
precision (``--mixed_precision``) and the condition of a conditional network (``--region``,
``--pair-type``, ``--smoothness``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence

from regpipe.cli._common import (
    add_option,
    check_outputs,
    network_passes_argument,
    region_argument,
    run_cli,
    smoothness_argument,
)
from regpipe.errors import InputError

LOGGER = logging.getLogger("regpipe")


def _io_iterations(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        number = int(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected an integer or None, got {value!r}") from error
    if number < 0:
        raise argparse.ArgumentTypeError("io_iterations must be >= 0 (or None)")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe-register",
        description="Register a moving image onto a fixed image (uniGradICON-compatible).",
    )
    add_option(parser, "fixed", required=True, help="fixed image (NIfTI, MHA, NRRD...)")
    add_option(parser, "moving", required=True, help="moving image")
    add_option(parser, "fixed_modality", required=True, type=str.lower, choices=["ct", "mri"])
    add_option(parser, "moving_modality", required=True, type=str.lower, choices=["ct", "mri"])
    add_option(parser, "fixed_mask", help="region of interest on the fixed grid")
    add_option(parser, "moving_mask", help="region of interest on the moving grid")
    add_option(parser, "input_masking", action="store_true",
               help="zero the network input outside the masks")
    add_option(parser, "fixed_segmentation",
               help="fixed label map (Dice reported; Dice loss with --dice_loss_weight)")
    add_option(parser, "moving_segmentation",
               help="moving label map (Dice reported; Dice loss with --dice_loss_weight)")
    add_option(parser, "transform_out", required=True,
               help="forward transform (fixed->moving points; resamples moving onto fixed): "
               ".h5/.hdf5 ITK transform or .nii.gz ITK displacement field")
    add_option(parser, "warped_moving_out", help="moving image resampled onto the fixed grid")
    add_option(parser, "io_iterations", type=_io_iterations, default=50,
               help="instance-optimisation steps, or None to disable (default 50)")
    add_option(parser, "io_grid", type=int, default=160,
               help="largest size per axis of the fast instance-optimisation grid (default 160; "
               "smaller is faster and coarser)")
    add_option(parser, "io_sim", default="lncc", choices=["lncc", "lncc2", "mind"],
               help="similarity for instance optimisation")
    add_option(parser, "io_lr", type=float,
               help="learning rate of network instance optimisation (--io_method network; "
               "default 2e-5)")
    add_option(parser, "model", default=None,
               help="weights by name: unigradicon, multigradicon or a regpipe model "
               "(default: regpipe's default weights), or none: no network (affine + fast "
               "instance optimisation)")
    add_option(parser, "network_weights", help="path to a checkpoint (overrides --model)")
    add_option(parser, "loss_function_masking", action="store_true",
               help="use the masks in the similarity of instance optimisation")
    add_option(parser, "intensity_conservation_loss", action="store_true",
               help="CT only: Jacobian-weighted similarity in network instance optimisation "
               "(needs --io_method network)")
    add_option(parser, "dice_loss_weight", type=float, default=0.0,
               help="weight of a Dice term on the segmentations in network instance "
               "optimisation (needs both segmentations and --io_method network)")
    add_option(parser, "ct_window", type=float, nargs=2, metavar=("MIN", "MAX"),
               default=(-1000.0, 1000.0), help="CT window in HU (default -1000 1000)")
    add_option(parser, "quantile_range", type=float, nargs=2, metavar=("LOW", "HIGH"),
               default=(0.0, 0.99), help="MRI normalisation quantiles (default 0 0.99)")
    # regpipe additions
    add_option(parser, "inverse_transform_out",
               help="inverse transform (moving->fixed points), on the moving grid")
    add_option(parser, "jacobian_out", help="Jacobian determinant map on the fixed grid")
    add_option(parser, "metrics_out", help="metrics and settings as JSON")
    add_option(parser, "affine", default="ours", choices=["ours", "ants", "none"],
               help="affine pre-alignment composed into the result (default ours)")
    add_option(parser, "io_method", default="fast", choices=["fast", "network"],
               help="fast: CPU-friendly correction on top of the network output (default); "
               "network: uniGradICON's optimisation of all weights (GPU)")
    add_option(parser, "grid_mode", default="auto",
               choices=["auto", "squash", "isotropic", "squash-ras"])
    add_option(parser, "device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_option(parser, "threads", type=int, help="CPU threads for PyTorch")
    add_option(parser, "mixed_precision", action="store_true",
               help="run the network in bfloat16 autocast on a CUDA device (ignored on the CPU)")
    add_option(parser, "no_symmetric", action="store_true",
               help="one network pass, as uniGradICON (default: the mean of the moving->fixed "
               "map and the inverse of the fixed->moving one)")
    add_option(parser, "network_passes", type=network_passes_argument, default=1, metavar="N",
               help="apply the network N times, each pass to the moving image warped by the "
               "ones before (default 1)")
    add_option(parser, "seed", type=int, default=0, help="random seed (default 0)")
    # the condition of a conditional network (an error with other weights)
    add_option(parser, "region", type=region_argument,
               help="conditional networks: body region brain, head_neck, thorax, abdomen, "
               "pelvis, knee or other (aliases: lung, chest, prostate...; default other)")
    add_option(parser, "pair_type", type=str.lower, choices=["inter", "intra"],
               help="conditional networks: inter (two subjects, or a template; default) or "
               "intra (one subject)")
    add_option(parser, "smoothness", type=smoothness_argument, metavar="LAM",
               help="conditional networks: regularisation weight lam (default 1.5; larger "
               "is smoother)")
    add_option(parser, "quiet", action="store_true", help="only warnings and errors")
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path, before the registration: folder, writability, suffix, and none of
    them an input or another output."""
    kinds = {"transform_out": "field", "inverse_transform_out": "field",
             "warped_moving_out": "image", "jacobian_out": "image", "metrics_out": "file"}
    inputs = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_segmentation",
              "moving_segmentation", "network_weights")
    check_outputs({name: (getattr(args, name), kind) for name, kind in kinds.items()},
                  {name: getattr(args, name) for name in inputs})
    on_fixed_grid = {name: getattr(args, name) for name in ("warped_moving_out", "jacobian_out")}
    if any(path and path.endswith((".mha", ".nrrd")) for path in on_fixed_grid.values()):
        from regpipe.imageio import check_image_path, read_grid

        grid = read_grid(args.fixed, "fixed image")  # a sheared grid fits no ITK image
        for name, path in on_fixed_grid.items():
            if path:
                try:
                    check_image_path(path, grid)
                except InputError as error:
                    raise InputError(f"--{name}: {error}") from None


def _masks(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Masks as ``unigradicon-register`` 1.0.6 uses them (including its deprecated fallback)."""
    fixed, moving = args.fixed_mask, args.moving_mask
    if (
        fixed is None
        and moving is None
        and args.fixed_segmentation
        and args.moving_segmentation
        and args.dice_loss_weight == 0.0
        and (args.loss_function_masking or not args.input_masking)
    ):
        warnings.warn(
            "using segmentations as masks is deprecated (as in unigradicon-register): pass "
            "--fixed_mask/--moving_mask for masking",
            DeprecationWarning,
            stacklevel=2,
        )
        # Python hides DeprecationWarnings by default; this changes the result, so say it
        LOGGER.warning("the segmentations are also used as masks (input masking), as "
                       "unigradicon-register 1.0.6 does without --fixed_mask/--moving_mask; "
                       "this changes the registration: pass the masks explicitly to choose")
        if not args.loss_function_masking:
            args.input_masking = True
        fixed, moving = args.fixed_segmentation, args.moving_segmentation
    needs = args.input_masking or args.loss_function_masking
    if needs and (fixed is None or moving is None):
        raise InputError("input/loss masking needs both --fixed_mask and --moving_mask")
    if not needs and (fixed or moving):
        LOGGER.warning("masks are ignored without --input_masking or --loss_function_masking "
                       "(as in unigradicon-register)")
        return None, None
    return fixed, moving


def _check_objective_options(args: argparse.Namespace) -> None:
    """``unigradicon-register``'s checks of the two extra loss options, plus the IO method."""
    if args.intensity_conservation_loss and (
        args.fixed_modality != "ct" or args.moving_modality != "ct"
    ):
        raise InputError("--intensity_conservation_loss is only supported for CT images "
                         "(--fixed_modality ct --moving_modality ct)")
    if not args.dice_loss_weight >= 0:  # also NaN
        raise InputError(f"--dice_loss_weight must be >= 0, got {args.dice_loss_weight}")
    if args.dice_loss_weight > 0 and not (args.fixed_segmentation and args.moving_segmentation):
        raise InputError("--dice_loss_weight > 0 needs both --fixed_segmentation and "
                         "--moving_segmentation")
    for name, used in (("--intensity_conservation_loss", args.intensity_conservation_loss),
                       ("--dice_loss_weight", args.dice_loss_weight > 0)):
        if used and args.io_method != "network" and args.io_iterations:  # no IO: no effect
            raise InputError(f"{name} applies to uniGradICON's network instance optimisation: "
                             "use --io_method network")


def _main(args: argparse.Namespace) -> int:
    from regpipe.registration import register

    if args.io_lr is not None and args.io_lr <= 0:
        raise InputError("--io_lr must be positive")
    if (args.io_method == "fast" and args.io_iterations
            and (args.io_sim != "lncc" or args.io_lr is not None)):
        # unigradicon-register scripts pass them (its own --io_lr default, say): run, saying so
        LOGGER.warning("--io_sim and --io_lr set uniGradICON's network instance optimisation "
                       "(--io_method network); the default fast optimisation uses LNCC and its "
                       "own step sizes, so they are ignored")
        args.io_sim, args.io_lr = "lncc", None
    _check_objective_options(args)
    _check_outputs(args)
    weights = args.network_weights or args.model or "default"
    if weights == args.model and str(weights).lower() == "none":
        weights = None  # no network: affine + fast IO, as the App's --weights none
    masks = _masks(args)
    result = register(
        args.fixed,
        args.moving,
        fixed_modality=args.fixed_modality,
        moving_modality=args.moving_modality,
        weights=weights,
        fixed_mask=masks[0],
        moving_mask=masks[1],
        fixed_segmentation=args.fixed_segmentation,
        moving_segmentation=args.moving_segmentation,
        input_masking=args.input_masking,
        loss_masking=args.loss_function_masking,
        affine=args.affine,
        grid_mode=args.grid_mode,
        io_iterations=args.io_iterations,
        io_method=args.io_method,
        io_sim=args.io_sim,
        io_lr=args.io_lr,
        io_grid=args.io_grid,
        ct_window=tuple(args.ct_window),
        quantile_range=tuple(args.quantile_range),
        device=args.device,
        threads=args.threads,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        symmetric=not args.no_symmetric,
        network_passes=args.network_passes,
        progress=not args.quiet,
        intensity_conservation=args.intensity_conservation_loss,
        dice_loss_weight=args.dice_loss_weight,
        region=args.region,
        pair_type=args.pair_type,
        smoothness=args.smoothness,
    )
    result.save(
        args.transform_out,
        inverse_out=args.inverse_transform_out,
        warped_out=args.warped_moving_out,
        jacobian_out=args.jacobian_out,
    )
    summary = {"metrics": result.metrics, "settings": result.settings}
    if args.metrics_out:
        from regpipe.atomic import atomic_write, json_ready

        text = json.dumps(json_ready(summary), indent=2, default=str)  # NaN Dice: null
        atomic_write(args.metrics_out, lambda tmp: tmp.write_text(text))
    m = result.metrics
    print(
        f"done in {m['runtime_s']:.1f} s: NCC {m['ncc_before']:.3f}"
        + (f" (affine {m['ncc_affine']:.3f})" if "ncc_affine" in m else "")
        + f" -> {m['ncc_after']:.3f}, "
        f"folding {m['folding_percent']:.4f} %, SD log J {m['sd_log_jacobian']:.3f}"
        + (f", mean Dice {m['dice_mean']:.3f}" if "dice_mean" in m else ""),
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
