"""Weight averaging: the mean of snapshots of one training run (stochastic weight averaging).

Snapshots of a run taken a few dozen steps apart sit around the same minimum; their mean
usually registers better than any of them (on the bundled model, single snapshots swung by
about +-0.02 Dice where the mean of 23 beat every one). :class:`WeightAverage` keeps that mean
while a run trains (``regpipe-train --average-from``); :func:`average_weights` computes it from
weights files afterwards (``regpipe-weights average``). Both average every floating-point
tensor (parameters, batch-norm statistics, a conditional network's controller) and take
integer buffers from the last snapshot; a tensor equal in every snapshot (a frozen base
network) stays bit-exact.

Example
-------
>>> from regpipe.networks import NetworkConfig, build_network
>>> network = build_network(NetworkConfig((17, 17, 17), 1, (4, 8), (4, 8)))
>>> average = WeightAverage()
>>> average.add(network, step=50)
>>> with torch.no_grad():
...     _ = next(network.parameters()).add_(1.0)
>>> average.add(network, step=100)
>>> average.count, average.steps
(2, (50, 100))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from regpipe.errors import WeightsError
from regpipe.networks.checkpoint import (
    network_from_file,
    network_state,
    save_network_state,
)
from regpipe.networks.gradicon import RegistrationNetwork

__all__ = ["WeightAverage", "average_weights"]

PathLike = str | os.PathLike[str]
_PARTS = ("state_dict", "controller")


class WeightAverage:
    """Running mean of network states (float64 sums, so a constant tensor stays exact)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: int | None = None
        self.last: int | None = None
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        # of the last snapshot: its configuration, and per part its integer buffers with an
        # empty tensor of the right dtype standing for each floating one (the mean is in sums)
        self.latest: dict[str, Any] = {}

    @property
    def steps(self) -> tuple[int | None, int | None]:
        """First and last step averaged."""
        return self.first, self.last

    def add(self, network: RegistrationNetwork, step: int | None = None) -> None:
        """Add ``network``'s current weights (taken at ``step``) to the mean."""
        self.add_state(network_state(network), step)

    def add_state(self, state: Mapping[str, Any], step: int | None = None) -> None:
        """Add a :func:`~regpipe.networks.network_state` payload to the mean."""
        if self.latest and state["config"] != self.latest["config"]:
            raise WeightsError("cannot average weights of different network configurations")
        for part in _PARTS:
            if part not in state:
                continue
            sums = self.sums.setdefault(part, {})
            for key, value in state[part].items():
                if value.is_floating_point():
                    term = value.detach().to("cpu", torch.float64)
                    sums[key] = sums[key] + term if key in sums else term.clone()
        self.latest = {"config": state["config"]}
        for part in _PARTS:
            if part in state:
                self.latest[part] = {
                    key: torch.empty(0, dtype=value.dtype) if value.is_floating_point() else value
                    for key, value in state[part].items()
                }
        self.count += 1
        self.first = step if self.first is None else self.first
        self.last = step

    def state(self) -> dict[str, Any]:
        """The mean as a :func:`~regpipe.networks.network_state` payload (integer buffers from
        the last snapshot)."""
        if not self.count:
            raise WeightsError("no weights were averaged yet")
        payload: dict[str, Any] = {"config": self.latest["config"]}
        for part in _PARTS:
            if part in self.latest:
                payload[part] = {
                    key: (self.sums[part][key] / self.count).to(value.dtype)
                    if value.is_floating_point() else value
                    for key, value in self.latest[part].items()
                }
        return payload

    def card(self, card: Mapping[str, Any]) -> dict[str, Any]:
        """``card`` plus what was averaged (``weight_average``: snapshots, first and last step)."""
        return {**card, "weight_average": {"snapshots": self.count, "first_step": self.first,
                                           "last_step": self.last}}

    def save(self, path: PathLike, card: Mapping[str, Any]) -> Path:
        """Write the mean as a weights file with :meth:`card`'s card."""
        return save_network_state(self.state(), path, self.card(card))

    # checkpoints: plain tensors and numbers, readable with weights_only=True
    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first, "last": self.last, "sums": self.sums,
                "latest": self.latest}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.count, self.first, self.last = int(saved["count"]), saved["first"], saved["last"]
        self.sums, self.latest = dict(saved["sums"]), dict(saved["latest"])


def average_weights(
    paths: Sequence[PathLike], output: PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Average several weights files of one configuration into ``output``.

    The card is the last file's, plus ``averaged_from`` (each file's name and sha256) and
    ``metadata``.

    Raises
    ------
    WeightsError
        With fewer than two files, or files of different configurations.
    """
    # regpipe.weights imports the networks package
    from regpipe.weights import sha256sum

    if len(paths) < 2:
        raise WeightsError("averaging needs at least two weights files")
    average = WeightAverage()
    card: dict[str, Any] = {}
    for path in paths:
        network = network_from_file(path)
        try:
            average.add(network)
        except WeightsError:
            raise WeightsError("the weights files have different network configurations: "
                               + ", ".join(str(p) for p in paths)) from None
        card = dict(getattr(network, "metadata", {}) or {})
    card["averaged_from"] = [{"file": Path(path).name, "sha256": sha256sum(path)}
                             for path in paths]
    card.update(metadata or {})
    return save_network_state(average.state(), output, card)
