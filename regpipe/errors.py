"""The one exception hierarchy of regpipe.

Library code raises these; only the command-line layers (``regpipe.cli`` and
``regpipe.bids_app``) turn them into exit codes and one-line messages.
"""

from __future__ import annotations


class RegpipeError(Exception):
    """Base class of every error regpipe raises on purpose."""


class InputError(RegpipeError, ValueError):
    """An input image, mask, label map or option is unusable (with the reason)."""


class WeightsError(RegpipeError):
    """A network checkpoint is missing, corrupt or does not fit the network."""


class TemplateError(RegpipeError):
    """A template is missing (for example offline and not pre-fetched)."""


class ResourceError(RegpipeError):
    """Not enough memory, no such device, or another resource problem."""


class TransformFileError(RegpipeError):
    """A transform file cannot be read or written in the requested format."""


class TrainingError(RegpipeError, FloatingPointError):
    """Training cannot go on (the loss became NaN or infinite)."""
