"""regpipe: foundation-network image registration, compared with ANTs, as a library and BIDS App.

Quick use from Python (no Nipype, no BIDS)::

    import regpipe
    result = regpipe.register("fixed.nii.gz", "moving.nii.gz")
    result.save("fwd_xfm.h5", inverse_out="inv_xfm.h5", warped_out="warped.nii.gz")
    labels = regpipe.apply_transform("moving_labels.nii.gz", result.forward,
                                     "fixed.nii.gz", interpolation="nearest")

Transforms map fixed-space points to moving-space points (see :mod:`regpipe.spaces`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Idle OpenMP workers that spin slow small CPU jobs 5-10x on busy machines and under Nipype's
# MultiProc; must be set before torch is first imported (the user's own setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["RegistrationResult", "__version__", "apply_transform", "register"]

if TYPE_CHECKING:
    from regpipe.registration import RegistrationResult, register
    from regpipe.warp import apply_transform


def __getattr__(name: str) -> Any:
    # Lazy: importing regpipe stays cheap (no torch import until registration is used).
    if name in ("register", "RegistrationResult"):
        from regpipe import registration

        return getattr(registration, name)
    if name == "apply_transform":
        from regpipe.warp import apply_transform

        return apply_transform
    if name in _SUBMODULES:  # regpipe.errors.InputError without importing regpipe.errors first
        import importlib

        return importlib.import_module(f"regpipe.{name}")
    raise AttributeError(f"module 'regpipe' has no attribute {name!r}")


#: Submodules a notebook may reach as attributes (``regpipe.errors``, ``regpipe.imageio``...).
_SUBMODULES = ("affine", "errors", "imageio", "metrics", "networks", "preprocess", "spaces",
               "transform_files", "transforms", "warp", "weights")


def __dir__() -> list[str]:
    """Tab completion shows the API (``register``, ``apply_transform``...), not the
    module's own imports."""
    return sorted({*__all__, *_SUBMODULES})
