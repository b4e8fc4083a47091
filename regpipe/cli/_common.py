"""Shared plumbing of the pairwise command-line tools: argument aliases and error reporting."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from regpipe.errors import InputError, RegpipeError


def add_option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--snake_case`` (uniGradICON's spelling) and its ``--kebab-case`` twin."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*flags, dest=name, **kwargs)


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``main`` and turn regpipe errors into one line on stderr, exit 1."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return main(args)
    except RegpipeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; no output was written", file=sys.stderr)
        return 130


def region_argument(value: str) -> str:
    """argparse type of ``--region``: a body region of the conditional model (or an alias)."""
    from regpipe.networks.condition import canonical_region

    try:
        return canonical_region(value)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def smoothness_argument(value: str) -> float:
    """argparse type of ``--smoothness``: a positive, finite lam."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"--smoothness must be positive, got {value!r}")
    return number
