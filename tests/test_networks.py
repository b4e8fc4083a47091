"""The uniGradICON network: official checkpoint layout, configurations, weights files."""

from __future__ import annotations

import pytest
import torch

from regpipe.errors import InputError, WeightsError
from regpipe.networks import (
    NetworkConfig,
    RegistrationNetwork,
    UNet2,
    build_network,
    infer_config,
    load_weights,
    min_unet_input_size,
    network_from_file,
    read_checkpoint,
    save_weights,
    warp_normalised,
)

# The released Step_2_final.trch: 4 U-Nets (coarse to fine) x 47 tensors.
OFFICIAL_PREFIXES = (
    "netPhi.netPhi.net.netPhi.net.net.",
    "netPhi.netPhi.net.netPsi.net.",
    "netPhi.netPsi.net.",
    "netPsi.net.",
)
DOWN = ((16, 2), (32, 16), (64, 32), (256, 64), (512, 256))
UP = ((48, 16), (96, 32), (192, 64), (512, 128), (512, 256))
BN = (16, 32, 64, 128, 256)


def official_suffix_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (out, inp) in enumerate(DOWN):
        shapes[f"downConvs.{i}.weight"] = (out, inp, 3, 3, 3)
        shapes[f"downConvs.{i}.bias"] = (out,)
    for i, (inp, out) in enumerate(UP):
        shapes[f"upConvs.{i}.weight"] = (inp, out, 4, 4, 4)
        shapes[f"upConvs.{i}.bias"] = (out,)
    for i, channels in enumerate(BN):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"batchNorms.{i}.{name}"] = (channels,)
        shapes[f"batchNorms.{i}.num_batches_tracked"] = ()
    shapes["lastConv.weight"] = (3, 18, 3, 3, 3)
    shapes["lastConv.bias"] = (3,)
    return shapes


TINY = NetworkConfig(grid_shape=(17, 17, 17), n_steps=1, down_channels=(4, 8), up_channels=(4, 8))


def tiny(n_steps: int = 4, grid: int = 33) -> NetworkConfig:
    return NetworkConfig(
        grid_shape=(grid, grid, grid),
        n_steps=n_steps,
        down_channels=(4, 8, 8),
        up_channels=(4, 8, 8),
    )


def test_official_key_set_and_shapes() -> None:
    network = build_network(NetworkConfig.unigradicon(), device="meta")
    state = network.regis_net.state_dict()
    suffixes = official_suffix_shapes()
    assert len(suffixes) == 47
    expected = [prefix + suffix for prefix in OFFICIAL_PREFIXES for suffix in suffixes]
    assert list(state) == expected  # same keys, same order (188)
    for prefix in OFFICIAL_PREFIXES:
        for suffix, shape in suffixes.items():
            assert tuple(state[prefix + suffix].shape) == shape, prefix + suffix
    assert sum(p.numel() for p in network.parameters()) == 70_680_916
    assert network.state_dict().keys() == {f"regis_net.{k}" for k in state}  # grids not saved


def test_official_config_values() -> None:
    config = NetworkConfig.unigradicon()
    assert config.grid_shape == (175, 175, 175)
    assert config.n_steps == 4
    assert config.unet_grid_shapes() == [(44,) * 3, (88,) * 3, (175,) * 3, (175,) * 3]
    assert config.min_grid_size == 65


def test_step1_tree_has_141_keys_without_leading_netphi() -> None:
    step1 = build_network(NetworkConfig(n_steps=3), device="meta").regis_net.state_dict()
    step2 = build_network(NetworkConfig(n_steps=4), device="meta").regis_net.state_dict()
    assert len(step1) == 141
    assert {f"netPhi.{key}" for key in step1} <= set(step2)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory):
    """A bare state dict in the official layout (random values), saved like the release."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for prefix in OFFICIAL_PREFIXES:
        for suffix, shape in official_suffix_shapes().items():
            if suffix.endswith("num_batches_tracked"):
                state[prefix + suffix] = torch.tensor(7)
            else:
                state[prefix + suffix] = torch.rand(shape, generator=generator)
    path = tmp_path_factory.mktemp("weights") / "Step_2_final.trch"
    torch.save(state, path)
    return path, state


def test_strict_load_of_official_layout(official_file) -> None:
    path, state = official_file
    network = build_network(NetworkConfig(grid_shape=(65, 65, 65)))
    load_weights(network, path)
    loaded = network.regis_net.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_network_from_bare_official_file_gets_official_config(official_file) -> None:
    path, _ = official_file
    network = network_from_file(path)
    assert network.config == NetworkConfig.unigradicon()
    assert not network.training
    assert network.metadata == {}


def test_mismatched_weights_list_missing_unexpected_and_shapes(tmp_path) -> None:
    path = save_weights(build_network(tiny(n_steps=2)), tmp_path / "two.trch")
    with pytest.raises(WeightsError) as error:
        load_weights(build_network(tiny(n_steps=3)), path)
    message = str(error.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "netPhi.net.netPhi.net.net.downConvs.0.weight" in message  # a missing key
    wide = NetworkConfig((33, 33, 33), 2, (4, 8, 16), (4, 8, 8))
    with pytest.raises(WeightsError, match=r"shape mismatches \(\d+\): .*downConvs.2"):
        load_weights(build_network(wide), path)


def test_long_mismatch_lists_are_abbreviated() -> None:
    with pytest.raises(WeightsError, match=r"unexpected keys \(50\): .*\(\+42 more\)"):
        load_weights(build_network(TINY), {f"x{i}": torch.zeros(1) for i in range(50)})


def test_wrapped_state_dicts_are_accepted() -> None:
    source = build_network(TINY)
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter)
    state = source.regis_net.state_dict()
    for wrapped in ({"state_dict": state}, {"model": state}, source.state_dict()):
        target = load_weights(build_network(TINY), wrapped)
        assert torch.equal(
            target.regis_net.net.lastConv.weight, source.regis_net.net.lastConv.weight
        )


def test_save_and_rebuild_from_file_with_config_and_card(tmp_path) -> None:
    config = tiny(n_steps=3)
    network = build_network(config)
    torch.nn.init.normal_(network.unets()[0].lastConv.weight)
    path = save_weights(network, tmp_path / "sub" / "w.trch", {"name": "tiny", "epochs": 3})
    checkpoint = read_checkpoint(path)
    assert checkpoint.config == config and checkpoint.card == {"name": "tiny", "epochs": 3}
    rebuilt = network_from_file(path)
    assert rebuilt.config == config
    assert rebuilt.metadata == {"name": "tiny", "epochs": 3}
    assert torch.equal(rebuilt.unets()[0].lastConv.weight, network.unets()[0].lastConv.weight)


def test_infer_config_from_bare_state_dict() -> None:
    config = tiny(n_steps=2)
    state = build_network(config).regis_net.state_dict()
    assert infer_config(state, grid_shape=(33, 33, 33)) == config


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_unreadable_file_raises_weights_error(tmp_path, content) -> None:
    path = tmp_path / "bad.trch"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError):
        network_from_file(path)


def test_a_file_that_is_no_checkpoint_says_so(tmp_path) -> None:
    import gzip

    path = tmp_path / "fixed.nii.gz"  # an image given as weights by mistake
    path.write_bytes(gzip.compress(b"\x5c\x01" + bytes(400)))
    with pytest.raises(WeightsError, match="is not a PyTorch weights file"):
        network_from_file(path)


def test_a_bare_state_dict_that_is_not_unigradicons_is_warned_about(tmp_path, caplog) -> None:
    config = tiny(n_steps=1)
    torch.save(build_network(config).regis_net.state_dict(), tmp_path / "sd.pt")
    with caplog.at_level("WARNING", logger="regpipe"):
        network_from_file(tmp_path / "sd.pt")
    assert "bare state dict" in caplog.text and "save_weights" in caplog.text


@pytest.mark.parametrize("n_steps", [1, 2, 3, 4])
def test_small_configs_build_and_run(n_steps: int) -> None:
    config = NetworkConfig((20, 24, 28), n_steps, (4, 8, 8), (4, 8, 8), input_channels=2)
    network = build_network(config).eval()
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    moving, fixed = torch.rand(2, 2, 20, 24, 28), torch.rand(2, 2, 20, 24, 28)
    with torch.no_grad():
        field = network.displacement(moving, fixed)
        steps = network.step_displacements(moving, fixed)
    assert field.shape == (2, 3, 20, 24, 28)
    assert field.abs().max() > 0
    assert [tuple(s.shape[2:]) for s in steps] == config.unet_grid_shapes()
    assert len(network.unets()) == n_steps


@pytest.mark.parametrize(
    ("grid", "n_steps", "levels"), [(64, 4, 5), (64, 3, 5), (32, 2, 5), (16, 1, 5), (16, 4, 3)]
)
def test_too_small_grid_raises_input_error(grid: int, n_steps: int, levels: int) -> None:
    channels = (4,) * levels
    with pytest.raises(InputError, match="too small"):
        NetworkConfig((grid, 100, 100), n_steps, channels, channels)
    NetworkConfig((grid + 1, 100, 100), n_steps, channels, channels)  # the minimum works


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_min_unet_input_size_is_exact(levels: int) -> None:
    unet = UNet2((2,) * levels, (2,) * levels).eval()
    size = min_unet_input_size(levels)
    with torch.no_grad():
        unet(torch.zeros(1, 1, size, size, size), torch.zeros(1, 1, size, size, size))
        with pytest.raises(RuntimeError):
            small = torch.zeros(1, 1, size - 1, size, size)
            unet(small, small)


@pytest.mark.parametrize(
    "values",
    [
        {"n_steps": 5},
        {"grid_shape": (65, 65)},
        {"down_channels": (4, 8), "up_channels": (4,)},
        {"input_channels": 0},
    ],
)
def test_invalid_configs_raise_input_error(values) -> None:
    with pytest.raises(InputError):
        NetworkConfig(**{"grid_shape": (65, 65, 65), **values})


def test_config_dict_round_trip() -> None:
    config = tiny(n_steps=2)
    assert NetworkConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="unknown"):
        NetworkConfig.from_dict({**config.to_dict(), "depth": 3})


def test_untrained_network_is_the_identity() -> None:
    network = build_network(tiny()).eval()
    moving, fixed = torch.rand(1, 1, 33, 33, 33), torch.rand(1, 1, 33, 33, 33)
    with torch.no_grad():
        assert torch.equal(network.displacement(moving, fixed), torch.zeros(1, 3, 33, 33, 33))
        points = torch.rand(1, 3, 5, 6, 7)
        torch.testing.assert_close(network.map(moving, fixed)(points), points)


def test_identity_grid_is_float64_index_over_n_minus_1() -> None:
    network = build_network(NetworkConfig((17, 18, 20), 1, (4, 8), (4, 8)))
    grid = network.identity_grid
    assert grid.shape == (1, 3, 17, 18, 20) and grid.dtype == torch.float32
    expected = (torch.arange(18, dtype=torch.float64) / 17).to(torch.float32)
    assert torch.equal(grid[0, 1, 0, :, 0], expected)
    assert grid[0, 0].max() == 1 and grid[0, 2].min() == 0


def test_displacement_is_a_pull_back_along_tensor_axes() -> None:
    """A constant displacement of one voxel along channel 0 samples moving one slice later."""
    n = 17
    network = build_network(NetworkConfig((n, n, n), 1, (4, 8), (4, 8))).eval()
    with torch.no_grad():
        network.regis_net.net.lastConv.bias.copy_(torch.tensor([10.0 / (n - 1), 0.0, 0.0]))
    moving, fixed = torch.rand(1, 1, n, n, n), torch.rand(1, 1, n, n, n)
    with torch.no_grad():
        field = network.displacement(moving, fixed)
        phi = network.map(moving, fixed)
        warped = warp_normalised(moving, phi(network.identity_grid))
    torch.testing.assert_close(field[:, 0], torch.full((1, n, n, n), 1 / (n - 1)))
    assert field[:, 1:].abs().max() == 0
    torch.testing.assert_close(warped[:, :, :-1], moving[:, :, 1:])


def test_wrong_input_shape_raises_input_error() -> None:
    network = build_network(tiny())
    good = torch.zeros(1, 1, 33, 33, 33)
    for bad in (torch.zeros(1, 1, 32, 33, 33), torch.zeros(1, 2, 33, 33, 33), torch.zeros(33, 33)):
        with pytest.raises(InputError):
            network.displacement(bad, good)
    with pytest.raises(InputError, match="batches differ"):
        network.displacement(torch.zeros(2, 1, 33, 33, 33), good)


def test_registration_network_defaults_to_official_config() -> None:
    network = RegistrationNetwork(device="meta")
    assert network.config == NetworkConfig.unigradicon()
