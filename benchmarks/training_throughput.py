"""Is training limited by the network or by the synthesis of its pairs? Throughput by
``--workers``.

``regpipe-train`` draws every pair on the CPU (label maps resampled through random
deformations, random intensities, blur, bias field, noise). On a CPU the network step takes far
longer than a draw; on a GPU it is the other way round, and ``--workers`` threads draw the next
steps' pairs while the device runs the current one. For each number of workers this script
measures, on the recipe's own data sources:

* ``pairs/s``: the synthesis alone (the pairs of ``--steps`` steps of ``--batch-size`` pairs);
* ``s/step`` and ``data wait``: a real training run of ``--steps`` steps (a freshly initialised
  network of the recipe's shape, in a temporary folder, nothing kept), and the share of its
  time the steps spent waiting for their pairs.

Example
-------
``python benchmarks/training_throughput.py --recipe training/compact.json --data-root
../shared/data --workers 0,1,2 --batch-size 4 --steps 10 [--device cuda]``

Data are read only from ``--data-root``; nothing here is used by the test suite. The pairs are
the same with any number of workers (tested in ``tests/test_training.py``), so only the speed
differs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from regpipe.cli.train import build_network_from, build_source, options_from
from regpipe.device import select_device, set_threads
from regpipe.pair_stream import PairStream
from regpipe.training import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--data-root", default=".")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated numbers of workers")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    settings = json.loads(Path(args.recipe).read_text(encoding="utf-8"))
    settings.pop("init", None)  # the speed does not depend on the weights
    device = select_device(args.device)
    network, _ = build_network_from(settings)
    shape = network.config.grid_shape
    started = time.perf_counter()
    source = build_source(settings["sources"], shape, Path(args.data_root),
                          settings.get("grid_mode", "squash"))
    print(f"device {device}, {torch.get_num_threads()} torch threads, grid {shape}, batch "
          f"{args.batch_size}, {args.steps} steps; sources built in "
          f"{time.perf_counter() - started:.1f} s")
    print("| workers | synthesis pairs/s | training s/step | data wait |")
    print("|---|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
        # the recipe's own options (as regpipe-train reads them), timed for a few steps
        options = options_from({**settings, "steps": args.steps, "batch_size": args.batch_size,
                                "device": str(device), "workers": workers, "no_progress": True,
                                "checkpoint_every": args.steps + 1, "budget": None,
                                "average_from": None})
        stream = PairStream(source, shape, seed=options.seed, batch_size=args.batch_size,
                            workers=workers, last_step=args.steps)
        t0 = time.perf_counter()
        try:
            for step in range(1, args.steps + 1):
                stream.pairs(step)
        finally:
            stream.close()
        rate = args.steps * args.batch_size / (time.perf_counter() - t0)
        fresh, _ = build_network_from(settings)
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            state = train(fresh, source, folder, options)
            spent = time.perf_counter() - t0
        print(f"| {workers} | {rate:.1f} | {spent / args.steps:.3f} | "
              f"{100 * state.data_wait_seconds / spent:.0f} % |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
