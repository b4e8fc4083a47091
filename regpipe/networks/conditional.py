"""Controllable registration: a condition vector steers the flow heads (UniReg-style).

:class:`ConditionalRegistrationNetwork` is a :class:`~regpipe.networks.RegistrationNetwork`
whose ``regis_net`` is left exactly as it is (same modules, same state-dict keys, so the
bundled or official weights load into it strictly) plus a small controller MLP. The controller
maps the condition vector (:class:`~regpipe.networks.condition.Condition`: region, pair type,
lam) to a modulation of the flow head (``lastConv``) of every U-Net, in one of two modes:

``"film"``
    Per-channel scale and shift of the features entering ``lastConv``:
    ``x -> x * (1 + gamma_c) + beta_c`` (2 C numbers per U-Net and sample).
``"dynamic"``
    A per-sample additive change of the ``lastConv`` kernel and bias (a generated head, as
    in UniReg's dynamic heads): ``conv(x, W + dW_s) + b + db_s`` (3 C 27 + 3 numbers per
    U-Net and sample), computed as the unchanged convolution plus a grouped convolution
    with the generated ``dW_s``.

The controller's output layers start at zero, so an untrained conditional network predicts
exactly what its base network predicts, whatever the condition.

The condition is network state, set per batch: :meth:`ConditionalRegistrationNetwork.
set_condition`, the context manager :meth:`~ConditionalRegistrationNetwork.conditioned`, or
``map(..., condition=...)``. Code that only calls ``network.map`` (such as
:func:`regpipe.losses.gradicon_objective`) therefore works unchanged. A batch takes one
condition (shared) or one per sample.

Example
-------
>>> import torch
>>> from regpipe.networks import NetworkConfig, build_network
>>> base = build_network(NetworkConfig((17, 17, 17), 1, (4, 8), (4, 8))).eval()
>>> net = ConditionalRegistrationNetwork.from_base(base, ConditioningConfig("film")).eval()
>>> a, b = torch.rand(1, 1, 17, 17, 17), torch.rand(1, 1, 17, 17, 17)
>>> with net.conditioned(Condition("brain", "intra", lam=3.0)):
...     torch.equal(net.displacement(a, b), base.displacement(a, b))  # untrained: base output
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regpipe.errors import InputError
from regpipe.networks.condition import (
    CONDITION_SIZE,
    Condition,
    ConditioningConfig,
    condition_vectors,
)
from regpipe.networks.gradicon import CoordinateMap, NetworkConfig, RegistrationNetwork

__all__ = ["ConditionalRegistrationNetwork", "Controller", "is_conditional"]


class Controller(nn.Module):
    """MLP from the condition vector to one modulation vector per U-Net.

    ``forward(vectors [B, CONDITION_SIZE])`` returns a list with one ``[B, sizes[i]]`` tensor
    per U-Net. The output layers start at zero (the hidden layers do not, so the gradient of
    the output layers is not zero at the start).
    """

    def __init__(self, sizes: Sequence[int], hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(CONDITION_SIZE, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        heads = [nn.Linear(hidden, int(n)) for n in sizes]
        for head in heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.heads = nn.ModuleList(heads)

    def forward(self, vectors: torch.Tensor) -> list[torch.Tensor]:
        """Modulations ``[B, sizes[i]]`` for every U-Net ``i``."""
        hidden = self.trunk(vectors)
        return [head(hidden) for head in self.heads]


def _head_size(conv: nn.Conv3d, mode: str) -> int:
    channels = conv.in_channels
    if mode == "film":
        return 2 * channels
    return conv.weight.numel() + conv.out_channels


class ConditionalRegistrationNetwork(RegistrationNetwork):
    """A :class:`RegistrationNetwork` whose flow heads follow a :class:`Condition`.

    Parameters
    ----------
    config
        Shape of the base network (``regis_net`` is built exactly as for
        :class:`RegistrationNetwork`).
    conditioning
        Mode and width of the controller (:class:`ConditioningConfig`).
    device
        Where to create parameters (default CPU).

    Attributes
    ----------
    controller
        The :class:`Controller` (state-dict keys ``controller.*``).
    conditioning
        The :class:`ConditioningConfig`.

    Notes
    -----
    Without an explicit condition the network uses ``Condition()`` (region ``other``,
    ``inter``, lam 1.5).
    """

    def __init__(
        self,
        config: NetworkConfig | None = None,
        conditioning: ConditioningConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(config, device)
        self.conditioning = conditioning if conditioning is not None else ConditioningConfig()
        heads = [unet.lastConv for unet in self.unets()]
        sizes = [_head_size(conv, self.conditioning.mode) for conv in heads]
        self.controller = Controller(sizes, self.conditioning.hidden).to(device)
        self._conditions: tuple[Condition, ...] = (Condition(),)
        self._vectors = condition_vectors(self._conditions)
        self._modulations: list[torch.Tensor] | None = None
        for index, conv in enumerate(heads):
            if self.conditioning.mode == "film":
                conv.register_forward_pre_hook(self._film_hook(index))
            else:
                conv.register_forward_hook(self._dynamic_hook(index))

    @classmethod
    def from_base(
        cls, base: RegistrationNetwork, conditioning: ConditioningConfig | str | None = None
    ) -> ConditionalRegistrationNetwork:
        """A conditional network whose ``regis_net`` holds a copy of ``base``'s weights.

        ``conditioning`` may be a mode name (``"film"``/``"dynamic"``). The result is on
        ``base``'s device, in ``base``'s train/eval mode, with ``base.metadata`` copied.
        """
        if isinstance(conditioning, str):
            conditioning = ConditioningConfig(conditioning)  # type: ignore[arg-type]
        device = base.identity_grid.device
        network = cls(base.config, conditioning, device)
        network.regis_net.load_state_dict(base.regis_net.state_dict(), strict=True)
        network.metadata = dict(base.metadata)
        return network.train(base.training)

    # ------------------------------------------------------------------ condition state

    @property
    def condition(self) -> tuple[Condition, ...]:
        """The current condition(s): one shared by the batch, or one per sample."""
        return self._conditions

    def set_condition(self, condition: Condition | Sequence[Condition]) -> None:
        """Use ``condition`` (one, or one per sample) for the following :meth:`map` calls."""
        vectors = condition_vectors(condition)
        self._conditions = (condition,) if isinstance(condition, Condition) else tuple(condition)
        self._vectors = vectors

    @contextlib.contextmanager
    def conditioned(self, condition: Condition | Sequence[Condition]) -> Iterator[None]:
        """Context manager: ``condition`` inside, the previous condition restored after."""
        previous = self._conditions
        self.set_condition(condition)
        try:
            yield
        finally:
            self.set_condition(previous)

    # ------------------------------------------------------------------ forward

    def map(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        condition: Condition | Sequence[Condition] | None = None,
    ) -> CoordinateMap:
        """As :meth:`RegistrationNetwork.map`, for the current condition or ``condition``.

        Raises
        ------
        InputError
            When the number of conditions is neither 1 nor the batch size.
        """
        if condition is not None:
            with self.conditioned(condition):
                return self.map(moving, fixed)
        self.check_pair(moving, fixed)
        batch = moving.shape[0]
        vectors = self._vectors
        if vectors.shape[0] not in (1, batch):
            raise InputError(
                f"{vectors.shape[0]} conditions for a batch of {batch} pairs (give 1 or {batch})"
            )
        parameter = next(self.controller.parameters())
        vectors = vectors.to(device=parameter.device, dtype=parameter.dtype)
        self._modulations = self.controller(vectors.expand(batch, -1))
        try:
            return self.regis_net(moving, fixed)
        finally:
            self._modulations = None

    def displacement(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        condition: Condition | Sequence[Condition] | None = None,
    ) -> torch.Tensor:
        """As :meth:`RegistrationNetwork.displacement`, for the current condition or
        ``condition``; ``[B, 3, n0, n1, n2]`` in normalised units."""
        if condition is not None:
            with self.conditioned(condition):
                return super().displacement(moving, fixed)
        return super().displacement(moving, fixed)

    def _modulation(self, index: int) -> torch.Tensor:
        if self._modulations is None:
            raise InputError("call the conditional network through map()/displacement(), not "
                             "its U-Nets directly")
        return self._modulations[index]

    def _film_hook(self, index: int):
        def hook(_conv: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            (x,) = inputs
            gamma, beta = self._modulation(index).to(x.dtype).chunk(2, dim=1)
            shape = (*gamma.shape, 1, 1, 1)
            return (x * (1.0 + gamma.view(shape)) + beta.view(shape),)

        return hook

    def _dynamic_hook(self, index: int):
        def hook(conv: nn.Conv3d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            (x,) = inputs
            delta = self._modulation(index).to(x.dtype)
            batch, out_channels = x.shape[0], conv.out_channels
            n_weight = conv.weight.numel()
            weight = delta[:, :n_weight].reshape(batch * out_channels, *conv.weight.shape[1:])
            bias = delta[:, n_weight:].reshape(batch * out_channels)
            grouped = x.reshape(1, batch * x.shape[1], *x.shape[2:])
            extra = F.conv3d(grouped, weight, bias, stride=conv.stride, padding=conv.padding,
                             groups=batch)
            return output + extra.reshape(batch, out_channels, *extra.shape[2:])

        return hook


def is_conditional(network: Any) -> bool:
    """Whether ``network`` is a :class:`ConditionalRegistrationNetwork`."""
    return isinstance(network, ConditionalRegistrationNetwork)

