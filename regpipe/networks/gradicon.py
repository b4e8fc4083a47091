"""uniGradICON's registration network: multi-resolution U-Nets composed into one map.

Coordinates
-----------
Every map here works in the *normalised* network space of :mod:`regpipe.spaces`: a coordinate
tensor ``[B, 3, n0, n1, n2]`` whose channel ``c`` holds ``d_c / (n_c - 1)`` in ``[0, 1]``
(``align_corners=True``) along tensor axis ``c + 2``. Displacements use the same units.

Direction
---------
``network.map(moving, fixed)`` returns ``phi`` with ``moving(phi(x)) ~ fixed(x)``: it takes
points of the **fixed** grid to the **moving** image (a pull-back), as everywhere in regpipe.

Module tree
-----------
The registration modules keep the attribute names of the official implementation so the
official ``Step_2_final.trch`` loads with ``strict=True`` into ``RegistrationNetwork.regis_net``:
:class:`FieldToMap` and :class:`Downsample` hold their child in ``.net``; :class:`TwoStep`
holds ``netPhi`` (first, coarse step) and ``netPsi`` (refinement). For ``n_steps=4``::

    TwoStep(                                   # 175^3
        netPhi=TwoStep(                        # 175^3
            netPhi=Downsample(TwoStep(         # 88^3
                netPhi=Downsample(FieldToMap(UNet2)),   # UNet a at 44^3
                netPsi=FieldToMap(UNet2))),             # UNet b at 88^3
            netPsi=FieldToMap(UNet2)),                  # UNet c at 175^3
        netPsi=FieldToMap(UNet2))                       # UNet d at 175^3

Example
-------
>>> import torch
>>> config = NetworkConfig(grid_shape=(33, 33, 33), n_steps=2,
...                        down_channels=(8, 16, 16), up_channels=(8, 16, 16))
>>> net = build_network(config).eval()
>>> moving = fixed = torch.rand(1, 1, 33, 33, 33)
>>> net.displacement(moving, fixed).abs().max().item()  # untrained: identity
0.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from regpipe.errors import InputError
from regpipe.networks.unet import UNet2, min_unet_input_size
from regpipe.spaces import identity_grid

__all__ = [
    "ComposedMap",
    "CoordinateMap",
    "DisplacementMap",
    "Downsample",
    "FieldToMap",
    "NetworkConfig",
    "RegistrationNetwork",
    "TwoStep",
    "build_network",
    "warp_normalised",
]

Padding = Literal["border", "zeros"]

#: Number of multi-resolution levels of the official tree; more U-Nets refine at full size.
MAX_RESOLUTION_LEVELS = 3


def warp_normalised(
    volume: torch.Tensor, coordinates: torch.Tensor, padding: Padding = "border"
) -> torch.Tensor:
    """Sample ``volume`` trilinearly at normalised coordinates.

    Parameters
    ----------
    volume
        ``[B, C, n0, n1, n2]`` data on a grid whose corner voxel centres are 0 and 1.
    coordinates
        ``[B or 1, 3, m0, m1, m2]`` normalised points; channel ``c`` is the position along
        tensor axis ``c + 2``. A batch of 1 is shared by every volume of the batch.
    padding
        ``"border"`` repeats edge values outside ``[0, 1]``; ``"zeros"`` returns 0 there.

    Returns
    -------
    Tensor ``[B, C, m0, m1, m2]``.
    """
    grid = (coordinates * 2.0 - 1.0).flip(1).permute(0, 2, 3, 4, 1)
    if grid.shape[0] != volume.shape[0]:
        if grid.shape[0] == 1:
            grid = grid.expand(volume.shape[0], *grid.shape[1:])
        elif volume.shape[0] == 1:
            volume = volume.expand(grid.shape[0], *volume.shape[1:])
        else:
            raise InputError(
                f"cannot sample a batch of {volume.shape[0]} volumes at a batch of "
                f"{grid.shape[0]} coordinate grids"
            )
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def _identity(grid_shape: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    if device is not None and torch.device(device).type == "meta":
        return torch.empty((1, 3, *grid_shape), device=device)  # shapes only
    return identity_grid(tuple(grid_shape)).to(device)


class CoordinateMap(Protocol):
    """A transform of normalised coordinates ``[B, 3, ...] -> [B, 3, ...]``.

    ``on_identity=True`` promises that ``coordinates`` is the identity grid of the map's own
    resolution; the map may then skip interpolating its first displacement.
    """

    def __call__(self, coordinates: torch.Tensor, on_identity: bool = False) -> torch.Tensor:
        """Map the points (see class docstring)."""
        ...


class DisplacementMap:
    """``x -> x + u(x)`` for a displacement grid ``u`` (trilinear, border padding).

    Parameters
    ----------
    field
        ``[B, 3, n0, n1, n2]`` displacement in normalised units on the identity grid.
    """

    def __init__(self, field: torch.Tensor) -> None:
        self.field = field

    def __call__(self, coordinates: torch.Tensor, on_identity: bool = False) -> torch.Tensor:
        """Displace ``coordinates`` ``[B or 1, 3, ...]`` by the interpolated field."""
        if on_identity and coordinates.shape[2:] == self.field.shape[2:]:
            return coordinates + self.field  # exact at grid points: no interpolation needed
        return coordinates + warp_normalised(self.field, coordinates, "border")


class ComposedMap:
    """``x -> outer(inner(x))``: ``inner`` is applied to the points first."""

    def __init__(self, outer: CoordinateMap, inner: CoordinateMap) -> None:
        self.outer = outer
        self.inner = inner

    def __call__(self, coordinates: torch.Tensor, on_identity: bool = False) -> torch.Tensor:
        """Apply ``inner`` then ``outer`` to ``coordinates`` ``[B or 1, 3, ...]``."""
        return self.outer(self.inner(coordinates, on_identity))


class FieldToMap(nn.Module):
    """Turn a network predicting displacements into a registration step.

    ``forward(moving, fixed)`` runs ``self.net`` and returns the :class:`DisplacementMap` of
    its output ``[B, 3, n0, n1, n2]``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateMap:
        """Predict the pull-back map of ``moving`` onto ``fixed`` (both ``[B, C, n0, n1, n2]``)."""
        return DisplacementMap(self.net(moving, fixed))


class Downsample(nn.Module):
    """Run the child step ``self.net`` on both images average-pooled by 2.

    Pooling uses ``ceil_mode`` (an odd axis of ``n`` gives ``ceil(n / 2)``; the last window
    averages only the voxels inside). The returned map works in the same normalised
    coordinates at any resolution, so it needs no rescaling.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateMap:
        """Return the child's map computed on the half-resolution pair."""
        moving = F.avg_pool3d(moving, kernel_size=2, ceil_mode=True)
        fixed = F.avg_pool3d(fixed, kernel_size=2, ceil_mode=True)
        return self.net(moving, fixed)


class TwoStep(nn.Module):
    """Register with ``netPhi``, warp the moving image, refine with ``netPsi``.

    Returns ``phi o psi``: the refinement is applied to the points first.

    Parameters
    ----------
    netPhi, netPsi
        Registration steps (``forward(moving, fixed) -> CoordinateMap``).
    identity
        ``[1, 3, n0, n1, n2]`` identity grid (see :func:`regpipe.spaces.identity_grid`) of the
        images this step receives; kept as a non-persistent buffer.
    """

    identity_grid: torch.Tensor

    def __init__(
        self,
        netPhi: nn.Module,
        netPsi: nn.Module,
        identity: torch.Tensor,
    ) -> None:
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi
        self.register_buffer("identity_grid", identity, persistent=False)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateMap:
        """Return the composed pull-back map of ``moving`` onto ``fixed``."""
        phi = self.netPhi(moving, fixed)
        warped = warp_normalised(moving, phi(self.identity_grid, on_identity=True), "border")
        psi = self.netPsi(warped, fixed)
        return ComposedMap(outer=phi, inner=psi)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Shape of a uniGradICON-style network.

    Parameters
    ----------
    grid_shape
        Network input size ``(n0, n1, n2)`` (tensor order); uniGradICON uses 175^3.
    n_steps
        Number of U-Nets, 1 to 4: 1-3 form a multi-resolution pyramid (the coarsest U-Net at
        ``1 / 2 ** (n_steps - 1)`` resolution; 3 is the official Step-1 network), 4 adds a
        full-resolution refinement U-Net to the 3-level pyramid (the official Step-2 network).
    down_channels, up_channels
        Encoder / decoder channels of every U-Net (see :class:`~regpipe.networks.unet.UNet2`).
    input_channels
        Channels of each input image.

    Raises
    ------
    InputError
        When a value is out of range or ``grid_shape`` is too small for the U-Nets.
    """

    grid_shape: tuple[int, int, int] = (175, 175, 175)
    n_steps: int = 4
    down_channels: tuple[int, ...] = (16, 32, 64, 256, 512)
    up_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    input_channels: int = 1

    def __post_init__(self) -> None:
        for name in ("grid_shape", "down_channels", "up_channels"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, tuple(int(v) for v in value))
            except (TypeError, ValueError):
                raise InputError(f"{name} must be a sequence of integers, got {value!r}") from None
        if len(self.grid_shape) != 3:
            raise InputError(f"grid_shape must have 3 entries, got {self.grid_shape}")
        if self.n_steps not in (1, 2, 3, 4):
            raise InputError(f"n_steps must be 1, 2, 3 or 4, got {self.n_steps!r}")
        if len(self.down_channels) != len(self.up_channels) or not self.down_channels:
            raise InputError(
                "down_channels and up_channels must be non-empty and of equal length, got "
                f"{self.down_channels} and {self.up_channels}"
            )
        if min(*self.down_channels, *self.up_channels, self.input_channels) < 1:
            raise InputError("channel counts must be positive")
        smallest = self.min_grid_size
        if min(self.grid_shape) < smallest:
            raise InputError(
                f"grid_shape {self.grid_shape} is too small for this network: every axis needs "
                f"at least {smallest} voxels (the coarsest of {self.resolution_levels} "
                f"resolution levels sees 1/{2 ** (self.resolution_levels - 1)} of the grid and "
                f"its {len(self.down_channels)}-level U-Net needs "
                f"{min_unet_input_size(len(self.down_channels))})"
            )

    @classmethod
    def unigradicon(cls) -> NetworkConfig:
        """The configuration of the released uniGradICON and multiGradICON weights."""
        return cls()

    @property
    def resolution_levels(self) -> int:
        """Number of resolutions in the pyramid (1 to 3)."""
        return min(self.n_steps, MAX_RESOLUTION_LEVELS)

    @property
    def min_grid_size(self) -> int:
        """Smallest accepted size of every grid axis."""
        coarsest_factor = 2 ** (self.resolution_levels - 1)
        return coarsest_factor * (min_unet_input_size(len(self.down_channels)) - 1) + 1

    def unet_grid_shapes(self) -> list[tuple[int, int, int]]:
        """Spatial size each U-Net runs at, in execution order (coarse to fine)."""
        shapes = [self.grid_shape]
        for _ in range(self.resolution_levels - 1):
            shapes.append(tuple(math.ceil(n / 2) for n in shapes[-1]))  # type: ignore[arg-type]
        order = shapes[::-1]
        return order + [self.grid_shape] * (self.n_steps - self.resolution_levels)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of lists and ints (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "grid_shape": list(self.grid_shape),
            "n_steps": self.n_steps,
            "down_channels": list(self.down_channels),
            "up_channels": list(self.up_channels),
            "input_channels": self.input_channels,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`InputError`."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown network configuration keys: {', '.join(unknown)}")
        return cls(**dict(values))


def _build_tree(
    config: NetworkConfig, device: torch.device | str | None
) -> tuple[nn.Module, torch.Tensor]:
    """The official module tree for ``config`` (U-Nets created coarse to fine), identity grid."""

    def step() -> FieldToMap:
        unet = UNet2(config.down_channels, config.up_channels, config.input_channels, device)
        return FieldToMap(unet)

    shapes = [config.grid_shape]
    for _ in range(config.resolution_levels - 1):
        shapes.append(tuple(math.ceil(n / 2) for n in shapes[-1]))  # type: ignore[arg-type]
    grids = [_identity(shape, device) for shape in shapes]  # shared by the steps of a level
    tree: nn.Module = step()
    for level in reversed(range(config.resolution_levels - 1)):
        tree = TwoStep(Downsample(tree), step(), grids[level])
    for _ in range(config.n_steps - config.resolution_levels):
        tree = TwoStep(tree, step(), grids[0])
    return tree, grids[0]


class RegistrationNetwork(nn.Module):
    """A uniGradICON-style network: pair of images in, pull-back map out.

    Parameters
    ----------
    config
        Network shape; defaults to :meth:`NetworkConfig.unigradicon`.
    device
        Where to create parameters and buffers (default: the CPU; ``"meta"`` for shapes only).

    Attributes
    ----------
    regis_net
        Root registration module; its ``state_dict()`` has the official checkpoint's keys.
    identity_grid
        ``[1, 3, n0, n1, n2]`` normalised identity coordinates (non-persistent buffer).
    metadata
        The model card read with the weights (see :func:`~regpipe.networks.network_from_file`);
        empty for a freshly built network.

    Notes
    -----
    Images are ``[B, input_channels, n0, n1, n2]`` tensors on ``config.grid_shape``, already
    normalised (see :mod:`regpipe.preprocess`). Call ``.eval()`` for inference: the U-Nets hold
    batch-norm layers whose running statistics come with the weights.
    """

    identity_grid: torch.Tensor

    def __init__(
        self, config: NetworkConfig | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.config = config if config is not None else NetworkConfig.unigradicon()
        self.metadata: dict[str, Any] = {}
        self.regis_net, grid = _build_tree(self.config, device)
        self.register_buffer("identity_grid", grid, persistent=False)

    def unets(self) -> list[UNet2]:
        """The U-Nets in execution order (coarse to fine)."""
        return [module for module in self.regis_net.modules() if isinstance(module, UNet2)]

    def check_pair(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        """Raise :class:`InputError` unless both images fit ``config``."""
        expected = (self.config.input_channels, *self.config.grid_shape)
        for name, image in (("moving", moving), ("fixed", fixed)):
            if not isinstance(image, torch.Tensor) or image.dim() != 5:
                raise InputError(f"{name} must be a 5-D tensor [B, C, n0, n1, n2]")
            if tuple(image.shape[1:]) != expected:
                raise InputError(
                    f"{name} has shape {tuple(image.shape)}, the network expects "
                    f"[B, {expected[0]}, {expected[1]}, {expected[2]}, {expected[3]}]"
                )
            if not image.is_floating_point():
                raise InputError(f"{name} must be a floating-point tensor, got {image.dtype}")
        if moving.shape[0] != fixed.shape[0]:
            raise InputError(
                f"moving and fixed batches differ: {moving.shape[0]} vs {fixed.shape[0]}"
            )

    def map(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateMap:
        """Pull-back map ``phi`` with ``moving(phi(x)) ~ fixed(x)`` (normalised coordinates).

        Parameters
        ----------
        moving, fixed
            ``[B, C, n0, n1, n2]`` images on the network grid.

        Returns
        -------
        A :class:`CoordinateMap` taking fixed-grid points ``[B or 1, 3, ...]`` to
        moving-image points.
        """
        self.check_pair(moving, fixed)
        return self.regis_net(moving, fixed)

    def displacement(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Pull-back displacement ``phi(x) - x`` on the fixed grid, ``[B, 3, n0, n1, n2]``.

        Normalised units (1 = the whole extent of that axis); channel ``c`` is along tensor
        axis ``c + 2``; it points from each fixed-grid point to where to sample ``moving``.
        """
        phi = self.map(moving, fixed)
        return phi(self.identity_grid, on_identity=True) - self.identity_grid

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`displacement`."""
        return self.displacement(moving, fixed)

    def step_displacements(self, moving: torch.Tensor, fixed: torch.Tensor) -> list[torch.Tensor]:
        """Raw output of every U-Net for this pair, coarse to fine.

        Returns
        -------
        ``n_steps`` tensors ``[B, 3, *shape]`` (shapes from
        :meth:`NetworkConfig.unet_grid_shapes`), each in normalised units on its own grid.
        """
        outputs: list[torch.Tensor] = []

        def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            outputs.append(output)

        hooks = [unet.register_forward_hook(record) for unet in self.unets()]
        try:
            self.map(moving, fixed)
        finally:
            for hook in hooks:
                hook.remove()
        return outputs


def build_network(
    config: NetworkConfig | None = None, device: torch.device | str | None = None
) -> RegistrationNetwork:
    """Build an untrained (identity-predicting) :class:`RegistrationNetwork` for ``config``.

    ``config`` defaults to :meth:`NetworkConfig.unigradicon`; ``device`` to the CPU.
    """
    return RegistrationNetwork(config, device)
