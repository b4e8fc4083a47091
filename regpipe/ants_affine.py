"""ANTs' affine registration with the interface and result of our own.

:func:`ants_affine_register` runs ``antsRegistration`` (antspyx, Mattes mutual information) on
the inputs of :func:`regpipe.affine.affine_register`, checked the same way, and returns the
same :class:`~regpipe.transforms.AffineTransform` (fixed -> moving, RAS+ mm): the App's
``--affine-init ants`` and the affine benchmark's comparison.

Example
-------
>>> transform = ants_affine_register(fixed, fixed_geometry,  # doctest: +SKIP
...                                  moving, moving_geometry, seed=1)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from regpipe.affine import Init, check_image, check_levels, check_mask
from regpipe.ants_methods import ants_settings, to_ants_image
from regpipe.errors import InputError
from regpipe.spaces import Geometry
from regpipe.transforms import AffineTransform

__all__ = ["ants_affine_register"]


def ants_affine_register(
    fixed: NDArray[np.generic],
    fixed_geometry: Geometry,
    moving: NDArray[np.generic],
    moving_geometry: Geometry,
    *,
    fixed_mask: NDArray[np.generic] | None = None,
    moving_mask: NDArray[np.generic] | None = None,
    levels: Sequence[float] | None = None,
    iterations: Sequence[int] | None = None,
    dof: int = 12,
    init: Init = "com",
    progress: bool = False,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> AffineTransform:
    """ANTs' affine registration (antspyx): the RAS+ mm matrix mapping fixed to moving points.

    Runs ``antsRegistration`` with Mattes mutual information, as
    ``ants.registration(type_of_transform="Affine")`` does, and converts its LPS ``.mat``
    (which, applied to a fixed-space point, gives the moving-space point) to RAS+.

    Parameters
    ----------
    fixed, fixed_geometry, moving, moving_geometry, fixed_mask, moving_mask, dof, init
        As in :func:`affine_register`; ``dof`` 9 has no ANTs counterpart (6: ``Rigid``,
        7: ``Similarity``, 12: ``Affine``).
    levels
        Grid spacings (mm), coarsest first, turned into ANTs shrink factors of the fixed
        image's finest spacing with Gaussian smoothing of half the spacing (mm).
        ``None`` keeps ANTs' defaults (shrink 6x4x2x1, smoothing 3x2x1x0 voxels).
    iterations
        Iterations per level; ``None`` keeps ANTs' defaults (2100x1200x1200x10).
    progress
        Let ANTs print its iterations.
    device
        Ignored: ANTs runs on the CPU.
    seed
        When given, ANTs runs deterministically (one thread, fixed sampling seed), about
        1.7x slower; the package-global setting is restored afterwards.

    Raises
    ------
    InputError
        As :func:`affine_register`, or ``dof=9``.
    """
    import ants  # heavy: imported only when used

    from regpipe.transform_files import read_transform

    del device
    if dof not in _ANTS_TRANSFORMS:
        raise InputError(f"ANTs registers with dof {sorted(_ANTS_TRANSFORMS)}, not {dof}")
    images = {
        "fixed": check_image(fixed, fixed_geometry, "fixed"),
        "moving": check_image(moving, moving_geometry, "moving"),
    }
    masks = {
        "fixed": check_mask(fixed_mask, fixed_geometry, "fixed_mask"),
        "moving": check_mask(moving_mask, moving_geometry, "moving_mask"),
    }
    geometries = {"fixed": fixed_geometry, "moving": moving_geometry}
    options = _ants_schedule(levels, iterations, float(fixed_geometry.spacing.min()))
    # The seed's settings (one ITK thread) are in force before ITK is first touched: ITK fixes
    # its thread count at its first use in a process.
    with ants_settings(seed, None), tempfile.TemporaryDirectory(prefix="regpipe_ants_") as folder:
        ants_images = {k: to_ants_image(images[k], geometries[k]) for k in images}
        ants_masks = {
            k: None if m is None else to_ants_image(m, geometries[k]) for k, m in masks.items()
        }
        result = ants.registration(
            ants_images["fixed"],
            ants_images["moving"],
            type_of_transform=_ANTS_TRANSFORMS[dof],
            initial_transform=_ants_initial(init, fixed_geometry, moving_geometry, folder),
            mask=ants_masks["fixed"],
            moving_mask=ants_masks["moving"],
            outprefix=os.path.join(folder, "reg_"),
            verbose=progress,
            **options,
        )
        transform = read_transform(result["fwdtransforms"][-1])
    if not isinstance(transform, AffineTransform):
        raise InputError(f"ANTs returned {type(transform).__name__}, not an affine")
    return transform


#: ANTs transform type per degree of freedom.
_ANTS_TRANSFORMS = {6: "Rigid", 7: "Similarity", 12: "Affine"}


def _ants_schedule(
    levels: Sequence[float] | None, iterations: Sequence[int] | None, finest: float
) -> dict[str, Any]:
    """``ants.registration`` keyword arguments for a multi-resolution schedule."""
    options: dict[str, Any] = {}
    if levels is not None:
        levels = check_levels(levels)
        shrink = tuple(max(1, round(s / finest)) for s in levels)
        options["aff_shrink_factors"] = shrink
        options["aff_smoothing_sigmas"] = tuple(
            0.0 if f == 1 else s / 2 for f, s in zip(shrink, levels, strict=True)
        )
        options["smoothing_in_mm"] = True
    if iterations is not None:
        options["aff_iterations"] = tuple(int(n) for n in iterations)
    count = len(options.get("aff_shrink_factors", (6, 4, 2, 1)))
    if len(options.get("aff_iterations", (0,) * count)) != count:
        raise InputError("ANTs needs one iteration count per level")
    return options


def _ants_initial(init: str, fixed: Geometry, moving: Geometry, folder: str) -> list[str] | None:
    """ANTs' ``-r`` initial transform for ``init`` (``None``: ANTs' own centre-of-mass one)."""
    from regpipe.transform_files import write_transform

    if init == "com":
        return None
    if init == "identity":
        return ["Identity"]
    if init != "geometry":
        raise InputError(f"init must be 'com', 'geometry' or 'identity', got {init!r}")
    matrix = np.eye(4)
    matrix[:3, 3] = moving.center_world() - fixed.center_world()
    path = os.path.join(folder, "initial.mat")
    write_transform(AffineTransform(matrix), path)
    return [path]
