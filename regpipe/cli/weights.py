"""``regpipe-weights``: list, fetch, verify and locate network checkpoints.

Usage::

    regpipe-weights list                      # registry table: name, cached?, path, size, source
    regpipe-weights fetch unigradicon         # download into the cache ($REGPIPE_HOME/weights)
    regpipe-weights fetch unigradicon --url file:///mnt/usb/Step_2_final.trch
    regpipe-weights verify unigradicon        # or a file path; exit 1 when a check fails
    regpipe-weights path unigradicon          # where the file is, or must be put by hand
    regpipe-weights average OUT.pt A.pt B.pt  # weight averaging of snapshots of one run

Exit codes: 0 success, 1 a regpipe error (one line on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from regpipe import weights
from regpipe.cli._common import os_error_message
from regpipe.errors import RegpipeError

PROG = "regpipe-weights"


def _format_size(n_bytes: int | None, approximate: bool = False) -> str:
    """Return ``n_bytes`` as decimal megabytes (``"282.8 MB"``), ``"?"`` when unknown."""
    if n_bytes is None:
        return "?"
    return f"{'~' if approximate else ''}{n_bytes / 1e6:.1f} MB"


def _cmd_list(args: argparse.Namespace) -> int:
    default = weights.default_weights_name()
    rows = [("NAME", "CACHED", "PATH", "SIZE", "SOURCE")]
    for entry in weights.list_entries():
        path = weights.weights_path(entry.name)
        present = path.is_file() and path.stat().st_size > 0
        if present:
            size = _format_size(path.stat().st_size)
            cached = "bundled" if entry.bundled and path.parent == weights.bundled_dir() else "yes"
        else:
            size = _format_size(entry.size or entry.approx_size, approximate=entry.size is None)
            cached = "no"
        name = entry.name + (" *" if entry.name == default else "")
        rows.append((name, cached, str(path), size, entry.url or "(bundled)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
    print(f"\n* default   cache: {weights.cache_dir()}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    path = weights.fetch(args.name, force=args.force, url=args.url, progress=not args.quiet)
    print(path)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    result = weights.verify(args.name_or_path)
    print(f"path:    {result.path}")
    print(f"exists:  {'yes' if result.exists else 'no'}")
    if result.size is not None:
        expected = "" if result.expected_size is None else f" (expected {result.expected_size})"
        print(f"size:    {result.size} bytes{expected}")
    if result.sha256 is not None:
        if result.sha256_matches is None:
            note = "no reference checksum"
        else:
            state = "matches" if result.sha256_matches else "DOES NOT MATCH"
            note = f"{state} the {result.sha256_reference}"
        print(f"sha256:  {result.sha256} ({note})")
    if result.exists:
        plural = "" if result.n_tensors == 1 else "s"
        loads = (f"yes, {result.n_tensors} tensor{plural}, into the network it describes"
                 if result.loads else "no")
        print(f"loads:   {loads}")
    print(f"result:  {'OK' if result.ok else 'FAILED'}")
    if not result.ok:
        print(f"{PROG}: error: {'; '.join(result.problems)}", file=sys.stderr)
        return 1
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    if args.name.lower() == "default":  # what --weights default means everywhere else
        args.name = weights.default_weights_name()
    path = weights.weights_path(args.name)
    print(path)
    if not (path.is_file() and path.stat().st_size > 0):
        print(
            f"{PROG}: note: not there yet; run `{PROG} fetch {args.name}` or copy the file there",
            file=sys.stderr,
        )
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from regpipe.networks import average_weights

    path = average_weights(args.inputs, args.output)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``regpipe-weights``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage regpipe network checkpoints (cache: $REGPIPE_HOME/weights, "
        "else $XDG_CACHE_HOME/regpipe/weights, else ~/.cache/regpipe/weights; "
        "REGPIPE_OFFLINE=1 forbids downloads).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="show the registry and what is cached")
    p_list.set_defaults(func=_cmd_list)

    p_fetch = sub.add_parser("fetch", help="download a checkpoint into the cache")
    p_fetch.add_argument("name", metavar="NAME", help="registry name, e.g. unigradicon")
    p_fetch.add_argument("--url", help="download from this http(s):// or file:// URL instead")
    p_fetch.add_argument("--force", action="store_true", help="download even if cached")
    p_fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    p_fetch.set_defaults(func=_cmd_fetch)

    p_verify = sub.add_parser("verify", help="check size, sha256 and that a checkpoint loads")
    p_verify.add_argument("name_or_path", metavar="NAME|PATH")
    p_verify.set_defaults(func=_cmd_verify)

    p_path = sub.add_parser("path", help="print where a checkpoint is (or must be put)")
    p_path.add_argument("name", metavar="NAME")
    p_path.set_defaults(func=_cmd_path)

    p_average = sub.add_parser("average", help="average weights files of one configuration "
                               "(snapshots of a training run) into one")
    p_average.add_argument("output", metavar="OUT")
    p_average.add_argument("inputs", metavar="FILE", nargs="+")
    p_average.set_defaults(func=_cmd_average)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``regpipe-weights`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    # SIGTERM (SLURM's time limit, scancel, timeout) unwinds like Ctrl-C, so that a download
    # removes its partial file
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except RegpipeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. `average` into a folder that does not exist
        print(f"{PROG}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (a KeyboardInterrupt, so cleanups run)."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
