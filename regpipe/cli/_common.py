"""Shared plumbing of the pairwise command-line tools: argument aliases and error reporting."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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
    except OSError as error:  # a full disk, a folder made read-only meanwhile...
        print(f"{parser.prog}: error: {os_error_message(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (outputs are written whole or not at all)",
              file=sys.stderr)
        return 130


def os_error_message(error: OSError) -> str:
    """One line for an ``OSError``: its reason and the file it concerns."""
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}"


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


def network_passes_argument(value: str) -> int:
    """argparse type of ``--network-passes``: an integer from 1 to
    :data:`regpipe.registration.MAX_NETWORK_PASSES`, as ``register`` takes."""
    from regpipe.registration import MAX_NETWORK_PASSES

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not 1 <= number <= MAX_NETWORK_PASSES:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_NETWORK_PASSES}, got {number}")
    return number


def check_outputs(outputs: Mapping[str, tuple[str | None, str]],
                  inputs: Mapping[str, str | None] | None = None) -> None:
    """Check output paths before any work: ``{option: (path or None, kind)}``, ``kind`` one of
    ``"image"`` (a suffix of :data:`regpipe.imageio.OUTPUT_IMAGE_SUFFIXES`), ``"field"`` (a
    transform file that holds a displacement field: ``.nii.gz``, ``.nii``, ``.h5``,
    ``.hdf5``) or ``"file"`` (anything).
    The folder must exist and be writable, and the path must not be a folder, one of the
    ``inputs`` (``{option: path or None}``) or another output.

    Raises
    ------
    InputError
        Naming the option and what is wrong with its path.
    """
    from regpipe.atomic import check_distinct_paths, check_output_folder
    from regpipe.imageio import check_image_path
    from regpipe.transform_files import check_field_path

    for option, (value, kind) in outputs.items():
        if value is None:
            continue
        path = Path(value)
        flag = f"--{option}"
        check_output_folder(path, flag)
        try:
            if kind == "image":
                check_image_path(path)
            elif kind == "field":
                check_field_path(path)
        except RegpipeError as error:
            raise InputError(f"{flag}: {error}") from None
    check_distinct_paths({f"--{option}": value for option, (value, _) in outputs.items()},
                         {f"--{option}": value for option, value in (inputs or {}).items()})
