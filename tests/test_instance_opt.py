"""uniGradICON-style instance optimisation of the network weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.instance_opt import optimise_network_weights
from regpipe.networks import NetworkConfig, build_network


def smooth(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, 20, 20, 20, generator=generator)
    return F.avg_pool3d(noise, 3, stride=1, padding=1, count_include_pad=False)


@pytest.fixture
def network():
    net = build_network(NetworkConfig((20, 20, 20), 2, (4, 8, 8), (4, 8, 8)))
    torch.manual_seed(0)
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter.data, std=0.02)
    return net.train()  # the function must switch to eval() and back


def snapshot(network) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in network.state_dict().items()}


def test_returns_both_displacements_and_restores_everything(network) -> None:
    moving, fixed = smooth(1), smooth(2)
    before = snapshot(network)
    network.unets()[0].lastConv.bias.requires_grad_(False)
    result = optimise_network_weights(network, moving, fixed, steps=3, lr=1e-3, progress=False)
    assert result.displacement.shape == result.inverse_displacement.shape == (1, 3, 20, 20, 20)
    assert len(result.losses) == 3
    assert all(torch.equal(value, before[key]) for key, value in network.state_dict().items())
    assert network.training
    assert not network.unets()[0].lastConv.bias.requires_grad
    assert all(parameter.grad is None for parameter in network.parameters())
    with torch.no_grad():
        plain = network.eval().displacement(moving, fixed)
    assert (result.displacement - plain).abs().max() > 0  # the weights did change meanwhile


def test_zero_steps_give_the_network_prediction(network) -> None:
    moving, fixed = smooth(1), smooth(2)
    result = optimise_network_weights(network, moving, fixed, steps=0, progress=False)
    with torch.no_grad():
        expected = network.eval().displacement(moving, fixed)
    assert torch.equal(result.displacement, expected)
    assert result.losses == []


def test_loss_decreases(network) -> None:
    moving, fixed = smooth(1), smooth(2)
    result = optimise_network_weights(network, moving, fixed, steps=6, lr=1e-3, progress=False)
    assert result.losses[-1] < result.losses[0]


def test_weights_are_restored_after_an_error(network) -> None:
    before = snapshot(network)
    calls = []

    def failing_similarity(warped, target, mask=None):
        calls.append(1)
        if len(calls) > 2:  # fail in the second step, after one update
            raise RuntimeError("boom")
        return ((warped - target) ** 2).mean()

    with pytest.raises(RuntimeError, match="boom"):
        optimise_network_weights(
            network,
            smooth(1),
            smooth(2),
            steps=5,
            lr=1e-2,
            similarity=failing_similarity,
            progress=False,
        )
    assert all(torch.equal(value, before[key]) for key, value in network.state_dict().items())
    assert network.training


@pytest.mark.parametrize(("steps", "lr"), [(-1, 2e-5), (2, 0.0), (2, -1.0)])
def test_invalid_settings_raise_input_error(network, steps, lr) -> None:
    with pytest.raises(InputError):
        optimise_network_weights(network, smooth(1), smooth(2), steps=steps, lr=lr)


def test_reference_losses_are_accepted_and_checked(network) -> None:
    moving, fixed = smooth(1), smooth(2)
    segs = ((moving > moving.mean()).float() * 5, (fixed > fixed.mean()).float() * 5)
    before = snapshot(network)
    result = optimise_network_weights(
        network, moving, fixed, steps=2, lr=1e-3, progress=False, intensity_conservation=True,
        segmentations=segs, dice_loss_weight=0.5,
    )
    assert len(result.losses) == 2
    assert all(torch.equal(value, before[key]) for key, value in network.state_dict().items())
    for kwargs in ({"dice_loss_weight": 1.0}, {"dice_loss_weight": -1.0},
                   {"dice_loss_weight": 1.0, "segmentations": (segs[0], segs[1] * 2)},
                   {"dice_loss_weight": 1.0, "segmentations": (segs[0][..., :4], segs[1])}):
        with pytest.raises(InputError):
            optimise_network_weights(network, moving, fixed, steps=1, progress=False, **kwargs)
