"""Affine pre-alignment on real 1 mm brain pairs: regpipe's own versus ANTs' ``Affine``.

For each pair (moving Colin27 brain to a fixed MNI template brain, once as stored and once with
a known extra rotation and translation written into the moving image's header), the script
runs each method, times it, and reports

* NCC after: global normalised cross-correlation between the fixed image and the moving image
  resampled onto it, over the voxels where either is nonzero;
* TRE: distances (mm) between ``T(fixed landmark)`` and the moving landmark for the 32 AFIDs
  (the transform maps fixed to moving, so it is applied to the fixed landmarks).

A markdown table goes to stdout, with wall and CPU seconds (CPU counts every thread; on a
shared machine it is the steadier number). Needs the shared data folder; the test suite never
runs it::

    python benchmarks/affine_benchmark.py --threads 2 --repeats 3

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here: with the default (spinning) policy, idle
OpenMP workers of torch compete for the cores and a shared machine makes our small per-step
operations several times slower (ANTs' ITK threads are not OpenMP and do not care).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

DATA = Path("/work/shared/data")
MOVING = ("colin27/ch2bet.nii.gz", "tpl-Colin27_afids.fcsv")
FIXED = {
    "MNI152NLin6Asym": (
        "mni152_fsl6/MNI152_T1_1mm_brain.nii.gz",
        "tpl-MNI152NLin6Asym_afids.fcsv",
    ),
    "MNI152NLin2009cAsym": (
        "mni_icbm152_2009/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
        "tpl-MNI152NLin2009cAsym_afids.fcsv",
    ),
}


@dataclass(frozen=True)
class Pair:
    """A fixed and a moving image with their geometries and corresponding landmarks (RAS mm)."""

    name: str
    fixed: NDArray[np.float32]
    fixed_affine: NDArray[np.float64]
    fixed_points: NDArray[np.float64]
    moving: NDArray[np.float32]
    moving_affine: NDArray[np.float64]
    moving_points: NDArray[np.float64]


def read_fcsv(path: Path) -> NDArray[np.float64]:
    """Landmarks ``[n, 3]`` in RAS mm from a Slicer ``.fcsv``
    (:func:`regpipe.evaluation.read_fcsv`)."""
    from regpipe.evaluation import read_fcsv as read

    return read(path).points


def load(path: Path) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def extra_transform(degrees: float, millimetres: float, centre: NDArray) -> NDArray[np.float64]:
    """Rotation by ``degrees`` about an oblique axis through ``centre``, then a translation."""
    axis = np.array([0.6, -0.48, 0.64])
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    shift = millimetres * np.array([0.55, -0.65, 0.52]) / np.linalg.norm([0.55, -0.65, 0.52])
    matrix[:3, 3] = centre - rotation @ centre + shift
    return matrix


def build_pairs(data: Path, degrees: float, millimetres: float) -> list[Pair]:
    moving, moving_affine = load(data / "brain" / MOVING[0])
    moving_points = read_fcsv(data / "landmarks_afids" / MOVING[1])
    pairs = []
    for name, (image, landmarks) in FIXED.items():
        fixed, fixed_affine = load(data / "brain" / image)
        fixed_points = read_fcsv(data / "landmarks_afids" / landmarks)
        base = Pair(
            f"Colin27 -> {name}",
            fixed,
            fixed_affine,
            fixed_points,
            moving,
            moving_affine,
            moving_points,
        )
        pairs.append(base)
        if degrees or millimetres:
            # The moving image's content at world y moves to E^-1(y): header change, no resampling.
            extra = extra_transform(degrees, millimetres, moving_points.mean(0))
            inverse = np.linalg.inv(extra)
            moved_points = moving_points @ inverse[:3, :3].T + inverse[:3, 3]
            pairs.append(
                Pair(
                    f"{base.name} + {degrees:g} deg, {millimetres:g} mm",
                    fixed,
                    fixed_affine,
                    fixed_points,
                    moving,
                    inverse @ moving_affine,
                    moved_points,
                )
            )
    return pairs


def ncc_after(pair: Pair, matrix: NDArray[np.float64]) -> float:
    from regpipe.spaces import Geometry
    from regpipe.transforms import AffineTransform
    from regpipe.warp import warp_array

    fixed_geometry = Geometry(pair.fixed.shape, pair.fixed_affine)  # type: ignore[arg-type]
    moving_geometry = Geometry(pair.moving.shape, pair.moving_affine)  # type: ignore[arg-type]
    warped = warp_array(pair.moving, moving_geometry, AffineTransform(matrix), fixed_geometry)
    region = (pair.fixed != 0) | (warped != 0)
    a = pair.fixed[region] - pair.fixed[region].mean()
    b = warped[region] - warped[region].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def tre(pair: Pair, matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    mapped = pair.fixed_points @ matrix[:3, :3].T + matrix[:3, 3]
    return np.linalg.norm(mapped - pair.moving_points, axis=1)


def methods(ants_seed: int | None) -> dict[str, Callable[[Pair], NDArray[np.float64]]]:
    from regpipe.affine import affine_register
    from regpipe.ants_affine import ants_affine_register
    from regpipe.spaces import Geometry

    def run(function: Callable, pair: Pair, **kwargs: object) -> NDArray[np.float64]:
        transform = function(
            pair.fixed,
            Geometry(pair.fixed.shape, pair.fixed_affine),
            pair.moving,
            Geometry(pair.moving.shape, pair.moving_affine),
            **kwargs,
        )
        return transform.matrix

    return {
        "identity": lambda pair: np.eye(4),
        "regpipe affine_register": lambda pair: run(affine_register, pair),
        "ANTs Affine": lambda pair: run(ants_affine_register, pair, seed=ants_seed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="shared data folder")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (median time)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ITK threads")
    parser.add_argument("--degrees", type=float, default=15.0, help="extra rotation (0: none)")
    parser.add_argument("--millimetres", type=float, default=30.0, help="extra translation")
    parser.add_argument("--ants-seed", type=int, default=None, help="deterministic ANTs")
    parser.add_argument("--skip-ants", action="store_true", help="only regpipe's registration")
    args = parser.parse_args(argv)

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP
    import torch

    torch.set_num_threads(args.threads)
    print(
        f"threads {args.threads}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    pairs = build_pairs(args.data, args.degrees, args.millimetres)
    table = methods(args.ants_seed)
    if args.skip_ants:
        table.pop("ANTs Affine")
    print(
        "| pair | method | wall (s) | CPU (s) | NCC after | TRE mean (mm) | TRE median | TRE max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        for name, method in table.items():
            times, cpu, matrix = [], [], np.eye(4)
            for _ in range(args.repeats if name != "identity" else 1):
                start, start_cpu = time.perf_counter(), time.process_time()
                matrix = method(pair)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            errors = tre(pair, matrix)
            seconds = "- | -"
            if name != "identity":
                seconds = f"{statistics.median(times):.2f} | {statistics.median(cpu):.2f}"
            print(
                f"| {pair.name} | {name} | {seconds} | {ncc_after(pair, matrix):.4f} | "
                f"{errors.mean():.2f} | {np.median(errors):.2f} | {errors.max():.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
