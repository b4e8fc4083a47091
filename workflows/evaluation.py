"""Evaluation: the same measures for every method, computed from its written transforms."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from regpipe.workflows.interfaces import EvaluateRegistration


def init_eval_wf(
    *,
    has_fixed_mask: bool,
    has_labels: bool,
    name: str = "eval_wf",
) -> pe.Workflow:
    """Measure one registration (:func:`regpipe.workflows.steps.evaluate_registration`).

    Jacobian determinant map and folding (% of J <= 0, SD of log J), NCC before (identity)
    and after, inverse consistency (mm), Dice per label when both label maps exist, and the
    method's runtime and peak memory. Everything is measured inside the fixed mask, or where the
    preprocessed fixed image exceeds 0.05.

    Parameters
    ----------
    has_fixed_mask
        Whether ``inputnode.fixed_mask`` will be connected.
    has_labels
        Whether ``inputnode.fixed_labels`` and ``inputnode.moving_labels`` will be connected.

    Inputs
    ------
    fixed, moving
        The preprocessed images the method registered.
    forward_xfm, inverse_xfm
        The method's transform files.
    reg_metrics
        The method's JSON (runtime, peak memory, settings).
    fixed_mask, fixed_labels, moving_labels
        Optional region and label maps (RAS+, on the images' grids).

    Outputs
    -------
    jacobian
        Jacobian determinant of the forward transform on the fixed grid (NIfTI).
    metrics
        JSON with ``metrics`` (flat), ``dice`` (per label), ``settings``, ``method_metrics``.
    """
    workflow = pe.Workflow(name=name)
    fields = [
        "fixed",
        "moving",
        "forward_xfm",
        "inverse_xfm",
        "reg_metrics",
        "fixed_mask",
        "fixed_labels",
        "moving_labels",
    ]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["jacobian", "metrics"]), name="outputnode")
    evaluate = pe.Node(EvaluateRegistration(), name="evaluate", mem_gb=1.0)
    workflow.connect([
        (inputnode, evaluate, [(f, f) for f in fields[:5]]),
        (evaluate, outputnode, [("jacobian", "jacobian"), ("metrics", "metrics")]),
    ])  # fmt: skip
    if has_fixed_mask:
        workflow.connect([(inputnode, evaluate, [("fixed_mask", "fixed_mask")])])
    if has_labels:
        workflow.connect([
            (inputnode, evaluate, [("fixed_labels", "fixed_labels"),
                                   ("moving_labels", "moving_labels")]),
        ])  # fmt: skip
    return workflow
