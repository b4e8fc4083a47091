"""ANTs registrations (antspyx) returning the same result type as the network's.

:func:`ants_register` runs ``ants.registration`` (``antsRegistration`` linked into antspyx:
no ANTs command-line program is needed) and converts ANTs' transform files into regpipe
transforms, so an ANTs result is a :class:`~regpipe.registration.RegistrationResult` whose
``forward`` / ``inverse`` map points exactly like the network's (fixed -> moving and
moving -> fixed, RAS+ mm), whose warped image comes from the same resampler and whose metrics
come from the same code.

ANTs' conventions, converted here once:

* ``fwdtransforms`` is ``[1Warp.nii.gz, 0GenericAffine.mat]`` (or just the ``.mat``): a fixed
  point ``x`` goes to the moving point ``A(W(x))``, the warp first, then the affine.
* ``invtransforms`` is ``[0GenericAffine.mat, 1InverseWarp.nii.gz]`` with the affine to be
  *inverted*: a moving point ``y`` goes to ``W_inv(A^-1(y))``.

:func:`n4_bias_correct` (N4 bias-field correction) lives here too. Runtime and peak memory
are measured by :func:`regpipe.resources.measure_resources`, for every method alike.

Example
-------
>>> result = ants_register("fixed.nii.gz", "moving.nii.gz",  # doctest: +SKIP
...                        method="synquick", seed=1)
>>> result.save("fwd_xfm.h5", inverse_out="inv_xfm.h5",  # doctest: +SKIP
...             warped_out="warped.nii.gz")
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from regpipe.atomic import atomic_write_text
from regpipe.errors import InputError
from regpipe.resources import ResourceUsage, measure_resources

# Light at import (numpy only): a fresh process running a seeded ANTs registration imports
# this module without torch. The image/transform modules are imported where they are used.
if TYPE_CHECKING:
    from regpipe.imageio import Image, ImageLike
    from regpipe.registration import RegistrationResult
    from regpipe.spaces import Geometry
    from regpipe.transforms import AffineTransform, Transform

AntsMethod = Literal["syn", "synquick", "affine"]

#: ``ants.registration`` ``type_of_transform`` of each method.
ANTS_METHODS: dict[str, str] = {
    "syn": "SyN",
    "synquick": "antsRegistrationSyNQuick[s]",
    "affine": "Affine",
}

#: Environment variable ITK reads for its thread count (what antspyx's deterministic mode sets).
ITK_THREADS = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
#: Environment variable older ANTs builds read for their random seed.
ANTS_SEED = "ANTS_RANDOM_SEED"

__all__ = [
    "ANTS_METHODS",
    "ants_random_seed",
    "ants_register",
    "ants_settings",
    "ants_version",
    "n4_bias_correct",
    "to_ants_image",
]


# --------------------------------------------------------------------------- antspyx glue


def ants_version() -> str:
    """The antspyx version string (``"unknown"`` when it cannot be told)."""
    try:
        import ants
    except ImportError:
        return "unknown"
    return str(getattr(ants, "__version__", "unknown"))


#: ANTs image description, plain arrays and numbers: (data, LPS origin, spacing, direction).
_AntsArgs = tuple[NDArray[np.float32], tuple[float, ...], tuple[float, ...], NDArray[np.float64]]


def _ants_args(data: NDArray[np.generic], geometry: Geometry) -> _AntsArgs:
    """``ants.from_numpy`` arguments (LPS+ origin and direction) of ``data`` on ``geometry``."""
    from regpipe.spaces import RAS_TO_LPS, ras_to_lps

    return (
        np.ascontiguousarray(data, dtype=np.float32),
        tuple(float(v) for v in ras_to_lps(geometry.affine[:3, 3])),
        tuple(float(v) for v in geometry.spacing),
        RAS_TO_LPS @ geometry.direction_ras,
    )


def to_ants_image(data: NDArray[np.generic], geometry: Geometry) -> Any:
    """An ANTsImage (LPS+ origin and direction) holding ``data`` (float32) on ``geometry``."""
    return _from_args(_ants_args(data, geometry))


def _from_args(args: _AntsArgs) -> Any:
    import ants

    data, origin, spacing, direction = args
    return ants.from_numpy(data, origin=origin, spacing=spacing, direction=direction)


@contextmanager
def _nothing() -> Iterator[ResourceUsage]:
    yield ResourceUsage()


def ants_random_seed(seed: int) -> int:
    """The ``--random-seed`` that ANTs gets for a regpipe seed in ``[0, 2**32)``.

    ``antsRegistration`` takes a positive 32-bit ``int`` and reads 0 as "seed from the system
    clock", which made ``seed=0`` (the BIDS App's default) silently non-deterministic. The seed
    is mapped to ``1 + seed % (2**31 - 1)``: seeds below ``2**31 - 1`` give distinct ANTs
    seeds.

    >>> ants_random_seed(0), ants_random_seed(41), ants_random_seed(2**31 - 1)
    (1, 42, 1)
    """
    if seed < 0:
        raise InputError(f"the seed must be a non-negative integer, got {seed}")
    return 1 + int(seed) % (2**31 - 1)


@contextmanager
def ants_settings(seed: int | None, threads: int | None) -> Iterator[None]:
    """ANTs' thread count and determinism inside the block; global state restored after.

    With a seed, antspyx's ``set_ants_deterministic(True, ...)`` passes ``--random-seed``
    (:func:`ants_random_seed` of ``seed``: ANTs reads 0 as "seed from the clock") and asks
    for one ITK thread. ITK fixes its thread count at its first use in a process,
    so the thread settings only hold in a process that has not used ANTs yet (see
    :func:`_run_ants`).
    """
    saved_threads, saved_seed = os.environ.get(ITK_THREADS), os.environ.get(ANTS_SEED)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    config: Any = None
    if threads:
        os.environ[ITK_THREADS] = str(int(threads))
    if seed is not None:
        import ants

        config = getattr(ants, "config", None)
        if config is not None and hasattr(config, "set_ants_deterministic"):
            config.set_ants_deterministic(True, ants_random_seed(seed))
        else:  # antspyx < 0.5: only the environment (ANTs reads ANTS_RANDOM_SEED)
            config = None
            os.environ[ITK_THREADS] = "1"
            os.environ[ANTS_SEED] = str(ants_random_seed(seed))
    try:
        yield
    finally:
        if config is not None:
            config.set_ants_deterministic(False, None)
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        for name, value in ((ITK_THREADS, saved_threads), (ANTS_SEED, saved_seed)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _ants_registration_files(
    images: dict[str, _AntsArgs],
    type_of_transform: str,
    folder: str,
    seed: int | None,
    threads: int | None,
    progress: bool,
    measure: bool = False,
) -> dict[str, Any]:
    """Run ``ants.registration``; return its ``fwdtransforms`` / ``invtransforms`` files (and,
    with ``measure``, the call's ``runtime_s`` and ``peak_memory_mb``).

    Module-level and regpipe-free so that it can run in a fresh process (``images`` holds
    ``fixed``, ``moving`` and optionally ``fixed_mask`` / ``moving_mask``).
    """
    import ants  # heavy: imported only when used

    ants_images = {name: _from_args(args) for name, args in images.items()}
    meter = measure_resources() if measure else _nothing()
    with ants_settings(seed, threads), meter as usage:
        output = ants.registration(
            ants_images["fixed"],
            ants_images["moving"],
            type_of_transform=type_of_transform,
            mask=ants_images.get("fixed_mask"),
            moving_mask=ants_images.get("moving_mask"),
            outprefix=os.path.join(folder, "ants_"),
            verbose=progress,
        )
    files: dict[str, Any] = {
        key: [str(p) for p in output[key]] for key in ("fwdtransforms", "invtransforms")
    }
    if measure:
        files.update(runtime_s=usage.runtime_s, peak_memory_mb=usage.peak_memory_mb)
    return files


def _in_fresh_process(args: tuple, folder: str) -> dict[str, Any]:
    """:func:`_ants_registration_files` in a new Python process (nothing of the caller's
    ``__main__`` is imported, unlike ``spawn``). The request travels as an ``.npz`` of the
    images read without pickle plus JSON, the reply as JSON: no pickle crosses the processes."""
    import subprocess
    import sys

    images, type_of_transform, work, seed, threads, progress = args
    arrays: dict[str, NDArray[np.generic]] = {}
    request: dict[str, Any] = {"images": {}, "type_of_transform": type_of_transform,
                               "folder": work, "seed": seed, "threads": threads,
                               "progress": progress}
    for name, (data, origin, spacing, direction) in images.items():
        arrays[f"{name}_data"], arrays[f"{name}_direction"] = data, direction
        request["images"][name] = {"origin": list(origin), "spacing": list(spacing)}
    # mypy matches **arrays against savez's allow_pickle: bool too (no such key is passed)
    np.savez(Path(folder) / "request.npz", **arrays)  # type: ignore[arg-type]
    (Path(folder) / "request.json").write_text(json.dumps(request), encoding="utf-8")
    reply = Path(folder) / "reply.json"
    reply.unlink(missing_ok=True)
    code = ("import sys; from regpipe.ants_methods import _serve_request; "
            "_serve_request(sys.argv[1])")
    env = {**os.environ, ITK_THREADS: "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, folder],
        env=env,
        check=False,
        stdout=None if progress else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0 or not reply.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        from regpipe.errors import RegpipeError

        raise RegpipeError(
            f"ANTs registration failed (exit {done.returncode}): "
            + (lines[-1] if lines else "no message")
        )
    return json.loads(reply.read_text(encoding="utf-8"))


def _serve_request(folder: str) -> None:
    """The fresh process's side of :func:`_in_fresh_process`: read the request in ``folder``,
    register, write ``reply.json``."""
    request = json.loads((Path(folder) / "request.json").read_text(encoding="utf-8"))
    with np.load(Path(folder) / "request.npz", allow_pickle=False) as arrays:
        images: dict[str, _AntsArgs] = {
            name: (arrays[f"{name}_data"], tuple(meta["origin"]), tuple(meta["spacing"]),
                   arrays[f"{name}_direction"])
            for name, meta in request["images"].items()
        }
    files = _ants_registration_files(images, request["type_of_transform"], request["folder"],
                                     request["seed"], request["threads"], request["progress"],
                                     measure=True)
    atomic_write_text(Path(folder) / "reply.json", json.dumps(files))


def _chain(paths: Sequence[str], invert_affines: bool) -> Transform:
    """ANTs transform list (application order for points) as one regpipe transform."""
    from regpipe.transform_files import read_transform
    from regpipe.transforms import AffineTransform, compose

    parts: list[Transform] = []
    for path in paths:
        part = read_transform(path)
        if invert_affines and isinstance(part, AffineTransform):
            part = part.inverse()
        parts.append(part)
    return parts[0] if len(parts) == 1 else compose(*parts)


def _affine_part(paths: Sequence[str]) -> AffineTransform | None:
    from regpipe.transform_files import read_transform
    from regpipe.transforms import AffineTransform

    for path in paths:
        if str(path).endswith(".mat"):
            part = read_transform(path)
            if isinstance(part, AffineTransform):
                return part
    return None


# --------------------------------------------------------------------------- public API


def ants_register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    method: AntsMethod = "synquick",
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    fixed_segmentation: ImageLike | None = None,
    moving_segmentation: ImageLike | None = None,
    fixed_modality: str = "mri",
    moving_modality: str = "mri",
    seed: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    evaluate: bool = True,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ANTs; returns a ``RegistrationResult``.

    Parameters
    ----------
    fixed, moving
        Paths, nibabel images or :class:`~regpipe.imageio.Image` objects (3-D). They are given
        to ANTs as they are (the BIDS App gives every method the same preprocessed images).
    method
        ``"syn"`` (``type_of_transform="SyN"``), ``"synquick"``
        (``"antsRegistrationSyNQuick[s]"``) or ``"affine"`` (``"Affine"``).
    fixed_mask, moving_mask
        Regions (non-zero = inside) on each image's grid, given to ANTs as metric masks.
    fixed_segmentation, moving_segmentation
        Label maps; when both are given the metrics hold Dice per label.
    fixed_modality, moving_modality
        ``"mri"`` or ``"ct"``: the normalisation used for the similarity metrics only.
    seed
        When given, ANTs runs deterministically (``--random-seed``, one thread), about
        1.7x slower, in a fresh process (ITK fixes its thread count at its first use in a
        process, so only a new one is sure to be single-threaded; about 2 s to start);
        results are then identical run to run.
    threads
        ITK threads (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``), effective when this process
        has not used ANTs yet; ignored with a seed (one thread).
    progress
        Let ANTs print its iterations.
    evaluate
        Compute the metrics (default); ``False`` keeps only the runtime and memory measures
        (as :func:`regpipe.register`'s ``evaluate``).

    Returns
    -------
    RegistrationResult
        ``forward`` (fixed -> moving: the ANTs warp then affine), ``inverse`` (moving ->
        fixed), ``warped`` (moving resampled on the fixed grid through ``forward``),
        ``affine`` (ANTs' affine stage), ``metrics`` as :func:`regpipe.register`'s, with
        ``ncc_before`` measured before any alignment (identity), plus ``runtime_s`` (the
        whole call) and ``peak_memory_mb`` (with a seed, the larger of this process's and the
        ANTs process's, also given as ``ants_process_peak_memory_mb`` with
        ``ants_process_runtime_s``), and ``settings``.

    Raises
    ------
    InputError
        Unknown method or modality, unreadable or mismatched images.
    """
    from regpipe.imageio import Image, load_image
    from regpipe.metrics import registration_metrics
    from regpipe.preprocess import check_modality, normalize_intensity
    from regpipe.registration import RegistrationResult
    from regpipe.warp import warp_array

    if method not in ANTS_METHODS:
        raise InputError(
            f"unknown ANTs method {method!r}: choose one of {', '.join(ANTS_METHODS)}"
        )
    fixed_modality = check_modality(fixed_modality)
    moving_modality = check_modality(moving_modality)
    with measure_resources() as usage:
        fixed_img = load_image(fixed, "image", "fixed image")
        moving_img = load_image(moving, "image", "moving image")
        masks = _load_on_grid(
            {"fixed": (fixed_mask, fixed_img), "moving": (moving_mask, moving_img)}, "mask"
        )
        segs = _load_on_grid(
            {
                "fixed": (fixed_segmentation, fixed_img),
                "moving": (moving_segmentation, moving_img),
            },
            "labels",
        )
        forward, inverse, affine, call = _run_ants(
            fixed_img, moving_img, masks, method, seed, threads, progress
        )
        warped = Image(
            warp_array(
                moving_img.data.astype(np.float32),
                moving_img.geometry,
                forward,
                fixed_img.geometry,
            ),
            fixed_img.geometry,
            header=fixed_img.header,
        )
        out = RegistrationResult(forward, inverse, fixed_img, moving_img, warped, None)
        if evaluate:
            norm = {
                "fixed": normalize_intensity(fixed_img.data, fixed_modality),
                "moving": normalize_intensity(moving_img.data, moving_modality),
            }
            # no affine pre-alignment here: "before" is the identity
            out.metrics = registration_metrics(out, norm, masks, segs)
        out.affine = affine
    out.metrics.update(usage.as_metrics())
    if call:  # ANTs ran in its own process (seeded): its memory is not in this process's peak
        out.metrics["ants_process_runtime_s"] = call["runtime_s"]
        out.metrics["ants_process_peak_memory_mb"] = call["peak_memory_mb"]
        out.metrics["peak_memory_mb"] = max(out.metrics["peak_memory_mb"], call["peak_memory_mb"])
    out.settings = {
        "method": f"ants-{method}",
        "type_of_transform": ANTS_METHODS[method],
        "ants_version": ants_version(),
        "seed": seed,
        "ants_random_seed": None if seed is None else ants_random_seed(seed),
        "deterministic": seed is not None,
        "threads": 1 if seed is not None else threads,
        "device": "cpu",
        "fixed_modality": fixed_modality,
        "moving_modality": moving_modality,
    }
    return out


def _load_on_grid(items: dict[str, tuple[ImageLike | None, Image]], kind: str) -> dict[str, Image]:
    from regpipe.imageio import check_same_grid, load_image

    loaded = {}
    for name, (source, image) in items.items():
        if source is not None:
            what = f"{name} {'mask' if kind == 'mask' else 'segmentation'}"
            other = load_image(source, kind, what)  # type: ignore[arg-type]
            check_same_grid(image, other, what)
            loaded[name] = other
    return loaded


def _run_ants(
    fixed: Image,
    moving: Image,
    masks: dict[str, Image],
    method: str,
    seed: int | None,
    threads: int | None,
    progress: bool,
) -> tuple[Transform, Transform, AffineTransform | None, dict[str, float]]:
    """ANTs' forward, inverse and affine transforms, and the measures of a separate process."""
    images = {
        "fixed": _ants_args(fixed.data, fixed.geometry),
        "moving": _ants_args(moving.data, moving.geometry),
    }
    for name, mask in masks.items():
        images[f"{name}_mask"] = _ants_args((mask.data != 0).astype(np.float32), mask.geometry)
    with tempfile.TemporaryDirectory(prefix="regpipe_ants_") as folder:
        args = (images, ANTS_METHODS[method], folder, seed, threads, progress)
        if seed is None:
            files = _ants_registration_files(*args)
        else:
            # ITK fixes its thread count when a process first uses it; a fresh process is the
            # only way to guarantee the single thread that makes ANTs reproducible.
            files = _in_fresh_process(args, folder)
        # Everything is read into memory before the folder disappears.
        forward = _chain(files["fwdtransforms"], invert_affines=False)
        inverse = _chain(files["invtransforms"], invert_affines=True)
        affine = _affine_part(files["fwdtransforms"])
    call: dict[str, float] = {k: files[k] for k in ("runtime_s", "peak_memory_mb") if k in files}
    return forward, inverse, affine, call


def n4_bias_correct(
    image: ImageLike,
    *,
    mask: ImageLike | None = None,
    shrink_factor: int = 4,
    threads: int | None = None,
) -> Image:
    """N4 bias-field correction (``ants.n4_bias_field_correction``) of a 3-D image.

    Parameters
    ----------
    image
        Path, nibabel image or :class:`~regpipe.imageio.Image`; intensities should be
        non-negative (MRI).
    mask
        Optional region (on the image's grid) where the bias field is estimated.
    shrink_factor
        Down-sampling factor of the estimation (4 is ANTs' default; 1 for tiny images).
    threads
        ITK threads for this call.

    Returns
    -------
    The corrected image (float32) on the input's grid.
    """
    import ants

    from regpipe.imageio import Image, check_same_grid, load_image

    source = load_image(image, "image", "image to bias-correct")
    data = source.data.astype(np.float32)
    shrink = max(1, min(int(shrink_factor), min(source.geometry.shape) // 8 or 1))
    ants_mask = None
    if mask is not None:
        region = load_image(mask, "mask", "bias-correction mask")
        check_same_grid(source, region, "bias-correction mask")
        ants_mask = to_ants_image((region.data != 0).astype(np.float32), region.geometry)
    with ants_settings(None, threads):
        corrected = ants.n4_bias_field_correction(
            to_ants_image(data, source.geometry), mask=ants_mask, shrink_factor=shrink
        )
    return Image(np.asarray(corrected.numpy(), dtype=np.float32), source.geometry, source.path,
                 source.header)
