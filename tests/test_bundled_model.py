"""The compact model shipped inside the package: present, small, documented, and useful."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from regpipe import weights
from regpipe.imageio import Image
from regpipe.networks import network_from_file
from regpipe.spaces import Geometry

BUNDLED = weights.bundled_dir() / "regpipe-compact.pt"
pytestmark = pytest.mark.skipif(not BUNDLED.exists(),
                                reason="bundled weights not in this checkout")


def test_bundled_model_is_the_default_and_small():
    assert weights.default_weights_name() == "regpipe-compact"
    assert weights.resolve_weights("regpipe-compact") == BUNDLED
    assert BUNDLED.stat().st_size < 15 * 1024**2


def test_bundled_model_loads_with_its_card():
    network = network_from_file(BUNDLED)
    card = network.metadata
    assert card["grid_mode"] == "squash-ras"
    assert card["training"]["steps"] > 0 and "hardware" in card["training"]
    assert network.config.n_steps == 2
    text = BUNDLED.with_suffix(".md").read_text(encoding="utf-8")
    for section in ("Architecture", "Training data", "Measured results", "Limitations"):
        assert section in text


def _blob_brain(shift: tuple[float, float, float]) -> Image:
    """A smooth 'brain' of nested ellipsoids on a 1.5 mm grid, optionally deformed."""
    shape = (96, 112, 96)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((g - c) / (s * 0.38)) ** 2
                    for g, c, s in zip(grid, centre, shape, strict=True)))
    image = (np.where(r < 1.0, 60.0, 0.0) + np.where(r < 0.75, 40.0, 0.0)
             + np.where(r < 0.35, -50.0, 0.0))
    image = ndimage.gaussian_filter(image.astype(np.float32), 1.0)
    if any(shift):
        warp = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(3, 8, 8, 8)), 1)
        field = np.stack([ndimage.zoom(w, np.array(shape) / 8, order=1) for w in warp])
        field = field / np.abs(field).max() * 3.0 + np.array(shift).reshape(3, 1, 1, 1)
        image = ndimage.map_coordinates(image, grid + field, order=1)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = -centre * 1.5
    return Image(image.astype(np.float32), Geometry(shape, affine))


def test_bundled_model_improves_alignment_of_a_deformed_pair():
    from regpipe.registration import register

    fixed, moving = _blob_brain((0, 0, 0)), _blob_brain((2.0, -1.5, 1.0))
    result = register(fixed, moving, affine="none", io_iterations=0, progress=False, threads=2)
    assert result.settings["weights"].endswith("regpipe-compact.pt")
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"] + 0.02
    assert result.metrics["folding_percent"] < 0.1


def test_bundled_model_keeps_its_prediction_under_bfloat16_autocast():
    """Mixed precision (``register(mixed_precision=True)`` on CUDA) runs the network under
    bfloat16 autocast; the CPU's bfloat16 autocast rounds convolutions the same way, so the
    accuracy cost is checked here without a GPU: well under a tenth of a grid voxel."""
    import torch

    from regpipe.preprocess import network_input, normalize_intensity
    from regpipe.spaces import network_grid

    network = network_from_file(BUNDLED).eval()
    shape = tuple(network.config.grid_shape)
    inputs = []
    for image in (_blob_brain((2.0, -1.5, 1.0)), _blob_brain((0, 0, 0))):
        grid = network_grid(image.geometry, shape, "squash-ras")
        inputs.append(network_input(normalize_intensity(image.data, "mri"), image.geometry, grid,
                                    shape))
    with torch.no_grad():
        full = network.displacement(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = network.displacement(*inputs).float()
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(1, 3, 1, 1, 1)
    difference = ((full - half) * scale).abs()
    assert float((full * scale).abs().max()) > 0.5  # the network does move the image
    assert 0 < float(difference.max()) < 0.1  # bfloat16 was in effect, and costs little
    assert float(difference.mean()) < 0.01
