"""Exit codes of the BIDS Apps execution specification, and the error that carries one.

Only the BIDS App turns errors into exit codes (see ``regpipe.errors``); every module of
``regpipe.bids_app`` raises :class:`AppError` with the code and a one-line reason, and
:func:`regpipe.bids_app.run.main` prints ``regpipe: error: <reason>`` on stderr and returns the
code.

====  =================  ==================================================================
code  name               when regpipe returns it
====  =================  ==================================================================
0     SUCCESS            everything requested was done
1     FAILURE            some subject or node failed (crash files name it), an image was
                         left out for unusable input files (the others ran), or an
                         unexpected error (a missing compute device, ...)
16    VALIDATION         ``bids_dir`` is not a valid BIDS dataset (pybids validation; skip it
                         with ``--skip-bids-validation``)
17    UNKNOWN_LEVEL      analysis level other than ``participant`` or ``group``
18    FILTERS_EMPTY      ``--participant-label``, ``--session-label`` or
                         ``--bids-filter-file`` selected no image (or named a participant
                         that does not exist)
64    USAGE              bad option or value; ``output_dir`` or ``--work-dir`` inside
                         ``bids_dir`` outside ``bids_dir/derivatives/``
66    NO_INPUT           ``bids_dir`` missing, no image of ``--suffix`` in the dataset, none
                         with usable input files, no subject with two sessions in
                         longitudinal mode, a template, weights file or ``--labels`` dataset
                         that is not available (offline and not pre-fetched), no participant
                         outputs for ``group`` or for ``--reports-only``
73    CANT_CREATE        ``output_dir`` or ``--work-dir`` cannot be created or written
====  =================  ==================================================================

``argparse``'s own usage errors (exit 2, which the specification reserves for the shell) are
turned into 64.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the BIDS Apps execution specification that regpipe uses."""

    SUCCESS = 0
    FAILURE = 1
    VALIDATION = 16
    UNKNOWN_LEVEL = 17
    FILTERS_EMPTY = 18
    USAGE = 64
    NO_INPUT = 66
    CANT_CREATE = 73


class AppError(Exception):
    """An error of the BIDS App with its exit code; ``str(error)`` is the one-line reason."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = ExitCode(code)


class UsageError(AppError):
    """A bad command line (exit code 64)."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.USAGE, message)
