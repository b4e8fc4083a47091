"""What the conditional model's conditions do, measured (issue 5).

Three experiments, network only (affine pre-alignment, no instance optimisation):

smoothness
    Brain pairs 01->02, 03->04... (T1-like images from the SynthSeg label maps 01-10, never
    trained on) registered at several smoothness values (lam): mean Dice, SD of log J and
    folding % inside the fixed brain, and NCC of the warped and the fixed image inside the
    fixed head (labels > 0), per lam.
pair type
    Intra-subject pairs (a brain image against a smoothly deformed copy of itself, and the real
    knee pair) and inter-subject brain pairs, each registered with the matching and the
    mismatched ``pair_type`` condition: Dice (brain) or NCC after (knee).
versus unconditional
    Mean Dice on the brain pairs for the unconditional model and the conditional one
    (region brain, inter, lam 1.5); NCC after registration on the knee pair for both.
trained anatomies
    Held-out images of the non-brain regions the recipe trains (prostate MR cases 000006 and
    000007, gland label: pelvis; the lung CT baseline, lung mask: thorax), each against
    smoothly deformed copies of itself (at most ``--copy-amplitude``, default 4 mm; ``--copies``
    seeds; the copy is the fixed
    image, so the true transform is known): mean endpoint error (mm) of the transform, Dice
    of the label and SD of log J inside it, for the unconditional model and the conditional
    one (its region, ``intra``, lam 1.5).

Example
-------
``python benchmarks/conditional_eval.py --data ../shared/data --conditional runs/cond/weights.pt
--unconditional regpipe/data/weights/regpipe-compact.pt --pairs 3``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from brain_pairs import evaluate_transform, load_subject

from regpipe.devset import dice_labels
from regpipe.spaces import Geometry
from regpipe.transforms import DisplacementField

#: the network's estimate: single pass (how the README's first tables were measured) unless
#: --symmetric (regpipe.register's default since 2026-11-22)
SYMMETRIC = {"symmetric": False}


def _register(fixed, moving, weights, **condition):
    from regpipe.imageio import Image
    from regpipe.registration import register
    from regpipe.spaces import Geometry

    images = [x if isinstance(x, Image) else Image(x.image, Geometry(x.labels.shape, x.affine))
              for x in (fixed, moving)]
    return register(images[0], images[1], weights=weights, affine="ours", io_iterations=0,
                    progress=False, evaluate=False, **SYMMETRIC, **condition)


def _deformation(subject, seed: int, amplitude: str | float = 4.0):
    """A smooth random voxel displacement ``[3, X, Y, Z]`` on the subject's grid whose largest
    component is ``amplitude``: millimetres (a number or ``"4mm"``) along every axis, or a
    fraction of each axis' extent (``"6%"``: the same share of the network's grid whatever
    the image's size, as the training recipe's ``warp`` draws it)."""
    rng = np.random.default_rng(seed)
    shape = subject.labels.shape
    coarse = ndimage.gaussian_filter(rng.normal(size=(3, 6, 6, 6)), 1.0)
    field = np.stack([ndimage.zoom(c, np.array(shape) / 6, order=1) for c in coarse])
    field /= np.abs(field).max()
    text = str(amplitude)
    if text.endswith("%"):
        voxels = float(text[:-1]) / 100 * np.array(shape, dtype=float)
    else:
        voxels = float(text.removesuffix("mm")) / np.linalg.norm(subject.affine[:3, :3], axis=0)
    return field * voxels[:, None, None, None]


def _deformed_copy(subject, seed: int, amplitude: str | float = 4.0):
    """The subject's image and labels pulled through :func:`_deformation`: the copy's voxel
    ``x`` shows the subject's content at ``x + u(x)``."""
    shape = subject.labels.shape
    field = _deformation(subject, seed, amplitude)
    coords = np.indices(shape, dtype=np.float32) + field
    labels = ndimage.map_coordinates(subject.labels, coords, order=0).astype(np.int16)
    image = ndimage.map_coordinates(subject.image, coords, order=1).astype(np.float32)
    copy = type(subject)(subject.name + "-deformed", labels, image, subject.affine)
    return copy


def _knee(data: Path):
    from regpipe.imageio import load_image

    folder = data / "ood" / "knee_mri"
    return load_image(folder / "fair_knee3D_T.nii.gz"), load_image(folder / "fair_knee3D_R.nii.gz")


def _anatomy_cases(data: Path) -> list[tuple[str, str, str, object]]:
    """(name, region, modality, subject) of the held-out non-brain images with a label."""
    import SimpleITK as sitk
    from brain_pairs import Subject

    from regpipe.imageio import load_image

    cases = []
    prostate = data / "ood" / "prostate_mr_us" / "train"
    for case in ("case000006", "case000007"):
        image = load_image(prostate / "mr_images" / f"{case}.nii.gz")
        labels = np.asarray(nib.load(prostate / "mr_labels" / f"{case}.nii.gz").dataobj)
        gland = (labels[..., 0] if labels.ndim == 4 else labels) > 0.5
        cases.append((f"prostate {case}", "pelvis", "mri", Subject(
            case, gland.astype(np.int16), image.data.astype(np.float32),
            image.geometry.affine)))
    lung = data / "ood" / "lung_ct"
    image = load_image(lung / "3DCT_lung_baseline_small.mha")
    reference = sitk.ReadImage(str(lung / "3DCT_lung_baseline_small.mha"))
    mask = sitk.Resample(sitk.ReadImage(str(lung / "3DCT_lung_baseline_mask.mha")), reference,
                         sitk.Transform(), sitk.sitkNearestNeighbor)
    # SimpleITK arrays are (z, y, x); regpipe reads the same file in (x, y, z) voxel order
    mask_xyz = np.transpose(sitk.GetArrayFromImage(mask), (2, 1, 0)) > 0
    cases.append(("lung CT baseline", "thorax", "ct", Subject(
        "lung", mask_xyz.astype(np.int16), image.data.astype(np.float32),
        image.geometry.affine)))
    return cases


def _endpoint_error(field_mm, truth_voxels, subject, region) -> float:
    """Mean distance (mm) in ``region`` between a RAS mm displacement field ``[X, Y, Z, 3]``
    and the true voxel displacement ``[3, X, Y, Z]`` of the subject's grid."""
    truth = np.einsum("ij,j...->...i", subject.affine[:3, :3], truth_voxels)
    return float(np.linalg.norm(field_mm - truth, axis=-1)[region].mean())


def _ncc_after(result, mask=None) -> float:
    """NCC of the warped moving and the fixed image (normalised as MRI) within ``mask``
    (default: fixed intensity above 0.05)."""
    from regpipe.metrics import ncc
    from regpipe.preprocess import normalize_intensity
    from regpipe.warp import warp_array

    fixed, moving = result.fixed, result.moving
    warped = warp_array(normalize_intensity(moving.data, "mri"), moving.geometry, result.forward,
                        fixed.geometry)
    target = normalize_intensity(fixed.data, "mri")
    return ncc(warped, target, target > 0.05 if mask is None else mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder")
    parser.add_argument("--conditional", required=True)
    parser.add_argument("--unconditional", required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--lams", default="0.3,0.75,1.5,3,6")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--copies", type=int, default=3,
                        help="deformed copies per held-out non-brain image")
    parser.add_argument("--copy-amplitude", default="4mm",
                        help="largest displacement of those copies: 4mm, or 6%% of each axis")
    parser.add_argument("--only-anatomies", action="store_true",
                        help="run the trained-anatomies experiment alone")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--symmetric", action="store_true",
                        help="the two-pass symmetric estimate (default: one pass)")
    args = parser.parse_args(argv)
    SYMMETRIC["symmetric"] = args.symmetric
    import torch

    torch.set_num_threads(args.threads)
    maps = args.data / "brain" / "synthseg_label_maps"
    pairs = [(load_subject(maps, 2 * p + 1), load_subject(maps, 2 * p + 2))
             for p in range(args.pairs)]
    labels = [dice_labels(f.labels, m.labels, 1000) for f, m in pairs]
    out: dict = {"smoothness": [], "pair_type": [], "versus": [], "anatomies": []}

    def brain_row(fixed, moving, chosen, weights, with_ncc=False, **condition):
        result = _register(fixed, moving, weights, **condition)
        row = evaluate_transform(fixed, moving, result.forward, chosen)
        return {**row, "ncc": _ncc_after(result, fixed.labels > 0)} if with_ncc else row

    lams = [] if args.only_anatomies else [float(v) for v in args.lams.split(",")]
    for lam in lams:
        rows = [brain_row(f, m, lab, args.conditional, with_ncc=True, region="brain",
                          pair_type="inter", smoothness=lam)
                for (f, m), lab in zip(pairs, labels, strict=True)]
        keys = ("dice", "ncc", "sd_log_j", "folding_pct")
        summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        out["smoothness"].append({"lam": lam, **summary})
        print(f"lam {lam:5.2f}: Dice {summary['dice']:.4f} NCC {summary['ncc']:.4f} SD log J "
              f"{summary['sd_log_j']:.3f} folding {summary['folding_pct']:.4f}%", flush=True)

    knee_fixed, knee_moving = _knee(args.data)
    for kind in () if args.only_anatomies else ("intra", "inter"):
        brain_intra = []
        for index, (fixed, _) in enumerate(pairs):
            copy = _deformed_copy(fixed, seed=index)
            brain_intra.append(brain_row(fixed, copy, dice_labels(fixed.labels, copy.labels, 1000),
                                         args.conditional, region="brain", pair_type=kind)["dice"])
        brain_inter = [
            brain_row(f, m, lab, args.conditional, region="brain", pair_type=kind)["dice"]
            for (f, m), lab in zip(pairs, labels, strict=True)
        ]
        knee_result = _register(knee_fixed, knee_moving, args.conditional, region="knee",
                                pair_type=kind)
        knee = _ncc_after(knee_result)
        row = {"condition": kind, "brain_intra_dice": float(np.mean(brain_intra)),
               "brain_inter_dice": float(np.mean(brain_inter)), "knee_ncc": knee}
        out["pair_type"].append(row)
        print(f"pair_type={kind}: brain intra Dice {row['brain_intra_dice']:.4f}, "
              f"brain inter Dice {row['brain_inter_dice']:.4f}, knee NCC {knee:.4f}", flush=True)

    for name, weights, condition in () if args.only_anatomies else (
        ("unconditional", args.unconditional, {}),
        ("conditional", args.conditional,
         {"region": "brain", "pair_type": "inter", "smoothness": 1.5}),
    ):
        dice = [brain_row(f, m, lab, weights, **condition)["dice"]
                for (f, m), lab in zip(pairs, labels, strict=True)]
        knee_condition = dict(condition, region="knee", pair_type="intra") if condition else {}
        knee = _ncc_after(_register(knee_fixed, knee_moving, weights, **knee_condition))
        out["versus"].append({"model": name, "brain_dice": float(np.mean(dice)), "knee_ncc": knee})
        print(f"{name}: brain Dice {np.mean(dice):.4f}, knee NCC {knee:.4f}", flush=True)
    for label, region, modality, subject in _anatomy_cases(args.data):
        copies = [(_deformed_copy(subject, 100 + k, args.copy_amplitude),
                   _deformation(subject, 100 + k, args.copy_amplitude))
                  for k in range(args.copies)]
        # the identity's error, over the same region as the registrations' (each copy's label)
        before = np.mean([_endpoint_error(np.zeros((*truth.shape[1:], 3)), truth, subject,
                                          copy.labels > 0) for copy, truth in copies])
        print(f"{label} ({region}): true displacement {before:.3f} mm (mean in the label)")
        for name, weights, condition in (
            ("unconditional", args.unconditional, {}),
            ("conditional", args.conditional,
             {"region": region, "pair_type": "intra", "smoothness": 1.5}),
        ):
            rows = []
            for copy, truth in copies:  # copy fixed, subject moving: the truth is x + u(x)
                result = _register(copy, subject, weights, fixed_modality=modality,
                                   moving_modality=modality, **condition)
                row = evaluate_transform(copy, subject, result.forward, [1])
                field = DisplacementField.from_transform(
                    result.forward, Geometry(copy.labels.shape, copy.affine)).field
                row["error_mm"] = _endpoint_error(field, truth, subject, copy.labels > 0)
                rows.append(row)
            row = {"image": label, "model": name, "true_mm": float(before), **{
                k: float(np.mean([r[k] for r in rows]))
                for k in ("error_mm", "dice", "sd_log_j", "folding_pct")}}
            out["anatomies"].append(row)
            print(f"{label} ({region}), {name}: endpoint error {row['error_mm']:.3f} mm, Dice "
                  f"{row['dice']:.4f}, SD log J {row['sd_log_j']:.3f}, folding "
                  f"{row['folding_pct']:.4f}%", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
