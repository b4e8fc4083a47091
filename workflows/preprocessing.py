"""Preprocessing shared by every registration method (so comparisons are fair)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from regpipe.workflows.interfaces import BiasCorrect, ConformImage, NormalizeImage


def init_preproc_wf(
    *,
    modality: str,
    bias_correct: bool,
    has_mask: bool,
    has_labels: bool,
    omp_nthreads: int,
    name: str = "preproc_wf",
) -> pe.Workflow:
    """Conform, bias-correct, mask and normalise one image (and its mask and labels).

    Steps: check the file and reorient it to RAS+ (image, mask and label map alike, so they
    stay on one grid); N4 bias-field correction (antspyx; MRI only, when ``bias_correct``),
    estimated inside the mask when there is one; zero outside the brain mask (when given);
    per-modality scaling of intensities to [0, 1] (:func:`regpipe.preprocess.normalize_intensity`).

    Parameters
    ----------
    modality
        ``"mri"`` or ``"ct"`` (CT is never bias-corrected).
    bias_correct
        Run N4 (templates are already bias-corrected: the caller passes ``False`` for them).
    has_mask, has_labels
        Whether ``inputnode.mask`` / ``inputnode.labels`` will be connected.
    omp_nthreads
        Threads of the N4 node.

    Inputs
    ------
    in_file
        The image (any orientation).
    mask
        Optional brain mask on the image's grid.
    labels
        Optional label map on the image's grid.

    Outputs
    -------
    out_file
        The preprocessed image: RAS+, float32, intensities in [0, 1], 0 outside the mask.
    mask
        The mask reoriented to RAS+ (``Undefined`` without mask).
    labels
        The label map reoriented to RAS+ (``Undefined`` without labels).
    """
    if modality not in ("mri", "ct"):
        raise ValueError(f"modality must be 'mri' or 'ct', got {modality!r}")
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["in_file", "mask", "labels"]), name="inputnode"
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["out_file", "mask", "labels"]), name="outputnode"
    )

    conform = pe.Node(ConformImage(kind="image"), name="conform", mem_gb=0.5)
    normalize = pe.Node(NormalizeImage(modality=modality), name="normalize", mem_gb=0.5)
    workflow.connect([(inputnode, conform, [("in_file", "in_file")])])

    if has_mask:
        conform_mask = pe.Node(ConformImage(kind="mask"), name="conform_mask", mem_gb=0.5)
        workflow.connect([
            (inputnode, conform_mask, [("mask", "in_file")]),
            (conform_mask, normalize, [("out_file", "mask")]),
            (conform_mask, outputnode, [("out_file", "mask")]),
        ])  # fmt: skip
    if has_labels:
        conform_labels = pe.Node(ConformImage(kind="labels"), name="conform_labels", mem_gb=0.5)
        workflow.connect([
            (inputnode, conform_labels, [("labels", "in_file")]),
            (conform_labels, outputnode, [("out_file", "labels")]),
        ])  # fmt: skip

    if bias_correct and modality == "mri":
        n4 = pe.Node(
            BiasCorrect(threads=omp_nthreads), name="n4", n_procs=omp_nthreads, mem_gb=1.0
        )
        workflow.connect([
            (conform, n4, [("out_file", "in_file")]),
            (n4, normalize, [("out_file", "in_file")]),
        ])  # fmt: skip
        if has_mask:
            workflow.connect([(conform_mask, n4, [("out_file", "mask")])])
    else:
        workflow.connect([(conform, normalize, [("out_file", "in_file")])])

    workflow.connect([(normalize, outputnode, [("out_file", "out_file")])])
    return workflow
