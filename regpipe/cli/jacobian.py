"""``regpipe-jacobian``: Jacobian determinant of a transform on a grid, with folding statistics.

Same options as ``unigradicon-jacobian`` (``--transform --fixed --jacob [--log_jacob]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from regpipe.cli._common import add_option, check_outputs, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe-jacobian", description="Jacobian determinant map of a transform."
    )
    add_option(parser, "transform", required=True, help="forward transform file")
    add_option(parser, "fixed", required=True, help="image defining the grid")
    add_option(parser, "jacob", required=True, help="output Jacobian determinant map")
    add_option(parser, "log_jacob", help="output natural log of the determinant")
    add_option(parser, "mask", help="region for the folding statistics (default: whole grid)")
    add_option(parser, "quiet", action="store_true")
    return parser


def _main(args: argparse.Namespace) -> int:
    from regpipe.imageio import (
        Image,
        check_image_path,
        check_same_grid,
        load_image,
        save_image,
    )
    from regpipe.metrics import folding_stats, jacobian_determinant
    from regpipe.transform_files import read_transform
    from regpipe.transforms import DisplacementField

    check_outputs({"jacob": (args.jacob, "image"), "log_jacob": (args.log_jacob, "image")},
                  {"fixed": args.fixed, "transform": args.transform, "mask": args.mask})
    fixed = load_image(args.fixed, "any", "fixed image")  # only its grid is used
    geometry = fixed.geometry
    for path in (args.jacob, args.log_jacob):  # a sheared grid in .mha/.nrrd: before any work
        if path:
            check_image_path(path, geometry)
    mask = None
    if args.mask:  # checked before anything is computed or written
        mask_image = load_image(args.mask, "mask", "mask")
        check_same_grid(fixed, mask_image, "--mask")
        mask = mask_image.data
    field = DisplacementField.from_transform(read_transform(args.transform), geometry)
    jac = jacobian_determinant(field)
    save_image(Image(jac, geometry), args.jacob)
    if args.log_jacob:
        with np.errstate(divide="ignore", invalid="ignore"):
            log_jac = np.where(jac > 0, np.log(np.maximum(jac, 1e-12)), np.nan).astype(np.float32)
        save_image(Image(log_jac, geometry), args.log_jacob)
    print(json.dumps(folding_stats(jac, mask)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
