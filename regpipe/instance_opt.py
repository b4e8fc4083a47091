"""Instance optimisation: adapt a network to one image pair before predicting its map.

:func:`optimise_network_weights` is uniGradICON's method: a few Adam steps on *all* network
weights against the pair's own GradICON objective, then one prediction with the adapted
weights; the network's original weights are put back afterwards. It is accurate but costly
(about 2 minutes and 12 GB per step on 2 CPU cores at 175^3; 11-15 GB of GPU memory).

Example
-------
>>> result = optimise_network_weights(network, moving, fixed, steps=50)  # doctest: +SKIP
>>> result.displacement.shape  # doctest: +SKIP
torch.Size([1, 3, 175, 175, 175])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from regpipe.errors import InputError
from regpipe.losses import (
    Similarity,
    get_similarity,
    gradicon_objective,
    shared_label_one_hot,
)
from regpipe.networks.gradicon import RegistrationNetwork

__all__ = ["NetworkOptimisation", "optimise_network_weights"]


class NetworkOptimisation(NamedTuple):
    """Result of :func:`optimise_network_weights`.

    Attributes
    ----------
    displacement
        ``[B, 3, n0, n1, n2]`` pull-back displacement of moving onto fixed, ``phi_AB(x) - x``
        on the fixed grid, normalised units (channel ``c`` along tensor axis ``c + 2``).
    inverse_displacement
        The same for fixed onto moving (``phi_BA(x) - x`` on the moving grid).
    losses
        ``all_loss`` of the objective at every step (before that step's update).
    """

    displacement: torch.Tensor
    inverse_displacement: torch.Tensor
    losses: list[float]


def optimise_network_weights(
    network: RegistrationNetwork,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = 50,
    lr: float = 2e-5,
    similarity: str | Similarity = "lncc",
    lam: float = 1.5,
    masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    progress: bool = True,
    *,
    intensity_conservation: bool = False,
    segmentations: tuple[torch.Tensor, torch.Tensor] | None = None,
    dice_loss_weight: float = 0.0,
) -> NetworkOptimisation:
    """Fine-tune every weight of ``network`` on one pair, predict, restore the weights.

    Each step: zero the gradients, evaluate :func:`~regpipe.losses.gradicon_objective`
    (both directions, GradICON term drawing ``torch.randn`` on the CPU default generator, so
    ``torch.manual_seed`` makes a run reproducible on the CPU; on CUDA the backward passes of
    3-D ``grid_sample`` and of cuDNN convolutions are not deterministic, so repeated GPU runs
    differ at round-off level), back-propagate ``all_loss``, one Adam
    step (betas 0.9/0.999, no weight decay). The network stays in ``eval()`` mode
    (batch-norm running statistics are frozen). Afterwards both maps are predicted without
    gradients, and the original weights, ``requires_grad`` flags and train/eval mode are
    restored, also when an exception interrupts the optimisation.

    Parameters
    ----------
    network
        Network whose weights are adapted temporarily.
    moving, fixed
        ``[B, C, n0, n1, n2]`` preprocessed images on the network grid and device.
    steps
        Number of Adam steps (0 gives the plain network prediction).
    lr
        Adam learning rate.
    similarity
        ``"lncc"``, ``"lncc2"``, ``"mind"`` or a callable ``(warped, target, mask)``.
    lam
        Weight of the GradICON term.
    masks
        Optional ``(moving_mask, fixed_mask)`` restricting the similarity terms (see
        :func:`~regpipe.losses.gradicon_objective`).
    progress
        Show a tqdm progress bar with the current loss.
    intensity_conservation
        Jacobian-weighted similarity (uniGradICON's ``--intensity_conservation_loss``, for
        CT pairs); see :func:`~regpipe.losses.gradicon_objective`.
    segmentations
        ``(moving_labels, fixed_labels)`` on the network grid, for the Dice term.
    dice_loss_weight
        Weight of the Dice term (0 = none; > 0 needs ``segmentations``).

    Returns
    -------
    :class:`NetworkOptimisation` (``displacement`` first).

    Raises
    ------
    InputError
        For a negative ``steps``, a non-positive ``lr``, unusable images, a negative
        ``dice_loss_weight``, or a positive one without two segmentations sharing a label.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}")
    if not lr > 0:
        raise InputError(f"the learning rate must be positive, got {lr!r}")
    measure = get_similarity(similarity)
    network.check_pair(moving, fixed)
    dice_loss_weight = float(dice_loss_weight)
    if not dice_loss_weight >= 0:
        raise InputError(f"the Dice loss weight must be >= 0, got {dice_loss_weight!r}")
    if dice_loss_weight > 0:
        if segmentations is None or segmentations[0] is None or segmentations[1] is None:
            raise InputError("a Dice loss weight > 0 needs both segmentations")
        pairs = zip(segmentations, (moving, fixed), ("moving", "fixed"), strict=True)
        for labels, image, name in pairs:
            if labels.shape[0] != image.shape[0] or labels.shape[2:] != image.shape[2:]:
                raise InputError(
                    f"{name} segmentation shape {tuple(labels.shape)} does not match the "
                    f"image's {tuple(image.shape)}"
                )
        shared_label_one_hot(*segmentations)  # fail before touching the weights
    else:
        segmentations = None
    conserve_intensity = bool(intensity_conservation)

    saved = {key: value.detach().clone() for key, value in network.state_dict().items()}
    parameters = list(network.parameters())
    requires_grad = [parameter.requires_grad for parameter in parameters]
    was_training = network.training
    losses: list[float] = []
    try:
        network.eval()
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimiser = torch.optim.Adam(parameters, lr=lr)
        with tqdm(
            total=steps, disable=not progress, desc="instance optimisation", unit="step"
        ) as bar:
            for _ in range(steps):
                optimiser.zero_grad(set_to_none=True)
                terms = gradicon_objective(
                    network, moving, fixed, measure, lam, masks,
                    intensity_conservation=conserve_intensity, segmentations=segmentations,
                    dice_loss_weight=dice_loss_weight,
                )
                terms.all_loss.backward()
                optimiser.step()
                losses.append(float(terms.all_loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update()
        with torch.no_grad():
            forward = network.displacement(moving, fixed)
            inverse = network.displacement(fixed, moving)
    finally:
        with torch.no_grad():
            network.load_state_dict(saved)
        for parameter, flag in zip(parameters, requires_grad, strict=True):
            parameter.requires_grad_(flag)
            parameter.grad = None
        network.train(was_training)
    return NetworkOptimisation(forward, inverse, losses)
