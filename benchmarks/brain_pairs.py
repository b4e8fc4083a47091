"""Development benchmark: inter-subject brain registration on real anatomy, ours vs ANTs SyN.

The 20 SynthSeg training label maps (256^3, 1 mm, aseg ids; whole-head, no intensity images)
are turned into T1-like skull-stripped images: every brain label (id < 100) gets a fixed
plausible T1 intensity (white matter bright, cortex darker, CSF dark, deep grey matter in
between), everything else is zero, then a light blur and seeded noise are added. Pairs are
``01 -> 02``, ``03 -> 04``... (fixed, moving), so fixed and moving are always different subjects.

For every pair and method the benchmark reports mean Dice over the main aseg structures
(labels 0 < id < 100 except the extra-cerebral CSF 24, with at least ``--min-voxels`` voxels in
both subjects), the standard deviation of log J and the folding percentage (J <= 0) inside the
fixed brain mask, both evaluated on the fixed 1 mm grid, and the run time.

Methods
-------
affine
    Our affine pre-alignment only (:func:`regpipe.affine.affine_register`).
ours
    Affine, then :func:`regpipe.fast_io.optimise_displacement` from a zero displacement (no
    network) on the network grid (``--grid``, squash placement over the fixed image). The time
    reported is the optimisation's; the affine's is reported separately.
pipeline
    The same through ``regpipe.register(..., weights=None, io_method="fast")`` (whole process).
network, network+io
    ``regpipe.register(..., weights=--weights)`` without / with the fast instance optimisation
    (whole process: reading aside, affine, network, IO, transform; ``--steps`` IO steps).
syn, synquick
    ``ants.registration(type_of_transform="SyN" / "antsRegistrationSyNQuick[s]")`` from antspyx,
    default parameters (its own affine stage included in the time).

Example
-------
``python benchmarks/brain_pairs.py --data ../shared/data/brain/synthseg_label_maps --pairs 5``

Data are read only from ``--data``; nothing here is used by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

# The synthetic T1 images and the label selection are the library's (``regpipe-bench
# --dev-set`` builds the same pairs); this script keeps its own method variants for tuning.
from regpipe.devset import BRAIN_MAX_LABEL, dice_labels, synthetic_t1

#: Margin (voxels, mm) around the fixed brain's bounding box where all methods are evaluated.
EVAL_MARGIN = 12


@dataclass
class Subject:
    """One subject: integer labels, synthetic T1 and geometry (nibabel voxel order)."""

    name: str
    labels: NDArray[np.int16]
    image: NDArray[np.float32]
    affine: NDArray[np.float64]

    @property
    def brain(self) -> NDArray[np.bool_]:
        return (self.labels > 0) & (self.labels < BRAIN_MAX_LABEL)

    def box(self, margin: int = EVAL_MARGIN) -> tuple[slice, slice, slice]:
        """Bounding box of the brain plus ``margin`` voxels (where metrics are evaluated)."""
        where = np.nonzero(self.brain)
        return tuple(  # type: ignore[return-value]
            slice(max(int(w.min()) - margin, 0), min(int(w.max()) + margin + 1, n))
            for w, n in zip(where, self.labels.shape, strict=True)
        )


def load_subject(folder: Path, index: int) -> Subject:
    """Read ``training_seg_XX.nii.gz`` and synthesise its T1 (seed = subject index)."""
    path = folder / f"training_seg_{index:02d}.nii.gz"
    nii = nib.load(path)
    labels = np.rint(np.asanyarray(nii.dataobj)).astype(np.int16)
    return Subject(path.name[:-7], labels, synthetic_t1(labels, seed=index), nii.affine)


def mean_dice(fixed: NDArray, warped: NDArray, labels: Sequence[int]) -> float:
    """Mean Dice over ``labels``."""
    scores = []
    for label in labels:
        a, b = fixed == label, warped == label
        scores.append(2.0 * np.logical_and(a, b).sum() / max(int(a.sum() + b.sum()), 1))
    return float(np.mean(scores))


def jacobian_summary(jacobian: NDArray, mask: NDArray) -> dict[str, float]:
    """SD of log J (J > 0) and folding percentage (J <= 0) inside ``mask``."""
    values = jacobian[mask].astype(np.float64)
    positive = values[values > 0]
    return {
        "sd_log_j": float(np.std(np.log(positive))),
        "folding_pct": float(100.0 * np.mean(values <= 0)),
    }


# --------------------------------------------------------------------------- methods


def run_affine(fixed: Subject, moving: Subject) -> tuple[Any, float]:
    """Our affine (fixed -> moving RAS+ mm) and its run time in s."""
    from regpipe.affine import affine_register
    from regpipe.spaces import Geometry

    geometry_f = Geometry(fixed.labels.shape, fixed.affine)
    geometry_m = Geometry(moving.labels.shape, moving.affine)
    started = time.perf_counter()
    transform = affine_register(fixed.image, geometry_f, moving.image, geometry_m)
    return transform, time.perf_counter() - started


def evaluate_transform(fixed: Subject, moving: Subject, transform: Any, labels: list[int]) -> dict:
    """Dice, SD log J and folding of a regpipe transform (fixed -> moving) on the fixed grid."""
    from regpipe.metrics import jacobian_determinant
    from regpipe.spaces import Geometry
    from regpipe.transforms import DisplacementField
    from regpipe.warp import warp_array

    box = fixed.box()
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    shape = tuple(b.stop - b.start for b in box)
    geometry_f = Geometry(shape, fixed.affine @ shift)  # type: ignore[arg-type]
    geometry_m = Geometry(moving.labels.shape, moving.affine)
    warped = warp_array(moving.labels, geometry_m, transform, geometry_f, interpolation="nearest")
    result = {"dice": mean_dice(fixed.labels[box], warped, labels)}
    field = DisplacementField.from_transform(transform, geometry_f)
    result.update(jacobian_summary(jacobian_determinant(field), fixed.brain[box]))
    return result


def run_ours(
    fixed: Subject, moving: Subject, affine: Any, grid: int, steps: int, tuning: dict
) -> tuple[Any, float]:
    """Fast instance optimisation from the affine (zero network displacement)."""
    import torch

    from regpipe.fast_io import optimise_displacement
    from regpipe.preprocess import network_input, normalize_intensity
    from regpipe.spaces import Geometry, network_grid
    from regpipe.transforms import GridTransform

    geometry_f = Geometry(fixed.labels.shape, fixed.affine)
    geometry_m = Geometry(moving.labels.shape, moving.affine)
    shape = (grid, grid, grid)
    grid_in = network_grid(geometry_f, shape, "squash")
    grid_out = affine.matrix @ grid_in
    fixed_t = network_input(normalize_intensity(fixed.image, "mri"), geometry_f, grid_in, shape,
                            squash=True)
    moving_t = network_input(normalize_intensity(moving.image, "mri"), geometry_m, grid_out, shape)
    spacing = [float(np.linalg.norm(grid_in[:3, a])) for a in range(3)]
    zero = torch.zeros((1, 3, *shape))
    started = time.perf_counter()
    displacement = optimise_displacement(
        moving_t, fixed_t, zero, steps=steps, grid_spacing_mm=spacing, progress=False, **tuning
    )
    seconds = time.perf_counter() - started
    return GridTransform(grid_in, displacement[0], grid_out), seconds


def run_pipeline(
    fixed: Subject, moving: Subject, steps: int, threads: int, weights: Any = None
) -> tuple[Any, float]:
    """The whole ``regpipe.register`` process (``weights=None``: no network)."""
    import regpipe
    from regpipe.imageio import Image
    from regpipe.spaces import Geometry

    register = getattr(regpipe, "register", None)
    if register is None:
        from regpipe.registration import register
    started = time.perf_counter()
    result = register(
        Image(fixed.image, Geometry(fixed.labels.shape, fixed.affine)),
        Image(moving.image, Geometry(moving.labels.shape, moving.affine)),
        weights=weights, affine="ours", io_iterations=steps, io_method="fast", progress=False,
        threads=threads,
    )
    return result.forward, time.perf_counter() - started


def run_ants(fixed: Subject, moving: Subject, kind: str, labels: list[int]) -> dict:
    """ANTs registration (antspyx), warped labels, Jacobian of its warp on the fixed grid."""
    import ants

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, subject, data in (
            ("fixed", fixed, fixed.image), ("moving", moving, moving.image),
            ("moving_labels", moving, moving.labels.astype(np.float32)),
        ):
            paths[name] = os.path.join(tmp, f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(data, subject.affine), paths[name])
        fixed_a = ants.image_read(paths["fixed"])
        moving_a = ants.image_read(paths["moving"])
        labels_a = ants.image_read(paths["moving_labels"])
        started = time.perf_counter()
        out = ants.registration(fixed_a, moving_a, type_of_transform=kind, outprefix=tmp + "/reg")
        seconds = time.perf_counter() - started
        transforms = out["fwdtransforms"]
        warped = ants.apply_transforms(
            fixed_a, labels_a, transforms, interpolator="nearestNeighbor",
            whichtoinvert=[False] * len(transforms),
        ).numpy()
        box = fixed.box()
        warped_labels = np.rint(warped).astype(np.int16)[box]
        result = {"dice": mean_dice(fixed.labels[box], warped_labels, labels)}
        warps = [t for t in transforms if t.endswith(".nii.gz") and "Inverse" not in t]
        if warps:
            jac = ants.create_jacobian_determinant_image(fixed_a, warps[0]).numpy()
        else:
            jac = np.ones(fixed.labels.shape, dtype=np.float32)
        result.update(jacobian_summary(jac[box], fixed.brain[box]))
    result["time_s"] = seconds
    return result


# --------------------------------------------------------------------------- driver


def parse_tuning(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs (values parsed as JSON when possible, lists -> tuples)."""
    tuning: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        tuning[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return tuning


def summarise(rows: list[dict]) -> str:
    """Markdown table: one row per method, means over pairs."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| method | pairs | Dice | SD log J | folding % | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        keys = ("dice", "sd_log_j", "folding_pct", "time_s")
        mean = {key: float(np.mean([r[key] for r in sel])) for key in keys}
        lines.append(
            f"| {method} | {len(sel)} | {mean['dice']:.4f} | {mean['sd_log_j']:.3f} | "
            f"{mean['folding_pct']:.4f} | {mean['time_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of training_seg_XX.nii.gz")
    parser.add_argument("--pairs", type=int, default=5,
                        help="number of pairs (01->02, 03->04, ...)")
    parser.add_argument(
        "--methods", default="affine,ours,syn",
        help="comma list of affine, ours, pipeline, network, network+io, syn, synquick",
    )
    parser.add_argument("--weights", default="default", help="weights of network, network+io")
    parser.add_argument("--grid", type=int, default=128, help="network grid size per axis")
    parser.add_argument("--steps", type=int, default=None, help="fast IO steps (default: library)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and ITK)")
    parser.add_argument("--min-voxels", type=int, default=1000, help="smallest structure for Dice")
    parser.add_argument("--tune", nargs="*", default=[], help="fast IO options as key=value")
    parser.add_argument("--json", type=Path, default=None, help="write per-pair rows here")
    args = parser.parse_args(argv)

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from regpipe.fast_io import DEFAULT_STEPS

    steps = DEFAULT_STEPS if args.steps is None else args.steps
    tuning = parse_tuning(args.tune)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: list[dict] = []
    for pair in range(args.pairs):
        fixed = load_subject(args.data, 2 * pair + 1)
        moving = load_subject(args.data, 2 * pair + 2)
        labels = dice_labels(fixed.labels, moving.labels, args.min_voxels)
        affine = None
        for method in methods:
            if method in ("affine", "ours") and affine is None:
                affine, affine_seconds = run_affine(fixed, moving)
            if method == "affine":
                row = evaluate_transform(fixed, moving, affine, labels)
                row["time_s"] = affine_seconds
            elif method == "ours":
                transform, seconds = run_ours(fixed, moving, affine, args.grid, steps, tuning)
                row = evaluate_transform(fixed, moving, transform, labels)
                row["time_s"] = seconds
            elif method == "pipeline":
                transform, seconds = run_pipeline(fixed, moving, steps, args.threads)
                row = evaluate_transform(fixed, moving, transform, labels)
                row["time_s"] = seconds
            elif method in ("network", "network+io"):
                io_steps = 0 if method == "network" else steps
                transform, seconds = run_pipeline(fixed, moving, io_steps, args.threads,
                                                  args.weights)
                row = evaluate_transform(fixed, moving, transform, labels)
                row["time_s"] = seconds
            elif method in ("syn", "synquick"):
                kind = "SyN" if method == "syn" else "antsRegistrationSyNQuick[s]"
                row = run_ants(fixed, moving, kind, labels)
            else:
                parser.error(f"unknown method {method!r}")
            row.update(method=method, pair=f"{fixed.name}->{moving.name}", labels=len(labels))
            rows.append(row)
            print(
                f"{row['pair']} {method:9s} Dice {row['dice']:.4f} SDlogJ {row['sd_log_j']:.3f} "
                f"fold {row['folding_pct']:.4f}% {row['time_s']:.1f} s",
                flush=True,
            )
    print()
    print(summarise(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
