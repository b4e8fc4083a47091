"""Time one network forward pass (one direction) at the official 175^3 grid on the CPU.

Compares regpipe's :class:`~regpipe.networks.RegistrationNetwork` with the reference
(``unigradicon.make_network``, needs ``icon_registration`` and ``unigradicon``) on the same
random weights and images. Each implementation runs in its own process so its peak resident
memory (``ru_maxrss``) is its own; the parent also reports the largest difference between the
two displacement fields.

Usage::

    python benchmarks/network_forward.py                 # both, 2 threads, 2 repeats
    python benchmarks/network_forward.py --impl ours --threads 4 --grid 96
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def random_state(template: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random values for every tensor of a state dict (BN statistics included)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in template.items():
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        elif "batchNorms" in key and key.endswith(("weight", "running_var")):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif value.dim() > 1:
            bound = 1 / value[0].numel() ** 0.5
            state[key] = (2 * torch.rand(value.shape, generator=generator) - 1) * bound
        else:
            state[key] = 0.2 * torch.rand(value.shape, generator=generator) - 0.1
    return state


def images(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pair = torch.rand(2, 1, grid, grid, grid, generator=generator)
    pair = F.avg_pool3d(pair, 5, stride=1, padding=2, count_include_pad=False)
    return pair[:1], pair[1:]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(impl: str, grid: int, repeats: int, out: Path | None) -> dict[str, object]:
    """Build one implementation, load the random weights, time ``repeats`` forward passes."""
    started = time.perf_counter()
    if impl == "ours":
        from regpipe.networks import NetworkConfig, build_network, load_weights

        network = build_network(NetworkConfig(grid_shape=(grid,) * 3)).eval()
        load_weights(network, random_state(network.regis_net.state_dict()))

        def forward(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
            return network.displacement(moving, fixed)

    else:
        import unigradicon

        model = unigradicon.make_network([1, 1, grid, grid, grid], include_last_step=True).eval()
        model.regis_net.load_state_dict(random_state(model.regis_net.state_dict()))

        def forward(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
            model.identity_map.isIdentity = True
            phi = model.regis_net(moving, fixed)
            return phi(model.identity_map) - model.identity_map

    build_s = time.perf_counter() - started
    moving, fixed = images(grid)
    rss_before = rss_mb()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            field = forward(moving, fixed)
            times.append(time.perf_counter() - started)
    if out is not None:
        torch.save(field, out)
    return {
        "impl": impl,
        "grid": grid,
        "threads": torch.get_num_threads(),
        "build_s": round(build_s, 2),
        "forward_s": [round(t, 2) for t in times],
        "peak_rss_before_forward_mb": round(rss_before),
        "peak_rss_mb": round(rss_mb()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["ours", "reference", "both"], default="both")
    parser.add_argument("--grid", type=int, default=175)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="save the displacement here (one impl only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.impl != "both":
        print(json.dumps(run_one(args.impl, args.grid, args.repeats, args.out)))
        return
    with tempfile.TemporaryDirectory() as folder:
        fields = {}
        for impl in ("ours", "reference"):
            fields[impl] = Path(folder) / f"{impl}.pt"
            command = [
                sys.executable, __file__, "--impl", impl, "--grid", str(args.grid),
                "--threads", str(args.threads), "--repeats", str(args.repeats),
                "--out", str(fields[impl]),
            ]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            print(result.stdout.strip().splitlines()[-1])
        ours, reference = (torch.load(fields[i], weights_only=True) for i in ("ours", "reference"))
        print(json.dumps({"max_abs_difference": float((ours - reference).abs().max())}))


if __name__ == "__main__":
    main()
