"""Fast instance optimisation under a time budget: from the network's output vs from the affine.

Runs ``regpipe.register`` (whole process: affine, network, optimisation, inverse, warp) on the
held-out development brain pairs of ``regpipe-bench --subset synth`` (T1-like images from the
SynthSeg label maps 01-10, never used in training) with several instance-optimisation
settings, each once with the network (``--weights``) and once without (affine start), and
evaluates every result like ``regpipe-bench`` does: mean Dice over the main aseg structures,
SD of log J and folding inside the fixed brain, wall time.

Each configuration is ``name:steps:io_grid[:coarse,fine]``: ``steps`` fast-IO iterations at
the finest level, the IO grid's largest size per axis, and optionally the iterations of the
coarse and fine level as multiples of ``steps`` (``FastIOSettings.level_steps``).

Example
-------
``python benchmarks/io_budget.py --dev-set ../shared/data
--configs default:50:160 quick:30:128:2,0.5``

Data are read only from ``--dev-set``; nothing here is used by the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def parse_config(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"bad configuration {text!r}: name:steps:io_grid[:coarse,fine]")
    config = {"name": parts[0], "steps": int(parts[1]), "io_grid": int(parts[2]), "io_options": {}}
    if len(parts) == 4:
        config["io_options"]["level_steps"] = tuple(float(v) for v in parts[3].split(","))
    return config


def main() -> None:
    from regpipe.bench_pairs import load_pair
    from regpipe.devset import synth_pairs
    from regpipe.evaluation import evaluate_transform
    from regpipe.registration import register
    from regpipe.resources import measure_resources

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-set", type=Path, required=True, help="the shared data folder")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache/v1"))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=["default:50:160"])
    parser.add_argument("--weights", default="default")
    parser.add_argument("--starts", default="network,affine",
                        help="network (the --weights output) and/or affine (no network)")
    parser.add_argument("--tuning", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra FastIOSettings fields for every run, e.g. diffusion=0.7")
    parser.add_argument("--smoothness", type=float, default=None,
                        help="lambda for a conditional --weights file (regpipe-conditional)")
    parser.add_argument("--region", default=None, help="body region for a conditional model")
    parser.add_argument("--pair-type", default=None,
                        help="inter or intra, for a conditional model")
    parser.add_argument("--no-symmetric", dest="symmetric", action="store_false",
                        help="the network's single pass (how the tables before 2026-11-22 "
                        "were measured)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("runs/io_budget.json"))
    args = parser.parse_args()

    configs = [parse_config(c) for c in args.configs]
    for item in args.tuning:
        key, _, value = item.partition("=")
        for config in configs:
            config["io_options"][key] = float(value)
    condition = {k: v for k, v in (("smoothness", args.smoothness), ("region", args.region),
                                    ("pair_type", args.pair_type)) if v is not None}
    pairs = [load_pair(p) for p in synth_pairs(args.dev_set, args.cache, args.pairs)]
    rows = []
    for config in configs:
        for start in args.starts.split(","):
            weights = args.weights if start == "network" else None
            for pair in pairs:
                with measure_resources() as usage:
                    result = register(
                        pair.fixed, pair.moving, weights=weights, affine="ours",
                        io_iterations=config["steps"], io_method="fast", io_grid=config["io_grid"],
                        io_options=config["io_options"], threads=args.threads, seed=0,
                        symmetric=args.symmetric,
                        progress=False, evaluate=False, **(condition if weights else {}),
                    )
                metrics = evaluate_transform(
                    result.forward, pair.fixed.geometry, region=pair.region,
                    fixed_labels=pair.fixed_labels.data,
                    moving_labels=(pair.moving_labels.data, pair.moving_labels.geometry),
                    labels=pair.spec.labels,
                )
                reported = ("dice_mean", "sd_log_jacobian", "folding_percent")
                row = {"config": config["name"], "start": start, "pair": pair.spec.name,
                       "runtime_s": usage.runtime_s, **{k: metrics[k] for k in reported}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    print("\n| configuration | start | Dice | SD log J | folding % | time s |"
          "\n|---|---|---|---|---|---|")
    for config in configs:
        for start in args.starts.split(","):
            chosen = [r for r in rows if r["config"] == config["name"] and r["start"] == start]
            dice = [r["dice_mean"] for r in chosen]
            dice_sd = statistics.stdev(dice) if len(dice) > 1 else 0
            print(f"| {config['name']} ({config['steps']} steps, grid {config['io_grid']}"
                  f"{', ' + str(config['io_options']) if config['io_options'] else ''})"
                  f" | {start} | {statistics.mean(dice):.3f} ± {dice_sd:.3f}"
                  f" | {statistics.mean(r['sd_log_jacobian'] for r in chosen):.3f}"
                  f" | {statistics.mean(r['folding_percent'] for r in chosen):.4f}"
                  f" | {statistics.mean(r['runtime_s'] for r in chosen):.1f} |")


if __name__ == "__main__":
    main()
