"""Time, peak memory and agreement of ``regpipe-register`` vs ``unigradicon-register``.

Both command-line tools get the same random (non-trivial) weights in the official layout, the
same 1 mm brain pair and no instance optimisation; regpipe runs in uniGradICON's mode
(``--affine none --grid_mode squash``). Each tool runs as its own process; wall time and peak
resident memory come from ``os.wait4``. The warped images and the transforms (mapped points)
are then compared, which measures parity of the full 175^3 pipeline.

Usage (needs the test extras and the reference packages installed)::

    python benchmarks/cli_vs_unigradicon.py \
        --fixed ../shared/data/brain/mni152_fsl6/MNI152_T1_1mm_brain.nii.gz \
        --moving ../shared/data/brain/colin27/ch2bet.nii.gz --threads 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch


def random_official_weights(path: Path, seed: int = 0) -> None:
    """Save a randomised official-layout state dict (every parameter and BN statistic)."""
    from regpipe.networks import NetworkConfig, build_network

    torch.manual_seed(seed)
    network = build_network(NetworkConfig.unigradicon())
    state = network.regis_net.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=gen) * 0.5 + 0.75)
        elif key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
        elif key.endswith(".weight") and value.ndim == 1:  # BatchNorm scale
            value.copy_(1 + 0.1 * torch.randn(value.shape, generator=gen))
        else:
            fan_in = value[0].numel() if value.ndim > 1 else 16
            value.copy_(torch.randn(value.shape, generator=gen) / np.sqrt(fan_in))
    torch.save(state, path)


def run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MB) of that process tree's leader."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="regpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "random_Step_2_final.trch"
    if not weights.exists():
        random_official_weights(weights)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    bindir = Path(sys.executable).parent
    common = ["--fixed", args.fixed, "--moving", args.moving, "--fixed_modality", "mri",
              "--moving_modality", "mri", "--io_iterations", "None",
              "--network_weights", str(weights)]
    ref_cmd = [str(bindir / "unigradicon-register"), *common,
               "--transform_out", str(work / "ref_xfm.hdf5"),
               "--warped_moving_out", str(work / "ref_warped.nii.gz")]
    ours_cmd = [str(bindir / "regpipe-register"), *common,
                "--transform_out", str(work / "ours_xfm.h5"),
                "--warped_moving_out", str(work / "ours_warped.nii.gz"),
                "--affine", "none", "--grid_mode", "squash", "--no_symmetric",
                "--threads", str(args.threads), "--quiet"]
    if shutil.which(ref_cmd[0]) is None:
        raise SystemExit("unigradicon-register is not installed "
                         "(pip install --no-deps unigradicon==1.0.6)")
    ref_time, ref_mem = run(ref_cmd, env)
    ours_time, ours_mem = run(ours_cmd, env)

    ref = nib.load(str(work / "ref_warped.nii.gz")).get_fdata()
    ours = nib.load(str(work / "ours_warped.nii.gz")).get_fdata()
    scale = np.abs(ref).max()
    diff = np.abs(ref - ours)
    inner = diff[2:-2, 2:-2, 2:-2]

    ref_tx = sitk.ReadTransform(str(work / "ref_xfm.hdf5"))
    ours_tx = sitk.ReadTransform(str(work / "ours_xfm.h5"))
    fixed = sitk.ReadImage(args.fixed)
    rng = np.random.default_rng(0)
    size = np.asarray(fixed.GetSize())
    distances = []
    for index in rng.integers(2, size - 2, size=(2000, 3)):
        point = fixed.TransformIndexToPhysicalPoint([int(v) for v in index])
        a = np.asarray(ref_tx.TransformPoint(point))
        b = np.asarray(ours_tx.TransformPoint(point))
        distances.append(np.linalg.norm(a - b))
    distances = np.asarray(distances)

    print("| tool | wall time (s) | peak memory (MB) |")
    print("|---|---|---|")
    print(f"| unigradicon-register 1.0.6 | {ref_time:.1f} | {ref_mem:.0f} |")
    print(f"| regpipe-register | {ours_time:.1f} | {ours_mem:.0f} |")
    print()
    print(f"warped image: max |diff| {diff.max():.3g} (image max {scale:.3g}), "
          f"interior max {inner.max():.3g}, mean {diff.mean():.3g}")
    print(f"transform, 2000 interior fixed voxels: max distance {distances.max():.3g} mm, "
          f"mean {distances.mean():.3g} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
