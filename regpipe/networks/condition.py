"""The condition of a conditional registration network: what the user steers.

A :class:`Condition` is the body ``region`` (one of :data:`REGIONS`), the ``pair_type``
(``"inter"``-subject or ``"intra"``-subject) and ``lam``, the weight of the GradICON
regulariser the prediction should correspond to (larger: smoother). As a network input it is
a vector of :data:`CONDITION_SIZE` = 10 numbers::

    [one-hot region (7) | one-hot pair type (2) | log(lam / 1.5) / log(10)]

:class:`ConditioningConfig` says how the controller of
:class:`~regpipe.networks.conditional.ConditionalRegistrationNetwork` is built.

Example
-------
>>> Condition("lung", "intra", 15.0).vector().tolist()
[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from regpipe.errors import InputError

__all__ = [
    "CONDITION_SIZE",
    "DEFAULT_LAM",
    "MODES",
    "PAIR_TYPES",
    "REGIONS",
    "REGION_ALIASES",
    "Condition",
    "ConditioningConfig",
    "canonical_region",
    "condition_vectors",
]

Mode = Literal["film", "dynamic"]

#: Body regions of the condition (same order as :data:`regpipe.training_data.REGIONS`).
REGIONS: tuple[str, ...] = ("brain", "head_neck", "thorax", "abdomen", "pelvis", "knee", "other")
#: Registration types: between subjects, or within one subject (longitudinal, one label map).
PAIR_TYPES: tuple[str, ...] = ("inter", "intra")
#: Conditioning modes of the controller.
MODES: tuple[str, ...] = ("film", "dynamic")
#: Default regularisation weight (uniGradICON's lambda).
DEFAULT_LAM = 1.5
#: ``lam`` enters the vector as ``log(lam / DEFAULT_LAM) / LAM_LOG_SCALE``.
LAM_LOG_SCALE = math.log(10.0)
#: Length of the condition vector.
CONDITION_SIZE = len(REGIONS) + len(PAIR_TYPES) + 1

#: Other names accepted for the regions (lower case, ``-`` and spaces read as ``_``).
REGION_ALIASES: dict[str, str] = {
    "head": "head_neck", "head_and_neck": "head_neck", "hn": "head_neck", "neck": "head_neck",
    "lung": "thorax", "lungs": "thorax", "chest": "thorax",
    "prostate": "pelvis", "knee_musculoskeletal": "knee", "musculoskeletal": "knee",
    "msk": "knee",
}  # fmt: skip


def canonical_region(name: str) -> str:
    """The region of :data:`REGIONS` that ``name`` means (aliases such as ``"lung"`` allowed).

    Raises
    ------
    InputError
        For an unknown name; the message lists the accepted ones.
    """
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = REGION_ALIASES.get(key, key)
    if key not in REGIONS:
        raise InputError(
            f"unknown region {name!r}: choose one of {', '.join(REGIONS)} (aliases: "
            f"{', '.join(sorted(REGION_ALIASES))})"
        )
    return key


@dataclasses.dataclass(frozen=True)
class Condition:
    """What a conditional network is asked to do.

    Parameters
    ----------
    region
        Body region, one of :data:`REGIONS` (or an alias, see :func:`canonical_region`).
    pair_type
        ``"inter"`` (two subjects, or a subject and a template) or ``"intra"`` (one subject,
        e.g. two sessions).
    lam
        Regularisation weight (> 0, finite; the GradICON weight of the training loss this
        prediction corresponds to): larger is smoother. Default 1.5.

    Raises
    ------
    InputError
        For an unknown region or pair type, or a non-positive or non-finite ``lam``.
    """

    region: str = "other"
    pair_type: str = "inter"
    lam: float = DEFAULT_LAM

    def __post_init__(self) -> None:
        object.__setattr__(self, "region", canonical_region(self.region))
        pair_type = str(self.pair_type).strip().lower()
        if pair_type not in PAIR_TYPES:
            raise InputError(f"unknown pair type {self.pair_type!r}: choose inter or intra")
        object.__setattr__(self, "pair_type", pair_type)
        try:
            lam = float(self.lam)
        except (TypeError, ValueError):
            raise InputError(f"lam (smoothness) must be a number, got {self.lam!r}") from None
        if not (math.isfinite(lam) and lam > 0):
            raise InputError(f"lam (smoothness) must be positive and finite, got {self.lam!r}")
        object.__setattr__(self, "lam", lam)

    def vector(self) -> torch.Tensor:
        """The condition as a float32 tensor ``[CONDITION_SIZE]`` (see the module docstring)."""
        values = torch.zeros(CONDITION_SIZE)
        values[REGIONS.index(self.region)] = 1.0
        values[len(REGIONS) + PAIR_TYPES.index(self.pair_type)] = 1.0
        values[-1] = math.log(self.lam / DEFAULT_LAM) / LAM_LOG_SCALE
        return values

    def to_dict(self) -> dict[str, Any]:
        """``{"region", "pair_type", "lam"}`` (JSON-ready)."""
        return {"region": self.region, "pair_type": self.pair_type, "lam": self.lam}


def condition_vectors(conditions: Condition | Sequence[Condition]) -> torch.Tensor:
    """Stack conditions into a float32 tensor ``[N, CONDITION_SIZE]``."""
    if isinstance(conditions, Condition):
        conditions = [conditions]
    if not conditions or not all(isinstance(c, Condition) for c in conditions):
        raise InputError("expected a Condition or a non-empty sequence of Conditions")
    return torch.stack([c.vector() for c in conditions])


@dataclasses.dataclass(frozen=True)
class ConditioningConfig:
    """How the controller is built (saved in the weights file as ``config["conditional"]``).

    Parameters
    ----------
    mode
        ``"film"`` (default: it measured better, see ``benchmarks/conditioning_choice.py``) or
        ``"dynamic"`` (see :mod:`regpipe.networks.conditional`).
    hidden
        Width of the controller's two hidden layers.
    lam_range
        The ``(low, high)`` range of ``lam`` the network was trained on (informational:
        registration warns outside it); ``None`` when unknown.
    """

    mode: Mode = "film"
    hidden: int = 64
    lam_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"conditioning mode must be film or dynamic, got {self.mode!r}")
        if int(self.hidden) < 1:
            raise InputError(f"the controller width must be positive, got {self.hidden}")
        object.__setattr__(self, "hidden", int(self.hidden))
        if self.lam_range is not None:
            low, high = (float(v) for v in self.lam_range)
            if not 0 < low <= high < math.inf:
                raise InputError("lam_range must satisfy 0 < low <= high (finite), "
                                 f"got {self.lam_range}")
            object.__setattr__(self, "lam_range", (low, high))

    def clamp_lam(self, lam: float) -> float:
        """``lam`` clamped to :attr:`lam_range` (unchanged when the range is unknown): beyond
        it the controller's output is not reliably smoother (or rougher), and far beyond it
        folds. A ``lam`` that is not positive and finite raises :class:`InputError`."""
        lam = Condition(lam=lam).lam
        if self.lam_range is None:
            return lam
        return min(max(lam, self.lam_range[0]), self.lam_range[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain values (loadable with ``weights_only=True``)."""
        return {
            "mode": self.mode,
            "hidden": self.hidden,
            "lam_range": list(self.lam_range) if self.lam_range else None,
            "regions": list(REGIONS),
            "pair_types": list(PAIR_TYPES),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ConditioningConfig:
        """Inverse of :meth:`to_dict`; a file made for another region list is refused."""
        values = dict(values)
        for key, known in (("regions", REGIONS), ("pair_types", PAIR_TYPES)):
            saved = values.pop(key, None)
            if saved is not None and tuple(saved) != known:
                raise InputError(f"the file's condition {key} {saved} differ from {list(known)}")
        unknown = sorted(set(values) - {"mode", "hidden", "lam_range"})
        if unknown:
            raise InputError(f"unknown conditioning keys: {', '.join(unknown)}")
        lam_range = values.get("lam_range")
        return cls(values.get("mode", "film"), values.get("hidden", 64),
                   tuple(lam_range) if lam_range else None)
