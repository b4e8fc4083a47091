"""Pairwise registration: the public ``register`` function and its result.

Pipeline: load and check both images -> normalise intensities per modality -> optional affine
pre-alignment -> network on a grid laid over the fixed image -> optional instance optimisation
-> a :class:`~regpipe.transforms.GridTransform` (fixed -> moving) and its exact inverse ->
warped image and metrics.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from regpipe.errors import InputError
from regpipe.imageio import (
    Image,
    ImageKind,
    ImageLike,
    check_same_grid,
    load_image,
    save_image,
)
from regpipe.metrics import jacobian_determinant, registration_metrics
from regpipe.preprocess import check_modality, network_input, normalize_intensity, outlying_minimum
from regpipe.resources import peak_memory_mb
from regpipe.spaces import (
    GRID_MODES,
    Geometry,
    GridMode,
    index_grid,
    network_grid,
    ras_reoriented,
    sample_at_indices,
)
from regpipe.transforms import (
    AffineTransform,
    DisplacementField,
    GridTransform,
    Transform,
)
from regpipe.warp import warp_array

LOGGER = logging.getLogger("regpipe")

#: The most network passes ``register(network_passes=...)`` and the CLIs accept
MAX_NETWORK_PASSES = 10

AffineMethod = Literal["ours", "ants", "none"]
#: Regularisation weight asked of a conditional network when none is given.
DEFAULT_SMOOTHNESS = 1.5
IOMethod = Literal["fast", "network"]

#: Default largest size per axis of the fast instance-optimisation grid (``io_grid``).
MAX_IO_GRID = 160


@dataclass
class RegistrationResult:
    """Everything a registration produced.

    ``forward`` maps fixed-space points to moving-space points (resamples moving onto fixed);
    ``inverse`` maps moving-space points to fixed-space points. Both are in RAS+ mm: a
    :class:`~regpipe.transforms.GridTransform` for the network, any transform (for example an
    ANTs warp-then-affine chain, :mod:`regpipe.ants_methods`) for other methods.
    """

    forward: Transform
    inverse: Transform
    fixed: Image
    moving: Image
    warped: Image
    affine: AffineTransform | None
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    _jacobian: tuple[Transform, Image] | None = field(default=None, repr=False, compare=False)

    def forward_field(self) -> DisplacementField:
        """The forward transform as a dense field on the fixed image's grid."""
        return DisplacementField.from_transform(self.forward, self.fixed.geometry)

    def inverse_field(self) -> DisplacementField:
        """The inverse transform as a dense field on the moving image's grid."""
        return DisplacementField.from_transform(self.inverse, self.moving.geometry)

    def jacobian(self) -> Image:
        """Jacobian determinant of the forward transform on the fixed grid (computed once:
        the metrics and :meth:`save` share it)."""
        if self._jacobian is None or self._jacobian[0] is not self.forward:
            map_ = Image(jacobian_determinant(self.forward_field()), self.fixed.geometry,
                         header=self.fixed.header)
            self._jacobian = (self.forward, map_)
        return self._jacobian[1]

    def save(
        self,
        transform_out: str | os.PathLike | None = None,
        *,
        inverse_out: str | os.PathLike | None = None,
        warped_out: str | os.PathLike | None = None,
        jacobian_out: str | os.PathLike | None = None,
    ) -> None:
        """Write any of the outputs; each file is written atomically.

        Transform formats follow the suffix (see :mod:`regpipe.transform_files`): ``.h5`` or
        ``.hdf5`` for an ITK displacement-field transform, ``.nii.gz`` for an ITK/ANTs
        displacement-field image.
        """
        from regpipe.atomic import check_distinct_paths, check_output_folder
        from regpipe.imageio import check_image_path
        from regpipe.transform_files import check_field_path, write_transform

        # every name first: a bad last one must not leave the first files written
        for path in (transform_out, inverse_out):
            if path is not None:
                check_field_path(path)
        for path in (warped_out, jacobian_out):
            if path is not None:
                check_image_path(path, self.fixed.geometry)
        for path in (transform_out, inverse_out, warped_out, jacobian_out):
            if path is not None:
                check_output_folder(path)
        check_distinct_paths(
            {"transform_out": transform_out, "inverse_out": inverse_out,
             "warped_out": warped_out, "jacobian_out": jacobian_out},
            {"fixed": self.fixed.path, "moving": self.moving.path})
        # the transforms themselves, densified by write_transform on the images' grids (or on
        # a grid with orthogonal axes covering a sheared one: exact there too)
        if transform_out is not None:
            write_transform(self.forward, transform_out, reference=self.fixed.geometry)
        if inverse_out is not None:
            write_transform(self.inverse, inverse_out, reference=self.moving.geometry)
        if warped_out is not None:
            save_image(self.warped, warped_out)
        if jacobian_out is not None:
            save_image(self.jacobian(), jacobian_out)


def _load_network(weights: Any, device: torch.device):
    from regpipe.networks import RegistrationNetwork, network_from_file
    from regpipe.weights import resolve_weights

    if weights is None:
        return None, None
    if isinstance(weights, RegistrationNetwork):
        dtypes = {p.dtype for p in weights.parameters()}
        if dtypes - {torch.float32}:
            raise InputError(f"the network's parameters are {', '.join(map(str, dtypes))}: "
                             f"regpipe runs networks in float32 (call .float() on it)")
        return weights.to(device).eval(), None  # restored by register() afterwards
    if not isinstance(weights, (str, os.PathLike)):
        raise InputError(f"weights must be 'default', a registry name, a file path, a "
                         f"RegistrationNetwork or None, not {type(weights).__name__}")
    path = resolve_weights(weights)
    network = network_from_file(path)
    return network.to(device).eval(), path


def _capped(shape: tuple[int, int, int], most: int) -> tuple[int, int, int]:
    """``shape`` with every axis limited to ``most`` voxels."""
    return (min(shape[0], most), min(shape[1], most), min(shape[2], most))


def _own_grid_shape(geometry: Geometry, mode: str, most: int) -> tuple[int, int, int]:
    """Network-index shape of a grid of the fixed image's own resolution (at most ``most``
    per axis) in ``mode``'s axis order: ``isotropic`` and ``squash-ras`` place the image
    RAS-reoriented, so a coronal or sagittal file's few thick slices must stay on the axis
    they lie along (not on the file's third axis)."""
    if mode not in ("isotropic", "squash-ras"):
        return _capped(geometry.network_shape(), most)
    ras = ras_reoriented(geometry)
    if mode == "isotropic":  # one spacing: the finest voxel size (coarser when capped), and
        # each axis as many grid voxels as its extent needs (thick slices get more, not a
        # coarser grid on every axis)
        extent = np.asarray(ras.shape, dtype=np.float64) * ras.spacing
        spacing = max(float(ras.spacing.min()), float(extent.max()) / most)
        counts = np.maximum(np.ceil(extent / spacing - 1e-6), 2).astype(int)
        return _capped((int(counts[2]), int(counts[1]), int(counts[0])), most)
    return _capped(ras.network_shape(), most)


def _grid_mode(network: Any, grid_mode: str) -> GridMode:
    if grid_mode != "auto":
        if grid_mode not in GRID_MODES:
            raise InputError(
                f"grid mode must be auto, {', '.join(GRID_MODES)}, got {grid_mode!r}"
            )
        return grid_mode  # type: ignore[return-value]
    metadata = getattr(network, "metadata", None) or {}
    return metadata.get("grid_mode", "squash")


def _leaves_torch_state_alone(function):
    """Run ``function`` with the caller's torch random state, thread count and (for a network
    passed as ``weights``) its device and train/eval mode restored afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        network = kwargs.get("weights")
        state = None
        if isinstance(network, torch.nn.Module):
            first = next(network.parameters(), None)
            state = (network.training, None if first is None else first.device)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            # a notebook's `with torch.no_grad()` / `torch.inference_mode()` must not reach the
            # instance optimisation, which needs gradients (the network pass has its own no_grad)
            with torch.random.fork_rng(devices=devices), torch.inference_mode(False), \
                    torch.enable_grad():
                return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            if state is not None:
                network.train(state[0])
                if state[1] is not None:
                    network.to(state[1])

    return wrapper


@_leaves_torch_state_alone
def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    fixed_modality: str = "mri",
    moving_modality: str = "mri",
    weights: Any = "default",
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    fixed_segmentation: ImageLike | None = None,
    moving_segmentation: ImageLike | None = None,
    input_masking: bool = False,
    loss_masking: bool = True,
    affine: AffineMethod = "ours",
    grid_mode: str = "auto",
    io_iterations: int | None = 50,
    io_method: IOMethod = "fast",
    io_sim: str = "lncc",
    io_lr: float | None = None,
    io_grid: int = MAX_IO_GRID,
    io_options: Mapping[str, Any] | None = None,
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    quantile_range: tuple[float, float] = (0.0, 0.99),
    device: str = "auto",
    threads: int | None = None,
    seed: int | None = 0,
    mixed_precision: bool = False,
    symmetric: bool = True,
    network_passes: int = 1,
    progress: bool = True,
    intensity_conservation: bool = False,
    dice_loss_weight: float = 0.0,
    evaluate: bool = True,
    region: str | None = None,
    pair_type: str | None = None,
    smoothness: float | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``.

    Parameters
    ----------
    fixed, moving
        Paths, nibabel images or :class:`~regpipe.imageio.Image` objects (3-D).
    fixed_modality, moving_modality
        ``"mri"`` or ``"ct"``: selects the intensity normalisation.
    weights
        ``"default"``, a registry name (``"unigradicon"``, ``"multigradicon"``...), a
        checkpoint path, a :class:`~regpipe.networks.RegistrationNetwork`, or ``None`` for no
        network (affine plus instance optimisation only).
    fixed_mask, moving_mask
        Regions of interest on each image's grid; used by the similarity of instance
        optimisation when ``loss_masking`` is true (default; fast optimisation measures the
        similarity on the fixed grid, so it uses ``fixed_mask`` only), and to zero the network
        input when ``input_masking`` is true.
    fixed_segmentation, moving_segmentation
        Label maps; when both are given the result reports Dice per label.
    affine
        Affine pre-alignment composed into the result: ``"ours"`` (fast PyTorch, default),
        ``"ants"`` (antspyx) or ``"none"`` (uniGradICON's behaviour).
    grid_mode
        ``"squash"`` (uniGradICON), ``"isotropic"``, ``"squash-ras"`` (squash after
        reorienting to the closest RAS axes) or ``"auto"`` (what the weights' card says).
    io_iterations
        Instance-optimisation budget (default 50, like ``regpipe-register`` and the BIDS
        App); ``None`` or 0 gives the network's output alone.
    io_method
        ``"fast"`` (a displacement correction on top of the network, CPU friendly) or
        ``"network"`` (uniGradICON's optimisation of all network weights).
    io_sim, io_lr
        Similarity (``"lncc"``, ``"lncc2"``, ``"mind"``) and Adam learning rate (default
        2e-5) of ``io_method="network"``; the fast method uses LNCC and its own step sizes,
        and refuses other values.
    io_grid
        Largest size per axis of the grid fast instance optimisation works on (the fixed
        image's own grid, reduced; default 160). Smaller is faster and coarser.
    io_options
        Fields of :class:`regpipe.fast_io.FastIOSettings` for fast instance optimisation (for
        example ``{"level_steps": (2.0, 0.5)}``).
    device, threads, seed
        Compute device (``"auto"``, ``"cpu"``, ``"cuda"``), CPU threads, random seed. The
        caller's torch random state and thread count are restored when the call returns, as
        are the device and train/eval mode of a network passed as ``weights``.
    mixed_precision
        Run the network's forward pass with bfloat16 autocast on a CUDA device
        (:func:`regpipe.device.autocast`; the displacement is returned as float32 and the
        affine, the fast instance optimisation and the resampling stay float32). Ignored,
        with a log message, on the CPU. Recorded in ``result.settings["mixed_precision"]``
        (whether it was in effect). ``benchmarks/mixed_precision.py`` measures its effect.
    symmetric
        Use the mean of the network's moving -> fixed map and the inverse of its
        fixed -> moving map (two forward passes, the second with the images swapped): it
        cancels what the network does to any pair regardless of its images (a drift on
        identical images) and its direction bias. Measured on the development brain pairs
        with the bundled model alone: Dice 0.610 -> 0.627 at SD log J 0.164 -> 0.105.
        ``False``: one pass, as uniGradICON predicts. It does not apply to
        ``io_method="network"``, which returns the optimised network's one-pass prediction.
    network_passes
        Apply the network this many times (default 1): each further pass registers the
        moving image warped by the map so far (on the network grid) to the fixed image, and
        its map is composed with it; each pass is symmetric when ``symmetric`` is. Recorded in
        ``result.settings["network_passes"]``. More than 1 without a network or with
        ``io_method="network"`` (which returns the optimised network's single pass) is an
        error. ``regpipe-bench --network-passes N`` measures it.
    intensity_conservation
        uniGradICON's ``--intensity_conservation_loss``: Jacobian-weighted similarity in
        network instance optimisation (``io_method="network"``); both modalities must be CT.
    dice_loss_weight
        uniGradICON's ``--dice_loss_weight``: weight of a soft-Dice term on the shared labels
        of both segmentations (nearest-neighbour resampled onto the network grids) in network
        instance optimisation (``io_method="network"``); > 0 needs both segmentations.
    region, pair_type, smoothness
        The condition of a conditional network (:mod:`regpipe.networks.conditional`): body
        region (``brain``, ``head_neck``, ``thorax``, ``abdomen``, ``pelvis``, ``knee``,
        ``other``; default ``other``, since a pair of images says nothing about the anatomy),
        ``"inter"`` or ``"intra"`` (default ``inter``) and the regularisation weight lam
        (> 0, default 1.5; larger is smoother; a value outside the range the network was
        trained on is clamped to it, with a warning, and network instance optimisation uses
        it as its GradICON weight). Recorded in ``result.settings["condition"]`` (with
        ``lam_requested`` when clamped; ``None`` without a conditional network). Giving any
        of them with an unconditional network (or none) is an error: they would have no
        effect.
    evaluate
        Compute the metrics (default). ``False`` leaves only ``runtime_s`` and
        ``peak_memory_mb`` in ``result.metrics``, so a benchmark that evaluates every method
        with its own code (:mod:`regpipe.bench`) times the registration alone.

    Raises
    ------
    InputError
        Besides unusable inputs: ``intensity_conservation`` without two CT images, a
        negative ``dice_loss_weight`` or a positive one without both segmentations, and
        either option with ``io_method="fast"``; a condition (``region``, ``pair_type``,
        ``smoothness``) that is invalid or given for an unconditional network;
        ``network_passes`` outside 1-10, or above 1 without a network's own estimate.
    """
    from regpipe.device import autocast, select_device, set_threads

    started = time.perf_counter()
    if threads is not None:
        set_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)
    torch_device = select_device(device)
    mixed_precision = bool(mixed_precision)
    if mixed_precision and torch_device.type != "cuda":
        LOGGER.info("mixed precision applies on CUDA only: the network runs in float32 on %s",
                    torch_device)
        mixed_precision = False
    if not int(io_grid) >= 16:
        raise InputError(f"io_grid must be at least 16 voxels, got {io_grid!r}")
    if isinstance(network_passes, bool) or not (isinstance(network_passes, (int, np.integer))
                                                 and 1 <= network_passes <= MAX_NETWORK_PASSES):
        raise InputError(f"network_passes must be an integer from 1 to {MAX_NETWORK_PASSES}, "
                         f"got {network_passes!r}")
    fixed_modality = check_modality(fixed_modality)
    moving_modality = check_modality(moving_modality)
    if io_iterations and io_method == "fast" and (io_sim != "lncc" or io_lr is not None):
        raise InputError(
            "fast instance optimisation (io_method 'fast', the default) uses LNCC and its own "
            "step sizes (io_options); io_sim and io_lr apply to io_method 'network' "
            "(--io_method network)")
    dice_loss_weight = float(dice_loss_weight)
    _check_objective_options(
        intensity_conservation, dice_loss_weight, fixed_modality, moving_modality,
        fixed_segmentation is not None and moving_segmentation is not None, io_method,
        bool(io_iterations),
    )

    fixed_img = load_image(fixed, "image", "fixed image")
    moving_img = load_image(moving, "image", "moving image")
    images = {"fixed": fixed_img, "moving": moving_img}
    masks = _companions(images, {"fixed": fixed_mask, "moving": moving_mask}, "mask")
    segs = _companions(
        images, {"fixed": fixed_segmentation, "moving": moving_segmentation}, "labels"
    )

    if weights == "default":
        from regpipe.weights import default_weights_name

        weights = default_weights_name()
    network, weights_path = _load_network(weights, torch_device)
    condition = _condition(network, weights_path, region, pair_type, smoothness)
    if network_passes > 1 and (network is None or (io_iterations and io_method == "network")):
        raise InputError(
            f"network_passes={network_passes} repeats the network's own estimate, but "
            + ("there is no network" if network is None else
               "network instance optimisation returns the optimised network's single pass")
            + "; leave it at 1")
    grid_shape: tuple[int, int, int]
    if network is not None:
        grid_shape = tuple(network.config.grid_shape)
        mode = _grid_mode(network, grid_mode)
    else:  # no network: optimise on the fixed image's own voxel grid (at most io_grid per axis)
        mode = "squash" if grid_mode == "auto" else _grid_mode(None, grid_mode)
        grid_shape = _own_grid_shape(fixed_img.geometry, mode, io_grid)

    norm = {}
    for name, image, modality in (("fixed", fixed_img, fixed_modality),
                                  ("moving", moving_img, moving_modality)):
        try:
            norm[name] = normalize_intensity(
                image.data, modality, ct_window=ct_window, quantile_range=quantile_range,
                mask=masks[name].data if input_masking and name in masks else None,
            )
        except InputError as error:  # which image: the message is about its intensities
            raise InputError(f"{name} image {image.name}: {error}") from None
        if modality == "ct" and float(np.min(image.data)) > -500:
            LOGGER.warning(
                "%s image %s: no value below -500 (CT air is -1000 HU): it does not look like a "
                "CT in Hounsfield units (raw scanner values, a lost rescale intercept?), and the "
                "CT window %g..%g clips it; convert it to HU, or give it as MRI", name,
                image.name, *ct_window)
        outlier = (outlying_minimum(image.data)
                   if modality == "mri" and quantile_range[0] == 0 else None)
        if outlier is not None:
            LOGGER.warning(
                "%s image %s: its minimum (%g) lies far below almost all its voxels (0.1st "
                "percentile %g); MRI intensities are scaled from the minimum, as in "
                "uniGradICON, so this one value (a padding value?) squeezes the image's "
                "contrast and the registration suffers: clip or mask it, or scale from a "
                "quantile (quantile_range=(0.001, 0.99), --quantile_range 0.001 0.99)",
                name, image.name, *outlier)

    affine_tx = _prealign(affine, norm, fixed_img, moving_img, masks, progress)
    grid_in = network_grid(fixed_img.geometry, grid_shape, mode)
    # uniGradICON's placement of the moving image on its own squashed grid (voxel-index
    # correspondence), kept only for a network without pre-alignment; otherwise the moving
    # image is sampled through world space (identity or affine) on the fixed grid.
    squash_moving = affine_tx is None and mode == "squash" and network is not None
    if squash_moving:
        grid_out = network_grid(moving_img.geometry, grid_shape, "squash")
    else:
        matrix = np.eye(4) if affine_tx is None else affine_tx.matrix
        grid_out = matrix @ grid_in
    fixed_t = network_input(
        norm["fixed"], fixed_img.geometry, grid_in, grid_shape, squash=mode == "squash",
        device=torch_device,
    )
    moving_t = network_input(
        norm["moving"], moving_img.geometry, grid_out, grid_shape, squash=squash_moving,
        device=torch_device,
    )
    LOGGER.info("network grid %s (%s mode), device %s", grid_shape, mode, torch_device)
    view_region = fixed_t  # the fixed image before a partial view masks it (fast IO's region)
    if network is not None:  # a slab or small field of view: the network sees the overlap
        view = _moving_view(moving_img, grid_out, grid_shape, squash_moving, torch_device)
        from regpipe.fast_io import FastIOSettings

        foreground = (fixed_t > FastIOSettings().foreground).float()  # as fast IO counts it
        covered = float((foreground * view).sum())
        if 0 < covered < 0.99 * float(foreground.sum()):
            fixed_t = fixed_t * view
    if not bool(moving_t.abs().amax() > 0):
        raise InputError(f"the moving image does not overlap the fixed image in world space "
                         f"({affine} pre-alignment), so there is nothing to register: check the "
                         "images' origins, or pre-align them (affine='ours', --affine ours)")

    # network instance optimisation returns its own (single-pass) prediction
    own_estimate = network is not None and not (io_iterations and io_method == "network")
    two_passes = bool(symmetric and own_estimate)
    passes = int(network_passes)  # 1 without an own estimate (refused above otherwise)
    with _conditioned(network, condition):
        with autocast(torch_device, enabled=mixed_precision):
            displacement = _network_displacement(network, moving_t, fixed_t,
                                                 symmetric=two_passes, passes=passes).float()
        if io_iterations and io_method == "fast" and network is not None and not squash_moving:
            # Refine on the fixed image's own (finer) grid, not on the coarser network grid.
            io_shape = _own_grid_shape(fixed_img.geometry, mode, io_grid)
            if io_shape != grid_shape:
                grid_io = network_grid(fixed_img.geometry, io_shape, mode)
                displacement = _displacement_on_grid(displacement, grid_in, grid_io, io_shape)
                grid_in, grid_out, grid_shape = grid_io, matrix @ grid_io, io_shape
                fixed_t = network_input(norm["fixed"], fixed_img.geometry, grid_in, grid_shape,
                                        squash=mode == "squash", device=torch_device)
                moving_t = network_input(norm["moving"], moving_img.geometry, grid_out, grid_shape,
                                         device=torch_device)
                view_region = fixed_t
        if io_iterations:
            loss_masks = masks if loss_masking else {}
            displacement = _instance_optimise(
                io_method, network, moving_t, fixed_t, displacement, loss_masks, fixed_img,
                moving_img, grid_in, grid_out, grid_shape, squash_moving, mode, io_iterations,
                io_sim, io_lr, progress, intensity_conservation=intensity_conservation,
                dice_segmentations=segs if dice_loss_weight > 0 else {},
                dice_loss_weight=dice_loss_weight, io_options=io_options,
                lam=DEFAULT_SMOOTHNESS if condition is None else condition.lam,
                view_region=view_region,
            )
    forward = GridTransform(grid_in, displacement.detach().to("cpu", torch.float32)[0], grid_out)
    inverse = forward.inverse()

    # with the metrics, the normalised moving image is warped in the same pass (a 2nd channel)
    channels = [moving_img.data.astype(np.float32)] + ([norm["moving"]] if evaluate else [])
    warped_data = warp_array(np.stack(channels, axis=-1), moving_img.geometry, forward,
                             fixed_img.geometry)
    warped = Image(warped_data[..., 0], fixed_img.geometry, header=fixed_img.header)
    result = RegistrationResult(forward, inverse, fixed_img, moving_img, warped, affine_tx)
    optimised = bool(io_iterations)
    result.settings = {
        "weights": (
            str(weights_path) if weights_path else (None if network is None else "in-memory")
        ),
        "grid_shape": list(grid_shape),
        "grid_mode": mode,
        "affine": affine,
        "io_iterations": int(io_iterations or 0),
        **_io_settings(optimised, io_method, io_sim, io_grid, io_options,
                       intensity_conservation, dice_loss_weight),
        "seed": seed,
        "device": str(torch_device),
        "mixed_precision": mixed_precision,
        "symmetric": two_passes,
        "network_passes": passes,
        "fixed_modality": fixed_modality,
        "moving_modality": moving_modality,
        "condition": _condition_record(condition, smoothness),
    }
    if evaluate:
        result.metrics = registration_metrics(result, norm, masks, segs,
                                              after=warped_data[..., 1])
        result.metrics["inverse_consistency_voxels"] = forward.inverse_consistency(inverse)
    result.metrics["runtime_s"] = time.perf_counter() - started
    result.metrics["peak_memory_mb"] = peak_memory_mb()
    return result


def _companions(
    images: Mapping[str, Image], sources: Mapping[str, ImageLike | None], kind: ImageKind
) -> dict[str, Image]:
    """Load the masks or label maps (``kind``) given for the images, each checked to be on
    its image's grid."""
    what = "mask" if kind == "mask" else "segmentation"
    loaded = {}
    for name, source in sources.items():
        if source is not None:
            companion = load_image(source, kind, f"{name} {what}")
            check_same_grid(images[name], companion, f"{name} {what}")
            loaded[name] = companion
    return loaded


def _io_settings(
    optimised: bool, io_method: str, io_sim: str, io_grid: int,
    io_options: Mapping[str, Any] | None, intensity_conservation: bool, dice_loss_weight: float,
) -> dict[str, Any]:
    """The instance-optimisation entries of ``RegistrationResult.settings`` (``None`` when
    there was none, and ``io_grid`` only for the fast method)."""
    return {
        "io_method": io_method if optimised else None,
        "io_sim": io_sim if optimised else None,
        "io_grid": int(io_grid) if optimised and io_method == "fast" else None,
        "io_options": dict(io_options) if optimised and io_options else None,
        "intensity_conservation": bool(intensity_conservation) if optimised else None,
        "dice_loss_weight": dice_loss_weight if optimised else None,
    }


def _condition(
    network: Any, weights_path: Path | None, region: str | None, pair_type: str | None,
    smoothness: float | None,
) -> Any:
    """The :class:`~regpipe.networks.Condition` for a conditional network, else ``None``.

    Raises :class:`InputError` when a condition is given for an unconditional network.
    """
    from regpipe.networks import Condition, is_conditional

    given = {k: v for k, v in (("region", region), ("pair_type", pair_type),
                               ("smoothness", smoothness)) if v is not None}
    if not is_conditional(network):
        if given:
            what = ("there is no network" if network is None else
                    f"the weights {weights_path or '(in memory)'} are not conditional")
            raise InputError(
                f"{', '.join(given)}: these options steer a conditional network, but {what}; "
                "choose conditional weights or leave them out"
            )
        return None
    condition = Condition("other" if region is None else region,
                          "inter" if pair_type is None else pair_type,
                          DEFAULT_SMOOTHNESS if smoothness is None else smoothness)
    clamped = network.conditioning.clamp_lam(condition.lam)
    if clamped != condition.lam:
        LOGGER.warning("smoothness %g is outside the range the network was trained on "
                       "(%g to %g): using %g", condition.lam, *network.conditioning.lam_range,
                       clamped)
        condition = Condition(condition.region, condition.pair_type, clamped)
    LOGGER.info("condition: region %s, %s-subject, smoothness (lam) %g", condition.region,
                condition.pair_type, condition.lam)
    return condition


def _condition_record(condition: Any, smoothness: float | None) -> dict[str, Any] | None:
    """The condition used, plus the smoothness asked for when it was clamped."""
    if condition is None:
        return None
    record = condition.to_dict()
    if smoothness is not None and float(smoothness) != condition.lam:
        record["lam_requested"] = float(smoothness)
    return record


def _conditioned(network: Any, condition: Any) -> Any:
    """``network.conditioned(condition)``, or a no-op without a condition."""
    return nullcontext() if condition is None else network.conditioned(condition)


def _displacement_on_grid(
    displacement: torch.Tensor, grid_from: np.ndarray, grid_to: np.ndarray, shape: tuple[int, ...]
) -> torch.Tensor:
    """The same map's displacement on another grid over the same fixed space, index units.

    Both grids share the pre-alignment ``M`` (``grid_out = M @ grid_in``), so for an index
    ``p`` of ``grid_to``, with ``A = grid_from^-1 @ grid_to``: ``U_to(p) = A^-1 U(A p)`` (the
    linear part of ``A^-1`` turns ``grid_from`` index steps into ``grid_to`` index steps).
    """
    from regpipe.spaces import index_grid, sample_at_indices

    to_from = np.linalg.inv(grid_from) @ grid_to
    a = torch.as_tensor(to_from, dtype=torch.float32, device=displacement.device)
    index = index_grid(shape, displacement.device)
    points = torch.einsum("ij,bj...->bi...", a[:3, :3], index) + a[:3, 3].view(1, 3, 1, 1, 1)
    sampled = sample_at_indices(displacement.float(), points, padding="border")
    back = torch.linalg.inv(a[:3, :3])
    return torch.einsum("ij,bj...->bi...", back, sampled).to(displacement.dtype)


def _check_objective_options(
    intensity_conservation: bool, dice_loss_weight: float, fixed_modality: str,
    moving_modality: str, both_segmentations: bool, io_method: str, optimising: bool = True,
) -> None:
    """uniGradICON's checks of ``--intensity_conservation_loss`` and ``--dice_loss_weight``
    (without instance optimisation they act on nothing, so the method is not checked)."""
    if not dice_loss_weight >= 0:  # also NaN
        raise InputError(f"the Dice loss weight must be >= 0, got {dice_loss_weight!r}")
    if intensity_conservation and (fixed_modality != "ct" or moving_modality != "ct"):
        raise InputError("the intensity conservation loss is only supported for CT images "
                         "(both modalities must be ct)")
    if dice_loss_weight > 0 and not both_segmentations:
        raise InputError("a Dice loss weight > 0 needs both the fixed and the moving "
                         "segmentation")
    if (intensity_conservation or dice_loss_weight > 0) and io_method != "network" and optimising:
        raise InputError("the intensity conservation loss and the Dice loss apply to network "
                         "instance optimisation only: use io_method 'network' "
                         "(--io_method network)")


def _prealign(
    method: str, norm: dict, fixed: Image, moving: Image, masks: dict, progress: bool
) -> AffineTransform | None:
    if method in (None, "none", False):
        return None
    from regpipe.affine import affine_register
    from regpipe.ants_affine import ants_affine_register

    for image, name in ((moving, "moving"), (fixed, "fixed")):
        if min(image.geometry.shape) < 4:  # measured: a 2-slice slab squashed 5x, 3 slices 8 %
            LOGGER.warning("the %s image has only %d voxels along one axis: a 12-parameter "
                           "affine cannot tell scaling along it from misalignment; if the "
                           "images are already aligned use affine='none' (--affine none)",
                           name, min(image.geometry.shape))

    fixed_mask = masks["fixed"].data if "fixed" in masks else None
    moving_mask = masks["moving"].data if "moving" in masks else None
    if method == "ours":
        func = affine_register
    elif method == "ants":
        func = ants_affine_register
    else:
        raise InputError(f"affine method must be ours, ants or none, got {method!r}")
    started = time.perf_counter()
    result = func(norm["fixed"], fixed.geometry, norm["moving"], moving.geometry,
                  fixed_mask=fixed_mask, moving_mask=moving_mask)
    LOGGER.info("affine pre-alignment (%s): %.1f s", method, time.perf_counter() - started)
    return result


@torch.no_grad()
def _network_displacement(
    network: Any, moving_t: torch.Tensor, fixed_t: torch.Tensor, symmetric: bool = False,
    passes: int = 1,
) -> torch.Tensor:
    """Network displacement ``[1, 3, n0, n1, n2]`` in grid-index units (zeros without network);
    ``symmetric``: the mean of the moving -> fixed displacement and the inverse of the
    fixed -> moving one; ``passes``: the network applied again to the moving image warped by
    the map so far, and the maps composed (see :func:`register`)."""
    total = _one_pass(network, moving_t, fixed_t, symmetric)
    if network is None or passes == 1:
        return total
    total = total.float()
    identity = index_grid(tuple(total.shape[2:]), total.device)
    for _ in range(passes - 1):
        warped = sample_at_indices(moving_t.float(), identity + total, padding="zeros")
        step = _one_pass(network, warped.to(moving_t.dtype), fixed_t, symmetric).float()
        # x -> x + step(x) + total(x + step(x)): the new map first, then the one so far
        total = step + sample_at_indices(total, identity + step, padding="border")
    return total


def _one_pass(
    network: Any, moving_t: torch.Tensor, fixed_t: torch.Tensor, symmetric: bool
) -> torch.Tensor:
    shape = moving_t.shape[2:]
    if network is None:
        return torch.zeros((1, 3, *shape), device=moving_t.device)
    scale = torch.tensor([n - 1 for n in shape], device=moving_t.device).view(1, 3, 1, 1, 1)
    forward = network.displacement(moving_t, fixed_t) * scale.to(moving_t.dtype)
    if not symmetric:
        return forward
    backward = network.displacement(fixed_t, moving_t) * scale.to(moving_t.dtype)
    identity = np.eye(4)  # index space: the inversion needs no world coordinates
    inverse = GridTransform(identity, backward[0].float(), identity).inverse().displacement
    return (forward + inverse[None].to(forward.dtype)) / 2


def _moving_view(moving_img, grid_out, grid_shape, squash_moving, device) -> torch.Tensor:
    """1 where the affinely placed moving image has data on the grid, 0 outside its view:
    the grid points whose moving voxel index lies within the image (computed from the
    matrices, axis by axis; resampling a volume of ones cost 0.3-0.5 s per registration)."""
    if squash_moving:  # the grid is the moving image's own
        return torch.ones((1, 1, *grid_shape), device=device)
    to_voxel = np.linalg.inv(moving_img.geometry.affine) @ grid_out
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid_shape]
    view = torch.ones(tuple(grid_shape), dtype=torch.bool, device=device)
    for row, size in enumerate(moving_img.geometry.shape):
        index = float(to_voxel[row, 3]) + sum(
            float(to_voxel[row, c]) * axes[c].view([-1 if a == c else 1 for a in range(3)])
            for c in range(3))
        view &= (index >= -0.5) & (index <= size - 0.5)
    return view.float()[None, None]


def _within_moving_view(fixed_mask, fixed_t, moving_img, grid_out, grid_shape, squash_moving,
                        foreground: float):
    """The fixed region the optimisation compares, cut to where the (affinely placed) moving
    image has data, and that view: a slab or a small field of view inside a large fixed image
    would otherwise be pulled towards the zeros outside it. ``(fixed_mask, None)`` (``None``
    mask included) when the moving image covers the whole region."""
    view = _moving_view(moving_img, grid_out, grid_shape, squash_moving, fixed_t.device)
    region = (fixed_mask != 0).float() if fixed_mask is not None else \
        (fixed_t > foreground).float()
    inside = float((region * view).sum())
    if inside >= 0.99 * float(region.sum()) or inside == 0:
        return fixed_mask, None
    LOGGER.info("the moving image covers %.0f %% of the fixed region: instance optimisation "
                "compares them there only", 100 * inside / max(float(region.sum()), 1.0))
    return region * view, view


def _instance_optimise(
    method, network, moving_t, fixed_t, displacement, masks, fixed_img, moving_img,
    grid_in, grid_out, grid_shape, squash_moving, mode, steps, sim, lr, progress,
    intensity_conservation=False, dice_segmentations=None, dice_loss_weight=0.0, io_options=None,
    lam=DEFAULT_SMOOTHNESS, view_region=None,
) -> torch.Tensor:
    from regpipe import fast_io, instance_opt

    mask_t = {}
    seg_t = {}
    for name, image, grid, squash in (
        ("fixed", fixed_img, grid_in, mode == "squash"),
        ("moving", moving_img, grid_out, squash_moving),
    ):
        if name in masks:
            mask_t[name] = network_input(
                (masks[name].data != 0).astype(np.float32), image.geometry, grid, grid_shape,
                squash=squash, nearest=True, device=fixed_t.device,
            )
        if dice_segmentations and name in dice_segmentations:
            seg_t[name] = network_input(
                dice_segmentations[name].data, image.geometry, grid, grid_shape,
                squash=squash, nearest=True, device=fixed_t.device,
            )
    if method == "network":
        if network is None:
            raise InputError("io_method 'network' needs a network; use io_method 'fast'")
        kwargs = {} if lr is None else {"lr": lr}
        optimised = instance_opt.optimise_network_weights(
            network, moving_t, fixed_t, steps=steps, similarity=sim,
            masks=(mask_t.get("moving"), mask_t.get("fixed")) if mask_t else None,
            progress=progress, intensity_conservation=intensity_conservation,
            segmentations=(seg_t["moving"], seg_t["fixed"]) if len(seg_t) == 2 else None,
            dice_loss_weight=dice_loss_weight if len(seg_t) == 2 else 0.0, lam=lam, **kwargs,
        )
        normalised = optimised.displacement
        scale = torch.tensor([n - 1 for n in grid_shape], dtype=normalised.dtype,
                             device=normalised.device)
        return normalised * scale.view(1, 3, 1, 1, 1)
    if method == "fast":
        if intensity_conservation or dice_loss_weight > 0:
            raise InputError("the intensity conservation and Dice losses need io_method "
                             "'network'")
        spacing = [float(np.linalg.norm(grid_in[:3, axis])) for axis in range(3)]
        fixed_mask, view = _within_moving_view(
            mask_t.get("fixed"), fixed_t if view_region is None else view_region, moving_img,
            grid_out, grid_shape, squash_moving,
            float(dict(io_options or {}).get("foreground", fast_io.FastIOSettings().foreground)))
        if view is not None:
            # the similarity's windows at the view's edge must not see fixed-image data the
            # moving image has no counterpart for (they stretched an aligned slab by ~20 %)
            fixed_t = fixed_t * view
        return fast_io.optimise_displacement(
            moving_t, fixed_t, displacement, steps=steps, fixed_mask=fixed_mask,
            grid_spacing_mm=spacing, progress=progress, **dict(io_options or {}),
        )
    raise InputError(f"io method must be fast or network, got {method!r}")
