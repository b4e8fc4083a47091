"""FiLM or dynamic heads? Train both conditional variants the same way and compare.

A tiny base network is first trained (unconditionally, lam 1.5) on random-shape pairs; the
FiLM and the dynamic-head variant are then built on a copy of it and trained for the same
steps on the same pairs with the same lam draws (log-uniform in ``--lam-range``, also the
GradICON weight). As a reference the base network continues unconditionally for those steps.
Each network is then evaluated on held-out pairs at several lam:

- ``similarity``: the LNCC loss of the objective (both directions; lower is better);
- ``gradicon``: the GradICON term (lower: more inverse-consistent);
- ``grad2``: mean squared spatial gradient of the displacement, in grid units (lower is
  smoother): the smoothness the condition should control;
- ``sd_log_j``: standard deviation of log Jacobian determinant; ``folds``: folded cells.

Reported per variant: the metrics per lam, ``response`` = grad2 at the lowest lam over grad2
at the highest (> 1: the lam condition works; larger: stronger control), whether grad2
decreases monotonically with lam, seconds per training step and the controller's parameters.
Everything runs on the CPU in a few minutes::

    python benchmarks/conditioning_choice.py --steps 150 --threads 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import tempfile
import time
from typing import Any

import torch

from regpipe.losses import cell_jacobian_determinant, gradicon_objective
from regpipe.networks import (
    Condition,
    ConditionalRegistrationNetwork,
    ConditioningConfig,
    NetworkConfig,
    RegistrationNetwork,
    build_network,
)
from regpipe.training import TrainingOptions, train
from regpipe.training_data import RandomShapesSource


def _train(network: RegistrationNetwork, steps: int, lam_range: tuple[float, float] | None,
           seed: int, lr: float) -> float:
    """Train in a throw-away folder; returns seconds per step."""
    options = TrainingOptions(steps=steps, lr=lr, lam_range=lam_range, seed=seed,
                              progress=False, checkpoint_every=10**9, device="cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        train(network, RandomShapesSource(), folder, options)
    return (time.perf_counter() - started) / max(steps, 1)


@torch.no_grad()
def evaluate(network: RegistrationNetwork, pairs: list[Any], lams: list[float],
             seed: int | None = None) -> dict:
    """Mean metrics of ``network`` on ``pairs`` at each lam; with ``seed``, the GradICON
    term's random perturbations are drawn from that seed for every pair (same draws for every
    network: comparable numbers)."""
    network.eval()
    results: dict[str, dict[str, float]] = {}
    for lam in lams:
        sums = {"similarity": 0.0, "gradicon": 0.0, "grad2": 0.0, "sd_log_j": 0.0, "folds": 0.0}
        for pair in pairs:
            if seed is not None:
                torch.manual_seed(seed)
            if isinstance(network, ConditionalRegistrationNetwork):
                network.set_condition(Condition(pair.region, pair.pair_type, lam))
            terms = gradicon_objective(network, pair.moving, pair.fixed, "lncc", lam)
            field = network.displacement(pair.moving, pair.fixed)
            scale = torch.tensor([n - 1 for n in field.shape[2:]]).view(1, 3, 1, 1, 1)
            grid_units = field * scale
            grad2 = sum(torch.diff(grid_units, dim=axis).pow(2).mean() for axis in (2, 3, 4))
            coordinates = network.identity_grid + field
            log_j = cell_jacobian_determinant(coordinates).clamp_min(1e-3).log()
            sums["similarity"] += float(terms.similarity_loss)
            sums["gradicon"] += float(terms.inverse_consistency_loss)
            sums["grad2"] += float(grad2)
            sums["sd_log_j"] += float(log_j.std())
            sums["folds"] += float(terms.flips)
        results[f"{lam:g}"] = {k: round(v / len(pairs), 6) for k, v in sums.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per variant")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="unconditional steps of the shared base network")
    parser.add_argument("--grid", type=int, default=33)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lam-range", type=float, nargs=2, default=(0.3, 6.0))
    parser.add_argument("--eval-pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    low, high = args.lam_range
    lams = [low, 1.5, high]
    config = NetworkConfig((args.grid,) * 3, 2, (8, 16, 16), (8, 16, 16))

    torch.manual_seed(args.seed)
    base = build_network(config)
    pretrain_seconds = _train(base, args.pretrain_steps, None, args.seed + 1, args.lr)
    generator = torch.Generator().manual_seed(10_000 + args.seed)
    pairs = [RandomShapesSource().draw(config.grid_shape, generator)
             for _ in range(args.eval_pairs)]

    report: dict[str, Any] = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"},
                     "network": config.to_dict(),
                     "pretrain_s_per_step": round(pretrain_seconds, 3)},
        "variants": {},
    }
    variants: dict[str, RegistrationNetwork] = {"none": copy.deepcopy(base)}
    for mode in ("film", "dynamic"):
        variants[mode] = ConditionalRegistrationNetwork.from_base(
            base, ConditioningConfig(mode, lam_range=(low, high)))  # type: ignore[arg-type]
    for name, network in variants.items():
        seconds = _train(network, args.steps, None if name == "none" else (low, high),
                         args.seed + 2, args.lr)
        metrics = evaluate(network, pairs, lams)
        grad2 = [metrics[f"{lam:g}"]["grad2"] for lam in lams]
        controller = getattr(network, "controller", None)
        report["variants"][name] = {
            "seconds_per_step": round(seconds, 3),
            "controller_parameters": sum(p.numel() for p in controller.parameters())
            if controller is not None else 0,
            "metrics": metrics,
            "response": round(grad2[0] / max(grad2[-1], 1e-12), 3),
            "monotonic": all(a >= b for a, b in itertools.pairwise(grad2)),
        }
        variant = report["variants"][name]
        print(f"{name:8s} {seconds:6.2f} s/step  response {variant['response']:.3f}"
              f"  monotonic {variant['monotonic']}", file=sys.stderr)
        for lam in lams:
            row = metrics[f"{lam:g}"]
            print(f"    lam {lam:4g}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()),
                  file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
