"""Registration workflows: the foundation network and each ANTs method, one contract.

Every factory here has the same ``inputnode`` / ``outputnode``, so the caller wires all
methods identically and every method receives the same preprocessed images.

Inputs
------
fixed, moving
    Preprocessed images (:func:`regpipe.workflows.preprocessing.init_preproc_wf`).
fixed_mask, moving_mask
    Optional masks on those grids (similarity masks).

Outputs
-------
forward_xfm
    ITK HDF5 transform, fixed -> moving points (resamples moving onto the fixed grid).
inverse_xfm
    ITK HDF5 transform, moving -> fixed points.
warped
    The moving image resampled on the fixed grid through ``forward_xfm``.
reg_metrics
    JSON: the method's metrics (runtime, peak memory...), settings and the ``GeneratedBy``
    entries of the transform sidecars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from regpipe.workflows.interfaces import AntsRegistration, NetworkRegistration

FIELDS_IN = ["fixed", "moving", "fixed_mask", "moving_mask"]
FIELDS_OUT = ["forward_xfm", "inverse_xfm", "warped", "reg_metrics"]

#: Memory estimates (GB) given to the scheduler, per method (1 mm brain, CPU).
# ANTs SyN peaked at 3.3 GB on 1 mm brains (README, development benchmark)
MEM_GB = {"network": 4.0, "ants-syn": 4.0, "ants-synquick": 2.0, "ants-affine": 1.0}


def _connect(
    workflow: pe.Workflow, node: pe.Node, has_fixed_mask: bool, has_moving_mask: bool
) -> None:
    inputnode = pe.Node(niu.IdentityInterface(fields=FIELDS_IN), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=FIELDS_OUT), name="outputnode")
    workflow.connect([
        (inputnode, node, [("fixed", "fixed"), ("moving", "moving")]),
        (node, outputnode, [(field, field) for field in FIELDS_OUT]),
    ])  # fmt: skip
    if has_fixed_mask:
        workflow.connect([(inputnode, node, [("fixed_mask", "fixed_mask")])])
    if has_moving_mask:
        workflow.connect([(inputnode, node, [("moving_mask", "moving_mask")])])


def init_network_reg_wf(
    *,
    weights: str | None,
    weights_name: str | None = None,
    weights_sha256: str | None = None,
    modality: str = "mri",
    affine_init: str = "ours",
    io_iterations: int = 0,
    device: str = "auto",
    omp_nthreads: int = 1,
    seed: int | None = None,
    mixed_precision: bool = False,
    network_passes: int = 1,
    has_fixed_mask: bool = False,
    has_moving_mask: bool = False,
    condition: Mapping[str, Any] | None = None,
    name: str = "network_reg_wf",
) -> pe.Workflow:
    """Register with the foundation network (:func:`regpipe.register`).

    Parameters
    ----------
    weights
        Checkpoint file (resolved by the caller; ``None``: affine and instance optimisation
        only).
    weights_name, weights_sha256
        Recorded in the transform sidecars (the SHA-256 is computed when not given).
    modality
        ``"mri"`` or ``"ct"``.
    affine_init
        Affine pre-alignment: ``"ours"``, ``"ants"`` or ``"none"``.
    io_iterations
        Instance-optimisation steps (0: none).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    omp_nthreads
        CPU threads of the node (torch intra-op threads).
    seed
        Random seed (``None``: not seeded).
    mixed_precision
        bfloat16 autocast of the network on CUDA (float32 on the CPU).
    network_passes
        Times the network is applied (:func:`regpipe.register`).
    has_fixed_mask, has_moving_mask
        Whether the mask inputs will be connected.
    condition
        For conditional weights: ``{"region", "pair_type", "smoothness"}`` (``None`` values:
        the defaults of :func:`regpipe.register`); recorded in the transform sidecars.

    Inputs / Outputs: see :mod:`regpipe.workflows.registration`.
    """
    workflow = pe.Workflow(name=name)
    network_reg = pe.Node(
        NetworkRegistration(
            modality=modality, affine_init=affine_init, io_iterations=int(io_iterations or 0),
            device=device, threads=omp_nthreads, mixed_precision=bool(mixed_precision),
            network_passes=int(network_passes),
        ),
        name="network_reg",
        n_procs=omp_nthreads,
        mem_gb=MEM_GB["network"],
    )  # fmt: skip
    if weights is not None:
        network_reg.inputs.weights = str(weights)
    if weights_name:
        network_reg.inputs.weights_name = weights_name
    if weights_sha256:
        network_reg.inputs.weights_sha256 = weights_sha256
    if seed is not None:
        network_reg.inputs.seed = int(seed)
    for key, value in (condition or {}).items():
        if value is not None:
            setattr(network_reg.inputs, key, value)
    _connect(workflow, network_reg, has_fixed_mask, has_moving_mask)
    return workflow


def init_ants_reg_wf(
    *,
    method: str,
    modality: str = "mri",
    omp_nthreads: int = 1,
    seed: int | None = None,
    has_fixed_mask: bool = False,
    has_moving_mask: bool = False,
    name: str | None = None,
) -> pe.Workflow:
    """Register with ANTs through antspyx (:func:`regpipe.ants_methods.ants_register`).

    Parameters
    ----------
    method
        ``"syn"``, ``"synquick"`` or ``"affine"`` (``"ants-"`` prefix accepted).
    modality
        ``"mri"`` or ``"ct"`` (normalisation of the method's own similarity metrics).
    omp_nthreads
        ITK threads of the node (one when ``seed`` is given: ANTs is only deterministic
        single-threaded).
    seed
        Random seed: deterministic ANTs (``ants.set_ants_deterministic``).
    has_fixed_mask, has_moving_mask
        Whether the mask inputs will be connected.
    name
        Defaults to ``ants_<method>_reg_wf``.

    Inputs / Outputs: see :mod:`regpipe.workflows.registration`.
    """
    from regpipe.ants_methods import ANTS_METHODS

    method = method.removeprefix("ants-")
    if method not in ANTS_METHODS:
        raise ValueError(
            f"unknown ANTs method {method!r}: choose one of {', '.join(ANTS_METHODS)}"
        )
    workflow = pe.Workflow(name=name or f"ants_{method}_reg_wf")
    threads = 1 if seed is not None else omp_nthreads
    ants_reg = pe.Node(
        AntsRegistration(method=method, modality=modality, threads=threads),
        name="ants_reg",
        n_procs=threads,
        mem_gb=MEM_GB[f"ants-{method}"],
    )
    if seed is not None:
        ants_reg.inputs.seed = int(seed)
    _connect(workflow, ants_reg, has_fixed_mask, has_moving_mask)
    return workflow
