"""Reading and writing network weights: the official layout and regpipe's own files.

Two file layouts are read, always with
``torch.load(path, map_location="cpu", weights_only=True)`` (no arbitrary pickles):

official
    A bare state dict of ``RegistrationNetwork.regis_net`` (uniGradICON's
    ``Step_2_final.trch``: 188 tensors).
regpipe
    ``{"state_dict": <bare state dict>, "config": NetworkConfig.to_dict(), "card": {...}}``,
    written by :func:`save_weights`. ``{"model": <state dict>}`` is accepted as well.
    A conditional network (:mod:`regpipe.networks.conditional`) adds
    ``config["conditional"]`` (:meth:`ConditioningConfig.to_dict`) and ``"controller"`` (the
    controller's state dict); ``state_dict`` keeps the plain network's keys, so the file's
    base network is what an unconditional file would hold.

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

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regpipe.atomic import atomic_write
from regpipe.errors import InputError, WeightsError
from regpipe.networks.condition import ConditioningConfig
from regpipe.networks.conditional import ConditionalRegistrationNetwork
from regpipe.networks.gradicon import NetworkConfig, RegistrationNetwork, build_network

LOGGER = logging.getLogger("regpipe")

__all__ = [
    "Checkpoint",
    "infer_config",
    "is_conditional_file",
    "load_weights",
    "network_from_file",
    "network_state",
    "read_checkpoint",
    "restore_network_state",
    "save_network_state",
    "save_weights",
    "saved_config",
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
    conditioning
        The controller's configuration of a conditional network, else ``None``.
    controller
        The controller's tensors of a conditional network, else ``None``.
    origin
        Where it was read from (the file), for messages.
    """

    state_dict: dict[str, torch.Tensor]
    config: NetworkConfig | None = None
    card: dict[str, Any] = field(default_factory=dict)
    conditioning: ConditioningConfig | None = None
    controller: dict[str, torch.Tensor] | None = None
    origin: str | None = None


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise WeightsError(f"{path} {_unloadable_reason(path, exc)}") from None


def _unloadable_reason(path: Path, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in words (never torch's advice
    to retry with ``weights_only=False``, which would run the file's code)."""
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except OSError as error:
        return f"cannot be read: {error}"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"{", b"<")):
        return ("is a web page or text, not a weights file (a download that received an error "
                "or login page?): fetch it again, e.g. `regpipe-weights fetch NAME --force`")
    if not head.startswith(b"PK\x03\x04") and not head.startswith(b"\x80"):
        # neither torch's zip format nor a legacy pickle: a NIfTI, a transform, a text file...
        return "is not a PyTorch weights file (a .pt/.pth/.trch checkpoint is expected)"
    if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
        return ("holds Python objects besides tensors, which regpipe never loads (they could "
                "run code): save it with regpipe.networks.save_weights(network, path), which "
                "keeps the configuration and model card, or (an unconditional network) as a bare "
                "state dict, torch.save(network.state_dict(), path)")
    if head.startswith(b"PK\x03\x04"):
        return ("is a damaged or truncated weights file (an interrupted download or copy?): "
                "fetch or copy it again")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"is not a PyTorch weights file ({type(exc).__name__}: {first})"


def _as_checkpoint(obj: Any, origin: str) -> Checkpoint:
    """Interpret a loaded object as a :class:`Checkpoint` (see module docstring)."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{origin} holds a {type(obj).__name__}, not a state dict")
    config: NetworkConfig | None = None
    conditioning: ConditioningConfig | None = None
    controller: dict[str, torch.Tensor] | None = None
    card: dict[str, Any] = {}
    if "state_dict" in obj or "model" in obj:
        state = obj["state_dict"] if "state_dict" in obj else obj["model"]
        if obj.get("config") is not None:
            values = dict(obj["config"])
            conditional = values.pop("conditional", None)
            try:
                config = NetworkConfig.from_dict(values)
                if conditional is not None:
                    conditioning = ConditioningConfig.from_dict(conditional)
            except (InputError, TypeError) as exc:
                raise WeightsError(f"{origin} has an invalid network config: {exc}") from None
        card = dict(obj.get("card") or {})
        if conditioning is not None:
            controller = obj.get("controller")
            if not isinstance(controller, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in controller.values()
            ):
                raise WeightsError(f"{origin} is conditional but holds no controller tensors")
            controller = dict(controller)
    else:
        state = obj
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{origin} does not contain a non-empty state dict")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsError(f"{origin}: entries are not tensors: {_abbreviate(bad)}")
    tensors = dict(state)
    if conditioning is None and any(key.startswith("controller.") for key in tensors):
        raise WeightsError(
            f"{origin} is the bare state dict of a conditional network (controller.* keys), "
            "which lacks its conditioning (mode, lam range): save it with "
            "regpipe.networks.save_weights(network, path)")
    if all(key.startswith("regis_net.") for key in tensors):  # a whole-model state dict
        tensors = {key[len("regis_net.") :]: value for key, value in tensors.items()}
    return Checkpoint(tensors, config, card, conditioning, controller, origin)


def is_conditional_file(path: PathLike) -> bool:
    """Whether the weights file at ``path`` holds a conditional network (see module docstring).

    Memory-maps the file when its format allows, so large files are cheap to inspect.

    Raises
    ------
    WeightsError
        When the file is missing or unreadable.
    """
    path = Path(path).expanduser()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip file (or unreadable): the full reader decides
        obj = _torch_load(path)
    config = obj.get("config") if isinstance(obj, Mapping) else None
    return isinstance(config, Mapping) and config.get("conditional") is not None


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

    Notes
    -----
    A :class:`~regpipe.networks.conditional.ConditionalRegistrationNetwork` also gets the
    file's controller; from an unconditional file it keeps its own controller (a warm start:
    the base network's weights under a fresh, neutral controller).

    Raises
    ------
    WeightsError
        When the file cannot be read or its keys or shapes do not fit the network (the message
        lists missing keys, unexpected keys and shape mismatches), or when a conditional file
        is loaded into an unconditional network or one of another mode.
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
        where = (source if isinstance(source, (str, os.PathLike)) else
                 checkpoint.origin if checkpoint.origin else "the weights")
        raise WeightsError(f"{where} do not fit the network ({network.config}):\n  {problem}")
    if checkpoint.controller is not None:
        _check_controller(network, checkpoint)
    network.regis_net.load_state_dict(checkpoint.state_dict, strict=True)
    if checkpoint.controller is not None and isinstance(network, ConditionalRegistrationNetwork):
        network.controller.load_state_dict(checkpoint.controller, strict=True)
    return network


def _check_controller(network: RegistrationNetwork, checkpoint: Checkpoint) -> None:
    """Refuse a conditional file for a plain network, another mode, or other shapes."""
    mode = checkpoint.conditioning.mode if checkpoint.conditioning else "?"
    if not isinstance(network, ConditionalRegistrationNetwork):
        raise WeightsError(
            f"these weights are a conditional ({mode}) network: load them with "
            "network_from_file, or into a ConditionalRegistrationNetwork"
        )
    if network.conditioning.mode != mode:
        raise WeightsError(
            f"these weights condition the flow heads with {mode}, the network with "
            f"{network.conditioning.mode}"
        )
    problem = _mismatch_report(network.controller.state_dict(), checkpoint.controller or {})
    if problem is not None:
        raise WeightsError(f"the controller does not fit the network:\n  {problem}")


def saved_config(network: RegistrationNetwork) -> dict[str, Any]:
    """The ``config`` entry of ``network``'s weights file (with ``"conditional"`` if any)."""
    config = network.config.to_dict()
    if isinstance(network, ConditionalRegistrationNetwork):
        config["conditional"] = network.conditioning.to_dict()
    return config


def network_state(network: RegistrationNetwork) -> dict[str, Any]:
    """The tensors and configuration of ``network`` as saved in weights files (CPU copies).

    ``{"state_dict": regis_net tensors, "config": {...}}``, plus ``config["conditional"]``
    and ``"controller"`` for a conditional network (see the module docstring).
    """
    state = {k: v.detach().to("cpu").clone() for k, v in network.regis_net.state_dict().items()}
    payload: dict[str, Any] = {"state_dict": state, "config": saved_config(network)}
    if isinstance(network, ConditionalRegistrationNetwork):
        payload["controller"] = {
            k: v.detach().to("cpu").clone() for k, v in network.controller.state_dict().items()
        }
    return payload


def restore_network_state(network: RegistrationNetwork, payload: Mapping[str, Any]) -> None:
    """Load what :func:`network_state` returned (strict) into ``network``."""
    load_weights(network, _as_checkpoint(payload, "the saved network state"))


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
    card = dict(metadata if metadata is not None else network.metadata)
    return save_network_state(network_state(network), path, card)


def save_network_state(state: Mapping[str, Any], path: PathLike, card: Mapping[str, Any]) -> Path:
    """Write a :func:`network_state` payload and its card in :func:`save_weights`'s layout
    (atomically, creating missing folders)."""
    payload = {**state, "card": dict(card)}
    return atomic_write(Path(path).expanduser(), lambda tmp: torch.save(payload, tmp),
                        parents=True)


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

    The file's model card becomes ``network.metadata``. A file with a controller gives a
    :class:`~regpipe.networks.conditional.ConditionalRegistrationNetwork`.

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
            if config != NetworkConfig.unigradicon():
                LOGGER.warning(
                    "%s is a bare state dict: its network is assumed at uniGradICON's 175^3 "
                    "grid with squash placement, which may not be what it was trained for; "
                    "save weights with regpipe.networks.save_weights to keep the grid and "
                    "placement", path)
        except WeightsError:
            # Fits nothing exactly: compare with the closest layout so the error lists the
            # missing and unexpected keys and the shape mismatches.
            config = _closest_config(checkpoint.state_dict)
    network: RegistrationNetwork
    if checkpoint.conditioning is not None:
        network = ConditionalRegistrationNetwork(config, checkpoint.conditioning)
    else:
        network = build_network(config)
    load_weights(network, checkpoint)
    network.metadata = dict(checkpoint.card)
    return network.to(device).eval()
