"""What the symmetric network estimate costs: one more forward pass and an inversion.

Times, on random inputs at the network's grid, the single forward pass
(``network.displacement``), the second pass with the images swapped, and
its inversion (:meth:`regpipe.transforms.GridTransform.inverse`); median of ``--repeats`` runs
after one warm-up. The whole registration adds exactly the second pass and the inversion.
``--passes N`` also times ``N`` symmetric network passes (``register(network_passes=N)``).

Example
-------
``python benchmarks/symmetric_cost.py --weights regpipe/data/weights/regpipe-compact.pt
--threads 2``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    import torch

    from regpipe.networks import network_from_file
    from regpipe.registration import _network_displacement
    from regpipe.transforms import GridTransform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=1, help="also time N symmetric passes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    network = network_from_file(args.weights).eval()
    shape = network.config.grid_shape
    generator = torch.Generator().manual_seed(0)
    moving, fixed = (torch.rand((1, 1, *shape), generator=generator) for _ in range(2))

    def timed(function) -> float:
        function()  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    with torch.no_grad():
        backward = _network_displacement(network, fixed, moving)
        single = timed(lambda: _network_displacement(network, moving, fixed))
        both = timed(lambda: _network_displacement(network, moving, fixed, symmetric=True))
        identity = np.eye(4)
        inversion = timed(lambda: GridTransform(identity, backward[0], identity).inverse())
        repeated = timed(lambda: _network_displacement(network, moving, fixed, symmetric=True,
                                                       passes=args.passes))
    print(f"grid {shape}, {args.threads} thread(s), median of {args.repeats}:")
    print(f"  one direction {single:.2f} s, symmetric (both directions + inversion) {both:.2f} s, "
          f"of which the inversion {inversion:.2f} s")
    print(f"  extra per registration {both - single:.2f} s")
    if args.passes > 1:
        print(f"  {args.passes} symmetric passes {repeated:.2f} s "
              f"(+{repeated - both:.2f} s over one)")


if __name__ == "__main__":
    main()
