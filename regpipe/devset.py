"""The development benchmark set, built from a shared data folder (see its ``MANIFEST.md``).

Three subsets of :class:`~regpipe.bench.PairSpec` (images it derives are written once into a
cache folder and reused):

``brain``
    Colin27 (``brain/colin27/ch2bet``) moving onto the MNI152NLin6Asym and MNI152NLin2009cAsym
    brain templates: TRE over the 32 AFIDs landmarks (``landmarks_afids/``); folding and
    SD log J inside the template's brain (image > 0, a mask written to the cache). No Dice:
    the templates carry no AAL labels (Colin27's AAL atlas has no counterpart on them).
``synth``
    Real inter-subject anatomy: the SynthSeg training label maps
    (``brain/synthseg_label_maps/training_seg_XX``, 256^3, 1 mm) made into T1-like
    skull-stripped images (:func:`synthetic_t1`); pairs 02 -> 01, 04 -> 03, ... (moving ->
    fixed, always two subjects); Dice and HD95 over the main brain structures, folding and
    SD log J inside the fixed brain.
``ood``
    Other anatomies and modalities: the knee MRI pair, chest CT onto the lung CT, head CT
    onto the CT brain template (regularity and NCC only), abdomen MR onto CT (Dice over the
    organs both TotalSegmentator label tables share, ids 1-9) and the prostate US -> MR pairs
    (gland Dice, TRE of the two landmark blobs' centroids).

Example
-------
>>> pairs = build_dev_set("../shared/data", "bench_out/cache",  # doctest: +SKIP
...                       subset="synth", n_pairs=3)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from regpipe.bench_pairs import PairSpec
from regpipe.errors import InputError
from regpipe.evaluation import write_fcsv
from regpipe.imageio import Image, load_image, save_image
from regpipe.spaces import Geometry

SUBSETS = ("brain", "synth", "ood")
#: Bumped when derived images change, so an old cache is not reused (``cache/v<N>/``).
CACHE_VERSION = 1

#: T1-like intensity (arbitrary units, white matter = 110) per aseg label; other brain labels
#: (< 100) get :data:`DEFAULT_INTENSITY`.
T1_INTENSITY: dict[int, float] = {
    2: 110, 41: 110,  # cerebral white matter
    3: 70, 42: 70,  # cerebral cortex
    4: 25, 43: 25, 5: 25, 44: 25, 14: 25, 15: 25, 72: 25,  # ventricles
    7: 105, 46: 105,  # cerebellum white matter
    8: 78, 47: 78,  # cerebellum cortex
    10: 92, 49: 92,  # thalamus
    11: 80, 50: 80,  # caudate
    12: 85, 51: 85,  # putamen
    13: 98, 52: 98,  # pallidum
    16: 100,  # brainstem
    17: 72, 53: 72,  # hippocampus
    18: 74, 54: 74,  # amygdala
    24: 20,  # CSF
    26: 78, 58: 78,  # accumbens
    28: 95, 60: 95,  # ventral DC
    30: 60, 62: 60,  # vessel
    77: 90,  # white-matter hypointensities
    85: 100,  # optic chiasm
}
DEFAULT_INTENSITY = 70.0
#: Labels counted as brain (mask, image support) are those below this id.
BRAIN_MAX_LABEL = 100
#: Labels left out of Dice (extra-cerebral CSF is not a structure).
DICE_EXCLUDE = (24,)
#: Smallest structure (voxels, in both subjects) scored by Dice in the synthetic pairs.
MIN_VOXELS = 1000
#: Organ ids shared by TotalSegmentator's CT (``total``) and MR (``total_mr``) tables:
#: spleen, kidneys, gallbladder, liver, stomach, pancreas, adrenal glands.
SHARED_ORGANS = tuple(range(1, 10))


def synthetic_t1(labels: NDArray[np.integer], seed: int) -> NDArray[np.float32]:
    """T1-like skull-stripped image from an aseg label map (deterministic for a seed).

    Brain labels (0 < id < 100) get :data:`T1_INTENSITY`, the rest 0; then a Gaussian blur of
    0.6 voxel and Gaussian noise of SD 3 (inside the brain) are applied.
    """
    labels = np.asarray(labels)
    table = np.zeros(int(labels.max()) + 1, dtype=np.float32)
    table[1:BRAIN_MAX_LABEL] = DEFAULT_INTENSITY
    for label, value in T1_INTENSITY.items():
        if label < table.size:
            table[label] = value
    table[BRAIN_MAX_LABEL:] = 0.0
    image = ndimage.gaussian_filter(table[labels], 0.6)
    rng = np.random.default_rng(seed)
    brain = (labels > 0) & (labels < BRAIN_MAX_LABEL)
    image[brain] += rng.normal(0.0, 3.0, size=int(brain.sum())).astype(np.float32)
    return np.clip(image, 0.0, None).astype(np.float32)


def dice_labels(fixed: NDArray, moving: NDArray, min_voxels: int = MIN_VOXELS) -> list[int]:
    """Main aseg structures (0 < id < 100, not CSF 24) with at least ``min_voxels`` voxels in
    both label maps."""
    big = []
    for labels in (fixed, moving):
        ids, counts = np.unique(labels, return_counts=True)
        big.append({int(i) for i, c in zip(ids, counts, strict=True) if c >= min_voxels})
    return sorted(i for i in big[0] & big[1] if 0 < i < BRAIN_MAX_LABEL and i not in DICE_EXCLUDE)


def _cached(path: Path, make: Callable[[], Image]) -> Path:
    """``path`` if it exists, else ``make()`` saved there (atomically)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(make(), path)
    return path


def _need(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"development data {path} is missing (see the data folder's "
                         "MANIFEST.md)")
    return path


def brain_pairs(shared: Path, cache: Path) -> list[PairSpec]:
    """Colin27 onto the two MNI brain templates with AFIDs landmarks."""
    colin = _need(shared / "brain/colin27/ch2bet.nii.gz")
    afids = shared / "landmarks_afids"
    templates = {
        "MNI152NLin6Asym": shared / "brain/mni152_fsl6/MNI152_T1_1mm_brain.nii.gz",
        "MNI152NLin2009cAsym":
            shared / "brain/mni_icbm152_2009/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
    }
    pairs = []
    for name, image in templates.items():
        source = _need(image)

        def brain(source: Path = source) -> Image:
            loaded = load_image(source)
            return Image((np.asarray(loaded.data) > 0).astype(np.uint8), loaded.geometry)

        mask = _cached(cache / "brain" / f"tpl-{name}_desc-brain_mask.nii.gz", brain)
        pairs.append(PairSpec(
            f"colin27_to_{name}", source, colin, mask=mask, subset="brain",
            fixed_landmarks=_need(afids / f"tpl-{name}_afids.fcsv"),
            moving_landmarks=_need(afids / "tpl-Colin27_afids.fcsv"),
        ))
    return pairs


def _t1_image(labels: NDArray, seed: int, geometry: Geometry) -> Image:
    return Image(synthetic_t1(labels, seed=seed), geometry)


def _brain_mask(labels: NDArray, geometry: Geometry) -> Image:
    return Image(((labels > 0) & (labels < BRAIN_MAX_LABEL)).astype(np.uint8), geometry)


def synth_pairs(shared: Path, cache: Path, n_pairs: int | None = None) -> list[PairSpec]:
    """SynthSeg label maps as T1-like inter-subject pairs (``n_pairs`` of at most 10)."""
    folder = _need(shared / "brain/synthseg_label_maps")
    maps = sorted(folder.glob("training_seg_[0-9][0-9].nii.gz"))
    count = len(maps) // 2 if n_pairs is None else min(n_pairs, len(maps) // 2)
    pairs = []
    for k in range(count):
        subjects = []
        for path in maps[2 * k: 2 * k + 2]:
            stem = path.name[: -len(".nii.gz")]
            index = int(stem[-2:])
            nii = cast(nib.Nifti1Image, nib.load(path))
            labels = np.rint(np.asanyarray(nii.dataobj)).astype(np.int16)
            geometry = Geometry(labels.shape, nii.affine)
            image = _cached(cache / "synth" / f"{stem}_T1w.nii.gz",
                            partial(_t1_image, labels, index, geometry))
            mask = _cached(cache / "synth" / f"{stem}_desc-brain_mask.nii.gz",
                           partial(_brain_mask, labels, geometry))
            subjects.append((stem, path, image, mask, labels))
        (f_stem, f_labels, f_image, f_mask, f_data), (m_stem, m_labels, m_image, _, m_data) = (
            subjects)
        pairs.append(PairSpec(
            f"{m_stem}_to_{f_stem}", f_image, m_image, fixed_labels=f_labels,
            moving_labels=m_labels, mask=f_mask, labels=tuple(dice_labels(f_data, m_data)),
            subset="synth",
        ))
    return pairs


def _prostate_case(folder: Path, cache: Path, case: str, side: str) -> tuple[Path, Path | None]:
    """Gland label map and landmark file (centroids of the landmark blobs, channels 1 and 2
    where present) of one image."""
    nii = cast(nib.Nifti1Image, nib.load(_need(folder / f"{side}_labels" / f"{case}.nii.gz")))
    channels = np.asarray(nii.dataobj) > 0.5
    if channels.ndim == 3:  # some cases hold the gland only
        channels = channels[..., None]
    geometry = Geometry(channels.shape[:3], nii.affine)
    gland = _cached(cache / "ood" / f"prostate_{case}_{side}_gland.nii.gz",
                    lambda: Image(channels[..., 0].astype(np.uint8), geometry))
    points, names = [], []
    for channel in range(1, channels.shape[3]):
        if channels[..., channel].any():
            centroid = np.argwhere(channels[..., channel]).mean(axis=0)
            points.append(geometry.voxel_to_world(centroid))
            names.append(f"blob{channel}")
    if not points:
        return gland, None
    landmarks = cache / "ood" / f"prostate_{case}_{side}_landmarks.fcsv"
    if not landmarks.is_file():
        write_fcsv(landmarks, np.asarray(points), names)
    return gland, landmarks


def ood_pairs(shared: Path, cache: Path, n_pairs: int | None = None) -> list[PairSpec]:
    """Knee MRI, chest/lung CT, head CT, abdomen MR -> CT, prostate US -> MR."""
    ood = shared / "ood"
    pairs = [
        PairSpec("knee_T_to_R", _need(ood / "knee_mri/fair_knee3D_R.nii.gz"),
                 _need(ood / "knee_mri/fair_knee3D_T.nii.gz"), subset="ood"),
        PairSpec("chestct_to_lungct", _need(ood / "lung_ct/3DCT_lung_baseline_small.mha"),
                 _need(ood / "lung_ct/totalseg_chest_ct_1p5mm.nii.gz"), fixed_modality="ct",
                 moving_modality="ct", subset="ood"),
        PairSpec("headct_to_ctatlas",
                 _need(ood / "head_ct/totalsegmentator_resources_ct_brain_atlas_1mm.nii.gz"),
                 _need(ood / "head_ct/invesalius_cranium_ct.nii.gz"), fixed_modality="ct",
                 moving_modality="ct", subset="ood"),
        PairSpec("abdomenmr_to_abdomenct", _need(ood / "abdomen_ct/totalseg_example_ct_sm.nii.gz"),
                 _need(ood / "abdomen_ct/totalseg_example_mr_sm.nii.gz"),
                 fixed_labels=_need(ood / "abdomen_ct/totalseg_example_seg.nii.gz"),
                 moving_labels=_need(ood / "abdomen_ct/totalseg_example_seg_mr.nii.gz"),
                 fixed_modality="ct", moving_modality="mri", labels=SHARED_ORGANS,
                 subset="ood"),
    ]
    prostate = ood / "prostate_mr_us/train"
    for mr in sorted((prostate / "mr_images").glob("case*.nii.gz")):
        case = mr.name[: -len(".nii.gz")]
        mr_gland, mr_points = _prostate_case(prostate, cache, case, "mr")
        us_gland, us_points = _prostate_case(prostate, cache, case, "us")
        pairs.append(PairSpec(
            f"prostate_{case}_us_to_mr", mr, _need(prostate / "us_images" / mr.name),
            fixed_labels=mr_gland, moving_labels=us_gland, fixed_landmarks=mr_points,
            moving_landmarks=us_points if mr_points else None, subset="ood",
        ))
    return pairs if n_pairs is None else pairs[:n_pairs]


def build_dev_set(shared: str | os.PathLike, cache: str | os.PathLike, subset: str = "all",
                  n_pairs: int | None = None) -> list[PairSpec]:
    """The development pairs of ``subset`` (``brain``, ``synth``, ``ood`` or ``all``), at most
    ``n_pairs`` per subset; derived images are written to (and reused from)
    ``cache/v<CACHE_VERSION>``."""
    shared = Path(shared).expanduser().absolute()
    cache = Path(cache).expanduser().absolute() / f"v{CACHE_VERSION}"
    if not shared.is_dir():
        raise InputError(f"shared data folder {shared} does not exist")
    if subset not in (*SUBSETS, "all"):
        raise InputError(f"subset must be one of {', '.join(SUBSETS)} or all, got {subset!r}")
    if n_pairs is not None and n_pairs < 1:
        raise InputError(f"the number of pairs must be >= 1, got {n_pairs}")
    chosen = SUBSETS if subset == "all" else (subset,)
    pairs: list[PairSpec] = []
    if "brain" in chosen:
        pairs += brain_pairs(shared, cache)[:n_pairs]
    if "synth" in chosen:
        pairs += synth_pairs(shared, cache, n_pairs)
    if "ood" in chosen:
        pairs += ood_pairs(shared, cache, n_pairs)
    return pairs
