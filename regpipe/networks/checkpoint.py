"""Reading and writing network weights: the official layout and regpipe's own files.

Two file layouts are read, always with ``torch.load(path, map_location="cpu",
weights_only=True)`` (no arbitrary pickles):

official
    A bare state dict of ``RegistrationNetwork.regis_net`` (uniGradICON's
    ``Step_2_final.trch``: 188 tensors).
regpipe
    ``{"state_dict": <bare state dict>, "config": NetworkConfig.to_dict(), "card": {...}}``,
    written by :func:`save_weights`. ``{"model": <state dict>}`` is accepted as well.

Example
-------
>>> import tempfile
>>> from regpipe.networks import NetworkConfig, build_network, save_weights, network_from_file
>>> config = NetworkConfig(grid_shape=(17, 17, 17), n_steps=1,
...                        down_channels=(4, 8), up_channels=(4, 8))
>>> folder = tempfile.mkdtemp()
>>> path = save_weights(build_network(config), f"{folder}/tiny.trch", {"name": "tiny"})
>>> network_from_file(path).config == config
True
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regpipe.errors import InputError, WeightsError
from regpipe.networks.gradicon import NetworkConfig, RegistrationNetwork, build_network

__all__ = [
    "Checkpoint",
    "infer_config",
    "load_weights",
    "network_from_file",
    "read_checkpoint",
    "save_weights",
]

#: How many keys of each kind a mismatch message names before abbreviating.
LISTED_KEYS = 8

StateDict = Mapping[str, torch.Tensor]
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Checkpoint:
    """Content of a weights file.

    Attributes
    ----------
    state_dict
        Tensors of ``regis_net`` (official key names).
    config
        The saved configuration, or ``None`` for a bare (official-layout) state dict.
    card
        Free-form metadata saved with the weights (empty for official files).
    """

    state_dict: dict[str, torch.Tensor]
    config: NetworkConfig | None = None
    card: dict[str, Any] = field(default_factory=dict)


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else ""
        raise WeightsError(
            f"{path} is not a loadable weights file (torch.load with weights_only=True failed: "
            f"{type(exc).__name__}: {first_line})"
        ) from None


def _as_checkpoint(obj: Any, origin: str) -> Checkpoint:
    """Interpret a loaded object as a :class:`Checkpoint` (see module docstring)."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{origin} holds a {type(obj).__name__}, not a state dict")
    config: NetworkConfig | None = None
    card: dict[str, Any] = {}
    if "state_dict" in obj or "model" in obj:
        state = obj["state_dict"] if "state_dict" in obj else obj["model"]
        if obj.get("config") is not None:
            try:
                config = NetworkConfig.from_dict(obj["config"])
            except (InputError, TypeError) as exc:
                raise WeightsError(f"{origin} has an invalid network config: {exc}") from None
        card = dict(obj.get("card") or {})
    else:
        state = obj
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{origin} does not contain a non-empty state dict")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsError(f"{origin}: entries are not tensors: {_abbreviate(bad)}")
    tensors = dict(state)
    if all(key.startswith("regis_net.") for key in tensors):  # a whole-model state dict
        tensors = {key[len("regis_net.") :]: value for key, value in tensors.items()}
    return Checkpoint(tensors, config, card)


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Load a weights file of either layout (CPU tensors, ``weights_only=True``).

    Raises
    ------
    WeightsError
        When the file is missing, unreadable or not a state dict.
    """
    path = Path(path).expanduser()
    return _as_checkpoint(_torch_load(path), str(path))


def _abbreviate(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED_KEYS])
    more = len(items) - LISTED_KEYS
    return f"{shown}, ... (+{more} more)" if more > 0 else shown


def _mismatch_report(expected: StateDict, given: StateDict) -> str | None:
    """Describe how ``given`` differs from ``expected`` (``None`` when it fits)."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    shapes = [
        f"{key}: file {tuple(given[key].shape)} vs network {tuple(expected[key].shape)}"
        for key in expected
        if key in given and given[key].shape != expected[key].shape
    ]
    if not (missing or unexpected or shapes):
        return None
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_abbreviate(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_abbreviate(unexpected)}")
    if shapes:
        lines.append(f"shape mismatches ({len(shapes)}): {_abbreviate(shapes)}")
    return "\n  ".join(lines)


def load_weights(
    network: RegistrationNetwork, source: PathLike | StateDict | Checkpoint
) -> RegistrationNetwork:
    """Load weights into ``network.regis_net`` (strict: every key and shape must match).

    Parameters
    ----------
    network
        The network to fill; tensors are copied to its device and dtype.
    source
        A file path (either layout of the module docstring), a state dict (bare, or wrapped
        as ``{"state_dict": ...}`` / ``{"model": ...}``), or a :class:`Checkpoint`.

    Returns
    -------
    ``network`` itself.

    Raises
    ------
    WeightsError
        When the file cannot be read or its keys or shapes do not fit the network; the message
        lists missing keys, unexpected keys and shape mismatches.
    """
    if isinstance(source, Checkpoint):
        checkpoint = source
    elif isinstance(source, Mapping):
        checkpoint = _as_checkpoint(source, "the given state dict")
    else:
        checkpoint = read_checkpoint(source)
    expected = network.regis_net.state_dict()
    problem = _mismatch_report(expected, checkpoint.state_dict)
    if problem is not None:
        where = source if isinstance(source, (str, os.PathLike)) else "the weights"
        raise WeightsError(f"{where} do not fit the network ({network.config}):\n  {problem}")
    network.regis_net.load_state_dict(checkpoint.state_dict, strict=True)
    return network


def save_weights(
    network: RegistrationNetwork, path: PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``network``'s weights, configuration and a metadata card to ``path``.

    Parameters
    ----------
    network
        Network whose ``regis_net`` tensors are saved (copied to the CPU).
    path
        Destination file (parent folders are created).
    metadata
        The model card: plain ``str``/number/list/dict values only, so the file still loads
        with ``weights_only=True``. Defaults to ``network.metadata``.

    Returns
    -------
    The written path.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        key: value.detach().to("cpu").clone()
        for key, value in network.regis_net.state_dict().items()
    }
    card = dict(metadata if metadata is not None else network.metadata)
    payload = {"state_dict": state, "config": network.config.to_dict(), "card": card}
    torch.save(payload, path)
    return path


def _expected_shapes(config: NetworkConfig) -> dict[str, torch.Size]:
    """Key -> shape of ``regis_net``'s state dict for ``config`` (built on the meta device)."""
    network = build_network(config, device="meta")
    return {key: value.shape for key, value in network.regis_net.state_dict().items()}


_UNET_KEY = re.compile(r"^(?P<prefix>.*)downConvs\.0\.weight$")


def infer_config(
    state_dict: StateDict, grid_shape: tuple[int, int, int] = (175, 175, 175)
) -> NetworkConfig:
    """Guess the :class:`NetworkConfig` a bare state dict was saved from.

    Channels come from the tensor shapes of the first U-Net; ``n_steps`` from the module paths
    (so an official Step-1 file gives 3 and ``Step_2_final.trch`` the official config).

    Raises
    ------
    WeightsError
        When no configuration of 1 to 4 U-Nets has exactly these keys.
    """
    prefixes = sorted(m["prefix"] for key in state_dict if (m := _UNET_KEY.match(key)))
    if not prefixes:
        raise WeightsError("the state dict holds no U-Net (no '...downConvs.0.weight' key)")
    first = prefixes[0]
    levels = 0
    while f"{first}downConvs.{levels}.weight" in state_dict:
        levels += 1
    down = tuple(int(state_dict[f"{first}downConvs.{d}.weight"].shape[0]) for d in range(levels))
    up = tuple(int(state_dict[f"{first}upConvs.{d}.weight"].shape[1]) for d in range(levels))
    inputs = int(state_dict[f"{first}downConvs.0.weight"].shape[1]) // 2
    for n_steps in (1, 2, 3, 4):
        try:
            config = NetworkConfig(grid_shape, n_steps, down, up, inputs)
        except InputError:
            continue
        if _expected_shapes(config) == {key: value.shape for key, value in state_dict.items()}:
            return config
    raise WeightsError(
        f"the state dict ({len(state_dict)} tensors, U-Nets at {prefixes[:4]}) matches no "
        "network of 1 to 4 U-Nets"
    )


def _closest_config(state_dict: StateDict) -> NetworkConfig:
    """The official-width configuration (1-4 U-Nets) sharing the most keys with ``state_dict``."""
    keys = set(state_dict)
    best, best_overlap = NetworkConfig.unigradicon(), -1
    for n_steps in (4, 3, 2, 1):
        config = NetworkConfig((175, 175, 175), n_steps)
        overlap = len(keys & set(_expected_shapes(config)))
        if overlap > best_overlap:
            best, best_overlap = config, overlap
    return best


def network_from_file(path: PathLike, device: torch.device | str = "cpu") -> RegistrationNetwork:
    """Build the network a weights file describes, load it, and return it in ``eval()`` mode.

    The file's model card becomes ``network.metadata``.

    The configuration is the one saved by :func:`save_weights`; for a bare state dict it is
    derived by :func:`infer_config` (175^3 grid), which gives
    :meth:`NetworkConfig.unigradicon` for the official ``Step_2_final.trch``.

    Raises
    ------
    WeightsError
        When the file is unreadable or fits no network.
    """
    checkpoint = read_checkpoint(path)
    config = checkpoint.config
    if config is None:
        try:
            config = infer_config(checkpoint.state_dict)
        except WeightsError:
            # Fits nothing exactly: compare with the closest layout so the error lists the
            # missing and unexpected keys and the shape mismatches.
            config = _closest_config(checkpoint.state_dict)
    network = build_network(config)
    load_weights(network, checkpoint)
    network.metadata = dict(checkpoint.card)
    return network.to(device).eval()
