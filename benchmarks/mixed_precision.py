"""Does bfloat16 mixed precision keep the network's accuracy? float32 against bfloat16 autocast.

For each held-out development brain pair (``regpipe-bench --subset synth``: T1-like images from
SynthSeg label maps 01-10, never trained on), placed on the network grid after our affine
exactly as ``regpipe.register`` does (see ``network_grid_gain.py``), the network's displacement
is computed once in float32 and once under bfloat16 autocast, and the script reports the
difference of the two displacements (grid voxels: largest and mean over the grid), Dice of all
labels with >= 20 voxels on the grid after each, and the share of folded voxels (J <= 0) of
each. ``--device cuda`` measures the real thing (``regpipe.device.autocast``, what
``regpipe.register(mixed_precision=True)`` uses); on the CPU the same bfloat16 autocast runs
through ``torch.autocast("cpu")``, whose rounding of convolution inputs and outputs is the same,
so the accuracy effect is measured even without a GPU (the speed is not: CPU bfloat16
convolutions are not faster).

Example
-------
``python benchmarks/mixed_precision.py --dev-set ../shared/data --pairs 5
regpipe/data/weights/regpipe-compact.pt``

Data are read only from ``--dev-set``; nothing here is used by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_grid_gain import dev_pairs, grid_dice, warp_labels


def bf16_context(device: torch.device):
    """bfloat16 autocast on ``device``: regpipe's own on CUDA, torch's CPU autocast otherwise."""
    if device.type == "cuda":
        from regpipe.device import autocast

        return autocast(device, enabled=True)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def folding_percent(displacement: torch.Tensor) -> float:
    """Share (%) of grid voxels where ``g + U(g)`` folds (``U``: ``[1, 3, ...]`` grid-index
    units), with regpipe's own Jacobian and folding metrics on a unit-spacing grid."""
    from regpipe.metrics import folding_stats, jacobian_determinant
    from regpipe.spaces import Geometry
    from regpipe.transforms import DisplacementField

    field = displacement[0].permute(1, 2, 3, 0).numpy().astype(np.float32)
    grid = Geometry(field.shape[:3], np.eye(4))
    return folding_stats(jacobian_determinant(DisplacementField(grid, field)))["folding_percent"]


def main() -> None:
    from regpipe.device import select_device, set_threads
    from regpipe.networks import network_from_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--dev-set", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache/v1"))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    device = select_device(args.device)

    network = network_from_file(args.weights).to(device).eval()
    shape = tuple(network.config.grid_shape)
    mode = getattr(network, "metadata", {}).get("grid_mode", "squash")
    pairs = dev_pairs(args.dev_set, args.cache, args.pairs, shape, mode)
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32, device=device)
    scale = scale.view(1, 3, 1, 1, 1)
    print(f"{args.weights} on {device}, grid {shape}")
    print("| pair | max abs diff (voxels) | mean abs diff (voxels) | Dice fp32 | Dice bf16 |"
          " folding % fp32 | folding % bf16 |\n|---|---|---|---|---|---|---|")
    rows = []
    for name, moving, fixed, moving_labels, fixed_labels in pairs:
        moving, fixed = moving.to(device), fixed.to(device)
        results = {}
        for label, context in (("fp32", contextlib.nullcontext()), ("bf16", bf16_context(device))):
            with torch.no_grad(), context:
                displacement = network.displacement(moving, fixed).float() * scale
            results[label] = displacement.cpu()
        difference = (results["fp32"] - results["bf16"]).abs()
        dice = {k: grid_dice(warp_labels(moving_labels, v), fixed_labels)
                for k, v in results.items()}
        folds = {k: folding_percent(v) for k, v in results.items()}
        rows.append((float(difference.max()), float(difference.mean()), dice["fp32"], dice["bf16"],
                     folds["fp32"], folds["bf16"]))
        print(f"| {name} | {rows[-1][0]:.3f} | {rows[-1][1]:.4f} | {dice['fp32']:.4f} |"
              f" {dice['bf16']:.4f} | {folds['fp32']:.4f} | {folds['bf16']:.4f} |", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"| mean | {mean[0]:.3f} | {mean[1]:.4f} | {mean[2]:.4f} | {mean[3]:.4f} |"
          f" {mean[4]:.4f} | {mean[5]:.4f} |")


if __name__ == "__main__":
    main()
