"""What does one conditional model cost against separate task-specific models? (issue 5)

UniReg reports that one controllable model needs about half the training iterations of the
separate models it replaces. This script measures that claim at small scale, on the CPU, for
the smoothness condition (HyperMorph's setting): the tasks are registration at ``--lams``
(default 0.3, 1.5 and 6), each task's objective being LNCC + lam x GradICON at its lam.

- A tiny two-U-Net base network is pre-trained unconditionally (lam 1.5) on random-shape pairs.
- **Separate**: one copy of the base per task, trained at that task's fixed lam for
  ``--steps`` steps each (``len(lams) x steps`` steps in all).
- **Conditional**: one FiLM model built on the base, trained for ``len(lams) x steps`` steps
  with lam drawn log-uniformly over the tasks' range (as ``regpipe-train --conditional``).
- Every ``--eval-every`` steps each model is evaluated on the same held-out pairs at its
  task's lam(s) (:func:`conditioning_choice.evaluate`); the cost curve of the separate models
  is the mean task objective against the steps spent on all of them together.

Reported: both curves, the final objectives per task, and ``steps_to_match``: the fewest
conditional steps whose mean objective is at or below the separate models' final mean (and
its ratio to their total steps; < 1: the conditional model is cheaper). Everything runs on
the CPU in about 10 minutes per seed::

    python benchmarks/conditional_cost.py --steps 150 --threads 2 --seed 0 [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from conditioning_choice import evaluate

from regpipe.networks import (
    ConditionalRegistrationNetwork,
    ConditioningConfig,
    NetworkConfig,
    RegistrationNetwork,
    build_network,
)
from regpipe.training import TrainingOptions, train
from regpipe.training_data import RandomShapesSource


def _objective(metrics: dict[str, float], lam: float) -> float:
    return metrics["similarity"] + lam * metrics["gradicon"]


def _curve(
    network: RegistrationNetwork,
    folder: Path,
    total: int,
    every: int,
    options: dict[str, Any],
    pairs: list[Any],
    lams: list[float],
) -> tuple[list[dict[str, Any]], float]:
    """Train ``network`` to ``total`` steps in ``folder`` (resumed every ``every`` steps);
    returns the evaluation after each chunk and the seconds spent training."""
    points = [{"steps": 0, "metrics": evaluate(network, pairs, lams, seed=0)}]
    seconds = 0.0
    for end in range(every, total + 1, every):
        started = time.perf_counter()
        train(network, RandomShapesSource(), folder,
              TrainingOptions(steps=end, checkpoint_every=every, progress=False, device="cpu",
                              **options))  # fmt: skip
        seconds += time.perf_counter() - started
        points.append({"steps": end, "metrics": evaluate(network, pairs, lams, seed=0)})
    return points, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per separate model")
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--grid", type=int, default=25)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lams", default="0.3,1.5,6", help="the tasks' lam values")
    parser.add_argument("--eval-pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every")
    torch.set_num_threads(args.threads)
    lams = [float(v) for v in args.lams.split(",")]
    config = NetworkConfig((args.grid,) * 3, 2, (8, 16, 16), (8, 16, 16))
    total = args.steps * len(lams)

    torch.manual_seed(args.seed)
    base = build_network(config)
    generator = torch.Generator().manual_seed(10_000 + args.seed)
    pairs = [RandomShapesSource().draw(config.grid_shape, generator)
             for _ in range(args.eval_pairs)]
    common = {"lr": args.lr, "seed": args.seed + 2}
    with tempfile.TemporaryDirectory() as tmp:
        train(base, RandomShapesSource(), Path(tmp) / "base",
              TrainingOptions(steps=args.pretrain_steps, lr=args.lr, seed=args.seed + 1,
                              progress=False, device="cpu"))  # fmt: skip

        separate: dict[str, Any] = {}
        for lam in lams:
            points, seconds = _curve(copy.deepcopy(base), Path(tmp) / f"lam{lam:g}", args.steps,
                                     args.eval_every, {**common, "lam": lam}, pairs, [lam])
            separate[f"{lam:g}"] = {"points": points, "seconds": round(seconds, 1)}
            print(f"separate lam {lam:g}: {_objective(points[-1]['metrics'][f'{lam:g}'], lam):.4f}"
                  f" after {args.steps} steps ({seconds:.0f} s)", file=sys.stderr)

        conditional = ConditionalRegistrationNetwork.from_base(
            base, ConditioningConfig("film", lam_range=(min(lams), max(lams))))
        points, seconds = _curve(conditional, Path(tmp) / "conditional", total, args.eval_every,
                                 {**common, "lam_range": (min(lams), max(lams))}, pairs, lams)
        print(f"conditional: {total} steps ({seconds:.0f} s)", file=sys.stderr)

    def task(lam: float, index: int = -1) -> dict[str, float]:
        """The separate model of ``lam``'s metrics at its ``index``-th evaluation."""
        return separate[f"{lam:g}"]["points"][index]["metrics"][f"{lam:g}"]

    # Separate models: after k evaluation chunks each, k * every * len(lams) steps are spent.
    separate_curve = [
        {"steps": index * args.eval_every * len(lams),
         "objective": sum(_objective(task(lam, index), lam) for lam in lams) / len(lams)}
        for index in range(args.steps // args.eval_every + 1)
    ]  # fmt: skip
    conditional_curve = [
        {"steps": p["steps"],
         "objective": sum(_objective(p["metrics"][f"{lam:g}"], lam) for lam in lams) / len(lams)}
        for p in points
    ]  # fmt: skip
    target = separate_curve[-1]["objective"]
    reached = next((p["steps"] for p in conditional_curve if p["objective"] <= target), None)
    report = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"},
                     "network": config.to_dict()},
        "separate_curve": separate_curve,
        "conditional_curve": conditional_curve,
        "final_per_task": {
            f"{lam:g}": {
                "separate": round(_objective(task(lam), lam), 5),
                "conditional": round(_objective(points[-1]["metrics"][f"{lam:g}"], lam), 5),
                "separate_sd_log_j": task(lam)["sd_log_j"],
                "conditional_sd_log_j": points[-1]["metrics"][f"{lam:g}"]["sd_log_j"],
            }
            for lam in lams
        },
        "separate_total_steps": total,
        "separate_seconds": sum(s["seconds"] for s in separate.values()),
        "conditional_seconds": round(seconds, 1),
        "steps_to_match": reached,
        "steps_ratio": None if reached is None else round(reached / total, 3),
    }  # fmt: skip
    print(f"separate final mean objective {target:.4f} after {total} steps; conditional "
          f"{conditional_curve[-1]['objective']:.4f}; conditional reaches it at "
          f"{reached} steps", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
