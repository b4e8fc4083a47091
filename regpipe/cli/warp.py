"""``regpipe-warp``: resample an image through a transform, a drop-in for ``unigradicon-warp``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from regpipe.cli._common import add_option, check_outputs, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe-warp", description="Resample a moving image onto a fixed image's grid."
    )
    add_option(parser, "fixed", required=True, help="image defining the output grid")
    add_option(parser, "moving", required=True, help="image or label map to resample")
    add_option(parser, "transform", help="forward transform file (identity when omitted)")
    add_option(parser, "warped_moving_out", required=True, help="output image")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--linear", action="store_true", help="trilinear (images)")
    group.add_argument("--nearest_neighbor", "--nearest-neighbor", dest="nearest_neighbor",
                       action="store_true", help="nearest neighbour (label maps; type kept)")
    add_option(parser, "quiet", action="store_true")
    return parser


def _main(args: argparse.Namespace) -> int:
    from regpipe.transforms import AffineTransform
    from regpipe.warp import apply_transform

    check_outputs({"warped_moving_out": (args.warped_moving_out, "image")},
                  {"fixed": args.fixed, "moving": args.moving, "transform": args.transform})
    transform = args.transform if args.transform else AffineTransform.identity()
    apply_transform(
        args.moving, transform, args.fixed,
        interpolation="nearest" if args.nearest_neighbor else "linear",
        output=args.warped_moving_out,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
