"""Does a network help after the affine? Dice on the network grid, before and after the network.

A quick check (seconds per weights file) for training runs: for each held-out development
brain pair (``regpipe-bench --subset synth``: T1-like images from SynthSeg label maps 01-10,
never trained on), our affine pre-alignment places the moving image and both label maps on the
network grid exactly as ``regpipe.register`` does; the script then reports the mean Dice of all
labels with >= 20 voxels on that grid before (affine only) and after the network's displacement.
With ``--recipe``, the same on pairs drawn from the recipe's first source (the training
distribution), which tells generalisation from learning.

Example
-------
``python benchmarks/network_grid_gain.py --dev-set ../shared/data --pairs 3
regpipe/data/weights/regpipe-compact.pt runs/compact/weights.pt``

Conditional weights files are evaluated at ``--condition`` (default ``brain,inter,1.5``).

Data are read only from ``--dev-set``; nothing here is used by the test suite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def grid_dice(moving: torch.Tensor, fixed: torch.Tensor, min_voxels: int = 20) -> float:
    """Mean Dice of the labels with at least ``min_voxels`` voxels in both maps."""
    from regpipe.metrics import dice_per_label

    a, b = moving.numpy(), fixed.numpy()
    labels = [int(k) for k in np.unique(b)
              if k != 0 and (a == k).sum() >= min_voxels and (b == k).sum() >= min_voxels]
    return float(np.mean(list(dice_per_label(a, b, labels).values())))


def warp_labels(labels: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Labels ``[1, 1, ...]`` pulled through a grid-index displacement (one-hot, linear,
    arg-max)."""
    from regpipe.spaces import index_grid, sample_at_indices

    values = torch.unique(labels)
    values = values[values > 0]
    one_hot = (labels == values.view(1, -1, 1, 1, 1)).float()
    points = index_grid(tuple(labels.shape[2:]), labels.device) + displacement
    warped = sample_at_indices(one_hot, points, "zeros")
    out = values[warped.argmax(1, keepdim=True)]
    out[warped.sum(1, keepdim=True) < 0.5] = 0
    return out


def dev_pairs(dev_set: Path, cache: Path, n_pairs: int, shape: tuple[int, ...], mode: str):
    from regpipe.affine import affine_register
    from regpipe.bench_pairs import load_pair
    from regpipe.devset import synth_pairs
    from regpipe.preprocess import network_input, normalize_intensity
    from regpipe.spaces import network_grid

    pairs = []
    for spec in synth_pairs(dev_set, cache, n_pairs):
        pair = load_pair(spec)
        fixed = normalize_intensity(pair.fixed.data, "mri")
        moving = normalize_intensity(pair.moving.data, "mri")
        affine = affine_register(fixed, pair.fixed.geometry, moving, pair.moving.geometry)
        grid_in = network_grid(pair.fixed.geometry, shape, mode)
        grid_out = affine.matrix @ grid_in

        def place(data, geometry, grid, nearest=False):
            return network_input(np.asarray(data, dtype=np.float32), geometry, grid, shape,
                                 nearest=nearest)

        pairs.append((
            spec.name, place(moving, pair.moving.geometry, grid_out),
            place(fixed, pair.fixed.geometry, grid_in),
            place(pair.moving_labels.data, pair.moving_labels.geometry, grid_out,
                  True).round().long(),
            place(pair.fixed_labels.data, pair.fixed.geometry, grid_in, True).round().long(),
        ))
    return pairs


def recipe_pairs(recipe: Path, data_root: Path, n_pairs: int, shape: tuple[int, ...]):
    from regpipe.cli.train import build_source

    settings = json.loads(recipe.read_text())
    source = build_source(settings["sources"][:1], shape, data_root,
                          settings.get("grid_mode", "squash"))
    generator = torch.Generator().manual_seed(11)
    pairs = []
    while len(pairs) < n_pairs:
        pair = source.draw(shape, generator)
        if pair.pair_type == "inter" and pair.moving_labels is not None:
            pairs.append((f"drawn-{len(pairs)}", pair.moving, pair.fixed, pair.moving_labels,
                          pair.fixed_labels))
    return pairs


def main() -> None:
    from regpipe.device import set_threads
    from regpipe.networks import network_from_file
    from regpipe.networks.condition import Condition
    from regpipe.networks.conditional import is_conditional

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", type=Path)
    parser.add_argument("--dev-set", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache/v1"))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--recipe", type=Path,
                        help="also draw pairs from this recipe's first source")
    parser.add_argument("--condition", default="brain,inter,1.5", metavar="REGION,TYPE,LAM",
                        help="condition of conditional weights files (default brain,inter,1.5)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    region, pair_type, lam = args.condition.split(",")
    condition = Condition(region, pair_type, lam=float(lam))

    networks = {path: network_from_file(path).eval() for path in args.weights}
    for network in networks.values():
        if is_conditional(network):
            network.set_condition(condition)
    first = next(iter(networks.values()))
    shape = tuple(first.config.grid_shape)
    mode = first.metadata.get("grid_mode", "squash") if hasattr(first, "metadata") else "squash"
    sets = {
        "held-out development pairs": dev_pairs(args.dev_set, args.cache, args.pairs, shape, mode)
    }
    if args.recipe:
        sets["pairs drawn from the recipe"] = recipe_pairs(args.recipe, args.dev_set, args.pairs,
                                                          shape)
    for title, pairs in sets.items():
        print(f"\n{title} (mean Dice on the {shape} grid, affine -> network)")
        for path, network in networks.items():
            gains, cells = [], []
            for _, moving, fixed, moving_labels, fixed_labels in pairs:
                with torch.no_grad():
                    normalised = network.displacement(moving, fixed)
                scale = torch.tensor([n - 1 for n in shape], dtype=normalised.dtype)
                before = grid_dice(moving_labels, fixed_labels)
                displacement = normalised * scale.view(1, 3, 1, 1, 1)
                after = grid_dice(warp_labels(moving_labels, displacement), fixed_labels)
                gains.append(after - before)
                cells.append(f"{before:.3f}->{after:.3f}")
            print(f"  {path}: {' '.join(cells)}  mean gain {np.mean(gains):+.3f}")


if __name__ == "__main__":
    main()
