"""Shared test helpers: small synthetic volumes and geometries (no files unless asked)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from regpipe.spaces import Geometry


def make_affine(kind: str, shape=(24, 20, 16)) -> np.ndarray:
    """4x4 voxel->RAS affine of a named orientation (RAS, LPS, LIA, oblique, anisotropic)."""
    spacing = {"anisotropic": (0.8, 1.1, 2.5)}.get(kind, (1.5, 1.5, 1.5))
    if kind in ("RAS", "anisotropic"):
        rot = np.eye(3)
    elif kind == "LPS":
        rot = np.diag([-1.0, -1.0, 1.0])
    elif kind == "LIA":
        rot = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    elif kind == "oblique":
        rot = Rotation.from_euler("xyz", [12, -8, 20], degrees=True).as_matrix()
    else:
        raise ValueError(kind)
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(spacing)
    center = (np.asarray(shape) - 1) / 2
    affine[:3, 3] = np.array([3.0, -7.0, 11.0]) - affine[:3, :3] @ center
    return affine


ORIENTATIONS = ["RAS", "LPS", "LIA", "oblique", "anisotropic"]


@pytest.fixture(params=ORIENTATIONS)
def geometry(request) -> Geometry:
    return Geometry((24, 20, 16), make_affine(request.param))


def blob_image(geometry: Geometry, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric phantom in world space (so every orientation shows the same object)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), -1)
    xyz = geometry.voxel_to_world(ijk.astype(float)) - geometry.center_world()
    r = np.linalg.norm(xyz / np.array([14.0, 12.0, 10.0]), axis=-1)
    image = np.exp(-4 * r**2) + 0.6 * np.exp(-((xyz[..., 0] - 4) ** 2 + (xyz[..., 1] + 3) ** 2
                                               + xyz[..., 2] ** 2) / 8.0)
    rng = np.random.default_rng(seed)
    return (image + 0.01 * rng.standard_normal(image.shape)).astype(np.float32)
