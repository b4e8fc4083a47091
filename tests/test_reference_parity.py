"""Parity with the reference implementation (PyPI icon_registration 1.1.9, unigradicon 1.0.6).

Both networks get the same random weights (every parameter, batch-norm running statistics and
``lastConv`` included) and the same inputs; the GradICON noise is matched by seeding the CPU
generator before each objective. Everything runs on the CPU in float32.

Max abs differences measured (torch 2.13.0+cpu, 2 threads):

* official tree (``make_network(..., include_last_step=True)``) at 65^3: every U-Net output
  0, composed displacement 0, LNCC objective terms (all_loss, inverse consistency,
  similarity, transform magnitude, flips) 0: bitwise identical.
* narrow U-Nets, non-cubic 18x19x21 grid: squared-LNCC and MIND-SSC objectives with masks 0;
  batch of 2 (the reference interpolates the finest displacement at the identity grid when the
  batch is larger than 1, we add it directly): displacement 3.0e-7, all_loss 7.6e-6,
  GradICON term 5.2e-6 (of a large value: random weights fold heavily), similarity 0;
  one instance-optimisation step: displacements 1.2e-7 (gradient accumulation order).
* narrow U-Nets, 18x19x21, ``--intensity_conservation_loss`` objective (with and without
  masks) and ``--dice_loss_weight`` 0.7 objective (two shared labels, one label only in each
  map): all five terms 0 (bitwise); implied Dice term vs the reference's ``dice_loss`` 2.4e-7
  (recovered from a difference of two all_loss values); one instance-optimisation step with
  both options: displacements 2.4e-7.
* full-width instance-optimisation step at 65^3 (opt-in, REGPIPE_SLOW_TESTS=1): 2.4e-7.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.nn.functional as F

icon = pytest.importorskip("icon_registration")
unigradicon = pytest.importorskip("unigradicon")
from icon_registration import network_wrappers, networks  # noqa: E402
from icon_registration.itk_wrapper import finetune_execute  # noqa: E402

from regpipe.instance_opt import optimise_network_weights  # noqa: E402
from regpipe.losses import gradicon_objective  # noqa: E402
from regpipe.networks import NetworkConfig, build_network, load_weights  # noqa: E402

OFFICIAL_GRID = (65, 65, 65)  # the smallest grid the official tree accepts
NARROW_GRID = (18, 19, 21)
NARROW_DOWN, NARROW_UP = (4, 8, 16), (4, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


def random_state(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor, scaled like a trained network's."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    state = {}
    for key, value in template.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 1000, (), generator=generator)
        elif "batchNorms" in key and key.endswith(("weight", "running_var")):
            state[key] = uniform(value.shape, 0.5, 1.5)
        elif value.dim() > 1:
            bound = 1 / value[0].numel() ** 0.5
            if "lastConv" in key:
                bound *= 4  # displacements of a few voxels, some folds
            state[key] = uniform(value.shape, -bound, bound)
        else:
            state[key] = uniform(value.shape, -0.1, 0.1)
    return state


def smooth_images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(shape, generator=generator)
    return F.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)


def reference_unets(model) -> list[torch.nn.Module]:
    return [m for m in model.regis_net.modules() if isinstance(m, networks.UNet2)]


def run_reference(model, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its losses
        return model(*args, **kwargs)


def reference_displacement(model, moving, fixed) -> torch.Tensor:
    model.identity_map.isIdentity = True
    phi = model.regis_net(moving, fixed)
    return phi(model.identity_map) - model.identity_map


@pytest.fixture(scope="module")
def official():
    reference = unigradicon.make_network([1, 1, *OFFICIAL_GRID], include_last_step=True).eval()
    ours = build_network(NetworkConfig(grid_shape=OFFICIAL_GRID)).eval()
    state = random_state(reference.regis_net.state_dict(), seed=0)
    reference.regis_net.load_state_dict(state)
    load_weights(ours, state)
    moving = smooth_images((1, 1, *OFFICIAL_GRID), 1)
    fixed = smooth_images((1, 1, *OFFICIAL_GRID), 2)
    return reference, ours, moving, fixed


def test_each_unet_output_matches(official) -> None:
    reference, ours, moving, fixed = official
    captured: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    hooks = [
        unet.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for unet in reference_unets(reference)
    ] + [  # as step_displacements, but sharing the forward pass with displacement()
        unet.register_forward_hook(lambda _m, _i, out: steps.append(out)) for unet in ours.unets()
    ]
    with torch.no_grad():
        expected_field = reference_displacement(reference, moving, fixed)
        field = ours.displacement(moving, fixed)
    for hook in hooks:
        hook.remove()
    assert [tuple(s.shape[2:]) for s in steps] == [(17,) * 3, (33,) * 3, (65,) * 3, (65,) * 3]
    for ours_step, reference_step in zip(steps, captured, strict=True):
        assert (ours_step - reference_step).abs().max() == 0
    assert (field - expected_field).abs().max() == 0
    assert field.abs().max() > 0.02  # a real, non-identity map (in normalised units)


def test_lncc_objective_terms_match(official) -> None:
    reference, ours, moving, fixed = official
    with torch.no_grad():
        torch.manual_seed(7)
        expected = run_reference(reference, moving, fixed)
        torch.manual_seed(7)
        terms = gradicon_objective(ours, moving, fixed, "lncc", lam=1.5)
    for name, value, reference_value in zip(terms._fields, terms, expected, strict=True):
        assert float((value - reference_value).abs()) == 0, name
    assert terms.flips > 0


def narrow_reference(similarity, masking: bool = False, **options):
    """The official tree (3 resolutions + refinement) built from narrow reference U-Nets."""

    def step():
        unet = networks.UNet2(len(NARROW_DOWN), [[2, *NARROW_DOWN], list(NARROW_UP)], 3)
        return network_wrappers.FunctionFromVectorField(unet)

    tree = step()
    for _ in range(2):
        tree = network_wrappers.TwoStepRegistration(
            network_wrappers.DownsampleRegistration(tree, dimension=3), step()
        )
    tree = network_wrappers.TwoStepRegistration(tree, step())
    model = unigradicon.GradientICONSparse(
        tree, similarity, lmbda=1.5, loss_function_masking=masking, **options
    )
    model.assign_identity_map([1, 1, *NARROW_GRID])
    return model.eval()


@pytest.fixture(scope="module")
def narrow():
    config = NetworkConfig(NARROW_GRID, 4, NARROW_DOWN, NARROW_UP)
    ours = build_network(config).eval()
    state = random_state(ours.regis_net.state_dict(), seed=3)
    load_weights(ours, state)
    moving = smooth_images((2, 1, *NARROW_GRID), 4)
    fixed = smooth_images((2, 1, *NARROW_GRID), 5)
    masks = ((moving > moving.mean()).float(), (fixed > 0.45).float())
    return ours, state, moving, fixed, masks


@pytest.mark.parametrize(
    ("name", "similarity"),
    [
        ("lncc2", icon.losses.SquaredLNCC(sigma=5)),
        ("mind", icon.losses.MINDSSC(radius=2, dilation=2)),
    ],
)
def test_masked_objectives_match_on_a_non_cubic_grid(narrow, name, similarity) -> None:
    ours, state, moving, fixed, (mask_moving, mask_fixed) = narrow
    reference = narrow_reference(similarity, masking=True)
    reference.regis_net.load_state_dict(state)
    with torch.no_grad():
        torch.manual_seed(11)
        expected = run_reference(
            reference, moving[:1], fixed[:1], mask_A=mask_moving[:1], mask_B=mask_fixed[:1]
        )
        torch.manual_seed(11)
        terms = gradicon_objective(
            ours, moving[:1], fixed[:1], name, masks=(mask_moving[:1], mask_fixed[:1])
        )
    for field_name, value, reference_value in zip(terms._fields, terms, expected, strict=True):
        assert float((value - reference_value).abs()) == 0, field_name


def test_batch_of_two_matches_closely(narrow) -> None:
    ours, state, moving, fixed, _ = narrow
    reference = narrow_reference(icon.LNCC(sigma=5))
    reference.regis_net.load_state_dict(state)
    with torch.no_grad():
        torch.manual_seed(13)
        expected = run_reference(reference, moving, fixed)
        torch.manual_seed(13)
        terms = gradicon_objective(ours, moving, fixed, "lncc")
        field = ours.displacement(moving, fixed)
        expected_field = reference_displacement(reference, moving, fixed)
    assert (field - expected_field).abs().max() < 1e-6
    for name, value, reference_value in zip(
        terms._fields[:-1], terms[:-1], expected[:-1], strict=True
    ):
        assert float((value - reference_value).abs()) <= 1e-5 * max(1, abs(float(value))), name
    assert abs(float(terms.flips - expected.flips)) <= 2  # a cell or two may tip over


def compare_instance_optimisation(
    ours, reference, moving, fixed, steps: int, ours_options=None, reference_options=None
) -> float:
    torch.manual_seed(17)
    result = optimise_network_weights(
        ours, moving, fixed, steps=steps, progress=False, **(ours_options or {})
    )
    torch.manual_seed(17)
    with contextlib.redirect_stdout(io.StringIO()):
        finetune_execute(reference, moving, fixed, steps, 2e-5, **(reference_options or {}))
    with torch.no_grad():
        expected = reference.phi_AB(reference.identity_map) - reference.identity_map
        expected_inverse = reference.phi_BA(reference.identity_map) - reference.identity_map
    inverse_error = (result.inverse_displacement - expected_inverse).abs().max()
    return max(float((result.displacement - expected).abs().max()), float(inverse_error))


def test_instance_optimisation_steps_match(narrow) -> None:
    ours, state, moving, fixed, _ = narrow
    reference = narrow_reference(icon.LNCC(sigma=5))
    reference.regis_net.load_state_dict(state)
    with torch.no_grad():
        before = ours.displacement(moving[:1], fixed[:1])
    error = compare_instance_optimisation(ours, reference, moving[:1], fixed[:1], steps=1)
    assert error < 2e-6
    with torch.no_grad():  # both restored their weights
        assert torch.equal(ours.displacement(moving[:1], fixed[:1]), before)
    assert all(
        torch.equal(value, state[key]) for key, value in reference.regis_net.state_dict().items()
    )


def label_maps(images: torch.Tensor, levels: int, drop: int) -> torch.Tensor:
    """Integer label maps with ``levels`` intensity bands; label ``drop`` removed (-> 0)."""
    lo, hi = images.min(), images.max()
    labels = torch.clamp(((images - lo) / (hi - lo) * levels).floor(), 0, levels - 1) * 3
    return torch.where(labels == drop, torch.zeros_like(labels), labels)


@pytest.fixture(scope="module")
def narrow_segmentations(narrow):
    _, _, moving, fixed, _ = narrow
    # labels 3, 6, 9 (moving, 12 dropped) vs 3, 9, 12 (fixed, 6 dropped): 3 and 9 are shared,
    # 6 and 12 occur in one map only
    return label_maps(moving, 5, drop=12), label_maps(fixed, 5, drop=6)


@pytest.mark.parametrize("masking", [False, True])
def test_intensity_conservation_objective_matches(narrow, masking) -> None:
    ours, state, moving, fixed, (mask_moving, mask_fixed) = narrow
    reference = narrow_reference(
        icon.LNCC(sigma=5), masking=masking, apply_intensity_conservation_loss=True
    )
    reference.regis_net.load_state_dict(state)
    mask_kwargs = {"mask_A": mask_moving[:1], "mask_B": mask_fixed[:1]} if masking else {}
    masks = (mask_moving[:1], mask_fixed[:1]) if masking else None
    with torch.no_grad():
        torch.manual_seed(19)
        expected = run_reference(reference, moving[:1], fixed[:1], **mask_kwargs)
        torch.manual_seed(19)
        terms = gradicon_objective(
            ours, moving[:1], fixed[:1], "lncc", masks=masks, intensity_conservation=True
        )
        torch.manual_seed(19)
        plain = gradicon_objective(ours, moving[:1], fixed[:1], "lncc", masks=masks)
    for name, value, reference_value in zip(terms._fields, terms, expected, strict=True):
        assert float((value - reference_value).abs()) == 0, name
    assert float((terms.similarity_loss - plain.similarity_loss).abs()) > 1e-3


def test_dice_objective_matches(narrow, narrow_segmentations) -> None:
    ours, state, moving, fixed, _ = narrow
    seg_moving, seg_fixed = narrow_segmentations
    reference = narrow_reference(icon.LNCC(sigma=5), dice_loss_weight=0.7)
    reference.regis_net.load_state_dict(state)
    with torch.no_grad():
        torch.manual_seed(23)
        expected = run_reference(
            reference, moving[:1], fixed[:1],
            segmentation_A=seg_moving[:1], segmentation_B=seg_fixed[:1],
        )
        torch.manual_seed(23)
        terms = gradicon_objective(
            ours, moving[:1], fixed[:1], "lncc",
            segmentations=(seg_moving[:1], seg_fixed[:1]), dice_loss_weight=0.7,
        )
        torch.manual_seed(23)
        plain = gradicon_objective(ours, moving[:1], fixed[:1], "lncc")
    assert len(expected) == 6  # the reference adds its Dice term as a sixth field
    for name, value, reference_value in zip(terms._fields, terms, expected[:5], strict=True):
        assert float((value - reference_value).abs()) == 0, name
    dice = (terms.all_loss - plain.all_loss) / 0.7
    assert 0.1 < float(dice) < 2
    assert float((dice - expected.dice_loss).abs()) < 1e-6


def test_instance_optimisation_step_with_both_losses_matches(narrow, narrow_segmentations) -> None:
    ours, state, moving, fixed, _ = narrow
    seg_moving, seg_fixed = narrow_segmentations
    reference = narrow_reference(
        icon.LNCC(sigma=5), apply_intensity_conservation_loss=True, dice_loss_weight=0.7
    )
    reference.regis_net.load_state_dict(state)
    error = compare_instance_optimisation(
        ours, reference, moving[:1], fixed[:1], steps=1,
        ours_options={
            "intensity_conservation": True,
            "segmentations": (seg_moving[:1], seg_fixed[:1]),
            "dice_loss_weight": 0.7,
        },
        reference_options={"segmentation_A": seg_moving[:1], "segmentation_B": seg_fixed[:1]},
    )
    assert error < 2e-6


@pytest.mark.skipif(
    not os.environ.get("REGPIPE_SLOW_TESTS"), reason="about a minute; set REGPIPE_SLOW_TESTS=1"
)
def test_official_instance_optimisation_step_matches(official) -> None:
    reference, ours, moving, fixed = official
    assert compare_instance_optimisation(ours, reference, moving, fixed, steps=1) < 2e-6


@pytest.mark.parametrize("modality, options", [
    ("ct", {}), ("ct", {"ct_window": (-400.0, 600.0)}),
    ("mri", {}), ("mri", {"quantile_range": (0.01, 0.95)}),
])
def test_intensity_normalisation_matches(modality, options) -> None:
    """uniGradICON 1.0.6's ``preprocess`` against ours, on an image that reaches neither end
    of the CT window (a soft-tissue crop: scaled by the window, not by its own range)."""
    import itk
    import numpy as np

    from regpipe.preprocess import normalize_intensity

    rng = np.random.default_rng(0)
    data = rng.uniform(-200.0, 400.0, size=(12, 11, 10)).astype(np.float32)
    if modality == "mri":
        data = data + 300.0
    reference = np.asarray(unigradicon.preprocess(itk.image_from_array(data), modality,
                                                  **options))
    ours = normalize_intensity(data, modality, **options)
    assert np.abs(reference - ours).max() < 1e-6
