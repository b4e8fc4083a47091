"""Similarity measures, the GradICON regulariser and the objective on small volumes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.losses import (
    cell_jacobian_determinant,
    count_flips,
    gaussian_blur,
    get_similarity,
    gradicon_objective,
    gradicon_regulariser,
    lncc_loss,
    masked_mean,
    mind_ssc,
    mind_ssc_loss,
    shared_label_one_hot,
    soft_dice_loss,
    squared_lncc_loss,
)
from regpipe.networks import DisplacementMap, NetworkConfig, build_network
from regpipe.spaces import identity_grid


def smooth_volume(seed: int, shape=(1, 1, 24, 24, 24)) -> torch.Tensor:
    """Smooth noise with zero mean and unit variance."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(shape, generator=generator)
    volume = F.avg_pool3d(noise, 3, stride=1, padding=1, count_include_pad=False)
    return (volume - volume.mean()) / volume.std()


def test_gaussian_blur_keeps_constants_away_from_the_border() -> None:
    blurred = gaussian_blur(torch.ones(1, 2, 30, 30, 30))
    torch.testing.assert_close(blurred[:, :, 10:-10, 10:-10, 10:-10], torch.ones(1, 2, 10, 10, 10))
    assert blurred[0, 0, 0, 0, 0] < 0.6  # zero padding, no renormalisation


def test_lncc_of_identical_and_linearly_related_images_is_zero() -> None:
    image = smooth_volume(0)
    assert lncc_loss(image, image) < 1e-3
    assert lncc_loss(3 * image, image) < 1e-3
    assert squared_lncc_loss(image, image) < 2e-3


def test_lncc_sees_inversion_squared_lncc_does_not() -> None:
    image = smooth_volume(0)
    assert lncc_loss(-image, image) > 1.99
    assert squared_lncc_loss(-image, image) < 2e-3


def test_lncc_of_unrelated_images_is_near_one() -> None:
    assert 0.8 < float(lncc_loss(smooth_volume(0), smooth_volume(1))) < 1.2


def test_masked_mean_uses_only_mask_voxels_per_sample() -> None:
    values = torch.arange(8.0).view(2, 1, 2, 2, 1)
    mask = torch.zeros_like(values)
    mask[0, 0, 0] = 1  # sample 0: values 0, 1
    mask[1, 0, 1, 1] = 5  # sample 1: value 7 (any non-zero counts)
    assert masked_mean(values, mask) == pytest.approx((0.5 + 7) / 2)
    assert masked_mean(values, torch.ones_like(values)) == pytest.approx(3.5)
    assert masked_mean(values, None) == pytest.approx(3.5)


def test_masked_lncc_ignores_what_is_outside_the_mask() -> None:
    shape = (1, 1, 40, 12, 12)
    image, other = smooth_volume(0, shape), smooth_volume(1, shape)
    mixed = image.clone()
    mixed[:, :, 20:] = other[:, :, 20:]
    mask = torch.zeros_like(image)
    mask[:, :, :9] = 1  # further than the window's radius (10) from the changed half
    assert lncc_loss(mixed, image, mask) < 1e-3
    assert lncc_loss(mixed, image) > 0.2


def test_mind_ssc_descriptor_shape_range_and_intensity_invariance() -> None:
    image = smooth_volume(0)
    descriptor = mind_ssc(image)
    assert descriptor.shape == (1, 12, 24, 24, 24)
    assert descriptor.min() > 0 and descriptor.max() <= 1
    torch.testing.assert_close(mind_ssc(5 * image + 1), descriptor, atol=1e-4, rtol=1e-4)
    assert mind_ssc_loss(image, image) == 0
    assert mind_ssc_loss(smooth_volume(1), image) > 0.01


def test_mind_ssc_needs_single_channel_images() -> None:
    with pytest.raises(InputError):
        mind_ssc(torch.rand(1, 2, 8, 8, 8))


def test_similarity_shape_mismatch_raises_input_error() -> None:
    with pytest.raises(InputError):
        lncc_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(InputError):
        lncc_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8))


def test_get_similarity_by_name_or_callable() -> None:
    assert get_similarity("lncc") is lncc_loss
    assert get_similarity("lncc2") is squared_lncc_loss
    assert get_similarity("mind") is mind_ssc_loss
    assert get_similarity(lncc_loss) is lncc_loss
    with pytest.raises(InputError, match="unknown similarity"):
        get_similarity("ssd")


def test_shared_label_one_hot_keeps_only_labels_in_both_maps() -> None:
    a = torch.tensor([0, 1, 2, 5]).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    b = torch.tensor([0, 2, 5, 7]).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    one_hot_a, one_hot_b, valid = shared_label_one_hot(a, b)
    assert one_hot_a.shape == (1, 2, 4, 2, 2)  # labels 2 and 5
    assert one_hot_a[0, 0, 2].all() and one_hot_b[0, 0, 1].all()
    assert valid.all()
    with pytest.raises(InputError):
        shared_label_one_hot(a, torch.full_like(b, 9))


def test_soft_dice_of_equal_and_disjoint_masks() -> None:
    masks = torch.zeros(1, 2, 4, 4, 4)
    masks[:, 0, :2] = 1
    masks[:, 1, 2:] = 1
    assert soft_dice_loss(masks, masks) == pytest.approx(0, abs=1e-6)
    assert soft_dice_loss(masks, masks.flip(1)) == pytest.approx(1, abs=1e-6)
    valid = torch.tensor([[True, False]])
    assert soft_dice_loss(masks, masks * torch.tensor([1.0, 0]).view(1, 2, 1, 1, 1), valid) == 0


class ScaleMap:
    """``x -> centre + s (x - centre)``."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, coordinates: torch.Tensor, on_identity: bool = False) -> torch.Tensor:
        return 0.5 + self.scale * (coordinates - 0.5)


def test_gradicon_regulariser_is_zero_for_inverse_pairs_and_translations() -> None:
    identity = identity_grid((16, 16, 16))
    assert gradicon_regulariser(ScaleMap(2.0), ScaleMap(0.5), identity) < 1e-8
    shift = DisplacementMap(torch.full((1, 3, 16, 16, 16), 0.01))
    assert gradicon_regulariser(shift, shift, identity) < 1e-6  # constant error: no gradient


def test_gradicon_regulariser_of_a_scaling_error() -> None:
    """``e(p) = -0.1 p`` has Jacobian ``-0.1 I``: three directions of ``0.01 / 3`` each."""
    identity = identity_grid((16, 16, 16))
    loss = gradicon_regulariser(ScaleMap(1.1), ScaleMap(1.0), identity)
    assert float(loss) == pytest.approx(0.01, rel=1e-3)


def test_count_flips() -> None:
    identity = identity_grid((5, 6, 7))
    assert count_flips(identity) == 0
    mirrored = identity.clone()
    mirrored[:, 1] = 1 - mirrored[:, 1]
    assert count_flips(torch.cat([mirrored, identity])) == 4 * 5 * 6 / 2


@pytest.fixture(scope="module")
def tiny_network():
    config = NetworkConfig((24, 24, 24), 2, (4, 8, 8), (4, 8, 8))
    return build_network(config).eval()


def test_objective_of_identical_images_and_untrained_network_is_zero(tiny_network) -> None:
    image = smooth_volume(0)
    terms = gradicon_objective(tiny_network, image, image)
    assert float(terms.similarity_loss.detach()) < 2e-3
    assert float(terms.inverse_consistency_loss.detach()) < 1e-8
    assert terms.transform_magnitude.item() == 0 and terms.flips.item() == 0
    assert float(terms.all_loss.detach()) == pytest.approx(
        float(terms.similarity_loss.detach()), abs=1e-6
    )


@pytest.mark.parametrize("similarity", ["lncc", "lncc2", "mind"])
def test_objective_is_differentiable_with_masks(tiny_network, similarity) -> None:
    moving, fixed = smooth_volume(0), smooth_volume(1)
    mask = torch.zeros_like(fixed)
    mask[:, :, 4:20, 4:20, 4:20] = 1
    terms = gradicon_objective(tiny_network, moving, fixed, similarity, masks=(None, mask))
    terms.all_loss.backward()
    grad = tiny_network.unets()[-1].lastConv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny_network.zero_grad(set_to_none=True)


def test_objective_noise_follows_the_cpu_seed(tiny_network) -> None:
    for parameter in tiny_network.parameters():
        torch.nn.init.normal_(parameter.data, std=0.05)  # not the identity any more
    moving, fixed = smooth_volume(0), smooth_volume(1)
    with torch.no_grad():
        torch.manual_seed(1)
        first = gradicon_objective(tiny_network, moving, fixed)
        torch.manual_seed(1)
        again = gradicon_objective(tiny_network, moving, fixed)
        other = gradicon_objective(tiny_network, moving, fixed)
    assert torch.equal(first.inverse_consistency_loss, again.inverse_consistency_loss)
    assert not torch.equal(first.inverse_consistency_loss, other.inverse_consistency_loss)
    assert first.transform_magnitude > 0


def test_cell_jacobian_determinant_of_identity_and_scaling() -> None:
    grid = identity_grid((6, 7, 8))
    assert torch.allclose(cell_jacobian_determinant(grid), torch.ones(1, 1, 5, 6, 7))
    scaled = grid * torch.tensor([2.0, 1.0, 0.5]).view(1, 3, 1, 1, 1)
    assert torch.allclose(cell_jacobian_determinant(scaled), torch.ones(1, 1, 5, 6, 7))
    assert torch.allclose(cell_jacobian_determinant(grid * 2), torch.full((1, 1, 5, 6, 7), 8.0))


def test_objective_with_intensity_conservation_and_dice(tiny_network) -> None:
    moving, fixed = smooth_volume(1).abs(), smooth_volume(2).abs()
    segs = ((moving > 0.5).float() * 2, (fixed > 0.5).float() * 2)
    terms = gradicon_objective(
        tiny_network, moving, fixed, intensity_conservation=True, segmentations=segs,
        dice_loss_weight=1.0,
    )
    assert len(terms) == 5 and bool(torch.isfinite(terms.all_loss))
    without_dice = 1.5 * terms.inverse_consistency_loss + terms.similarity_loss
    assert float(terms.all_loss.detach()) >= float(without_dice.detach()) - 1e-5  # Dice term >= 0
    terms.all_loss.backward()
    assert any(p.grad is not None for p in tiny_network.parameters())
    with pytest.raises(InputError, match="segmentations"):
        gradicon_objective(tiny_network, moving, fixed, dice_loss_weight=1.0)
    with pytest.raises(InputError, match="share no"):
        gradicon_objective(tiny_network, moving, fixed, segmentations=(segs[0], segs[1] * 2),
                           dice_loss_weight=1.0)
