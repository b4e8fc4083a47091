"""Where training pairs come from: synthetic label maps, real images, real pairs.

Every source returns :class:`TrainingPair` objects on the network grid (``[1, 1, n0, n1, n2]``
tensors in ``[0, 1]``), drawn with a :class:`torch.Generator` so a seed fixes the sequence.
Volumes are read once, cropped to their foreground and reduced to about twice the network
grid, so drawing a pair takes tens of milliseconds.

:class:`RandomShapesSource`
    Label maps made from noise (SynthMorph's shapes): contrast-agnostic, any anatomy.
:class:`LabelMapSource`
    Real anatomical label maps (for example the SynthSeg brain maps): inter-subject pairs from
    two maps, intra-subject pairs from one map deformed twice; random contrast per image.
:class:`ImageSource`
    Real images (a folder or a BIDS dataset): one image deformed twice with intensity
    augmentation (intra-subject pairs).
:class:`ImagePairSource`
    Real image pairs (inter-subject, or sessions of one subject), placed on the network grid
    as registration places them, optionally affinely pre-aligned and with label maps.
:class:`MixedSource`
    Draws from several sources with given weights.

Example
-------
>>> source = RandomShapesSource()
>>> pair = source.draw((32, 32, 32), torch.Generator().manual_seed(0))
>>> pair.moving.shape, pair.pair_type, pair.region
(torch.Size([1, 1, 32, 32, 32]), 'intra', 'other')
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.metrics import MANY_LABELS
from regpipe.synth import (
    DeformationRange,
    IntensityRange,
    apply_affine,
    augment_intensity,
    random_affine,
    random_shapes,
    random_spatial_map,
    sample_image,
    sample_labels,
    synthesize,
)

LOGGER = logging.getLogger("regpipe.training")

__all__ = [
    "REGIONS",
    "ImagePairSource",  # noqa: F822 (lazy, see __getattr__)
    "ImageSource",
    "LabelMapSource",
    "MixedSource",
    "PairSource",
    "RandomShapesSource",
    "TrainingPair",
    "find_images",
]

#: Body regions known to the conditional model and the model cards.
REGIONS = ("brain", "head_neck", "thorax", "abdomen", "pelvis", "knee", "other")
#: Image file endings read by :func:`find_images`.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")

Shape = Sequence[int]


@dataclass
class TrainingPair:
    """One training pair on the network grid.

    ``moving_labels`` / ``fixed_labels`` are int64 label maps (same label ids in both) when
    the source has them, else ``None``. ``pair_type`` is ``"inter"`` or ``"intra"``.
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    pair_type: str
    region: str
    moving_labels: torch.Tensor | None = None
    fixed_labels: torch.Tensor | None = None


class PairSource(Protocol):
    """Anything with a ``name``, a ``region`` and ``draw(shape, generator)``."""

    name: str
    region: str

    def draw(self, shape: Shape, generator: torch.Generator) -> TrainingPair:
        """A random pair on a grid of ``shape``."""
        ...


def _chance(probability: float, generator: torch.Generator) -> bool:
    return bool(torch.rand((), generator=generator) < probability)


def _choice(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator))


@dataclass
class RandomShapesSource:
    """Pairs of images rendered from one random-shape label map, each deformed and textured."""

    labels_range: tuple[int, int] = (8, 24)
    deformation: DeformationRange = field(default_factory=lambda: DeformationRange(warp=0.04))
    intensity: IntensityRange = field(default_factory=IntensityRange)
    name: str = "random-shapes"
    region: str = "other"

    def draw(self, shape: Shape, generator: torch.Generator) -> TrainingPair:
        low, high = self.labels_range
        n_labels = int(torch.randint(low, high + 1, (1,), generator=generator))
        # Shapes at half size, then nearest upsampling: same blobs, a quarter of the cost.
        half = [max(n // 2, 4) for n in shape]
        labels = random_shapes(half, n_labels, generator)
        labels = F.interpolate(labels.float(), size=tuple(shape), mode="nearest").long()
        images, maps = [], []
        for _ in range(2):
            warped = sample_labels(labels, random_spatial_map(shape, self.deformation, generator))
            maps.append(warped)
            images.append(synthesize(warped, self.intensity, generator))
        return TrainingPair(images[0], images[1], "intra", self.region, maps[0], maps[1])


def _reduce_labels(volume: np.ndarray, shape: Shape) -> torch.Tensor:
    """A label volume as int16 ``[1, 1, ...]``, reduced (nearest) to at most 2x ``shape``."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
    target = [min(int(n), 2 * int(s)) for n, s in zip(tensor.shape[2:], shape, strict=True)]
    if list(tensor.shape[2:]) != target:
        tensor = F.interpolate(tensor.float(), size=tuple(target), mode="nearest").short()
    return tensor


def _foreground_box(volume: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(low, high)`` corners (``[3]`` each) of the non-zero voxels' bounding box."""
    where = np.nonzero(volume)
    if where[0].size == 0:
        raise InputError("the label map is empty (all zeros)")
    sizes = np.maximum(np.asarray(volume.shape, dtype=np.float64) - 1, 1)
    low = np.array([w.min() for w in where]) / sizes
    high = np.array([w.max() for w in where]) / sizes
    return torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)


class LabelMapSource:
    """Synthetic pairs from real label maps (SynthMorph recipe).

    Parameters
    ----------
    paths
        Label-map files (integer labels; any size and orientation).
    shape
        Network grid the pairs are drawn for (volumes are stored at up to twice this size).
    inter_probability
        Chance that a pair comes from two different maps (``"inter"``) rather than one map
        deformed twice (``"intra"``).
    same_contrast_probability
        Chance that both images share the label intensities (a same-sequence pair).
    background_labels
        Label ids rendered as zero background with probability ``strip_probability`` (for
        the SynthSeg brain maps, the non-brain labels >= 100 give skull-stripped images).
    deformation
        Random affine and smooth deformation drawn for each image of a pair; their difference
        is what the network learns to undo.
    align
        Affinely pre-align every map onto the first one once, when the source is built (with
        :func:`regpipe.affine.affine_register` on a T1-like rendering of the maps), and frame
        both images of a pair by the fixed map's field of view. Pairs then look like
        registration's input after its affine pre-alignment: only ``deformation`` separates
        them. Without it each map is framed by its own foreground box, so inter-subject pairs
        also differ by everything a bounding box does not align.
    placement
        A random affine shared by both images of a pair (its ``warp`` is ignored): varies the
        pose and framing of the anatomy on the grid without adding to the misalignment.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        shape: Shape,
        *,
        region: str = "brain",
        inter_probability: float = 0.75,
        same_contrast_probability: float = 0.3,
        background_labels: Sequence[int] = (),
        strip_probability: float = 0.5,
        deformation: DeformationRange | None = None,
        intensity: IntensityRange | None = None,
        align: bool = False,
        placement: DeformationRange | None = None,
        name: str = "label-maps",
    ) -> None:
        if not paths:
            raise InputError("LabelMapSource needs at least one label map")
        if region not in REGIONS:
            raise InputError(f"unknown region {region!r}; choose one of {', '.join(REGIONS)}")
        self.name, self.region = name, region
        self.inter_probability = inter_probability
        self.same_contrast_probability = same_contrast_probability
        self.strip_probability = strip_probability
        self.deformation = deformation or DeformationRange()
        self.intensity = intensity or IntensityRange()
        self.align, self.placement = align, placement
        raw, spacings = [], []
        for path in paths:
            data, affine = _read_label_map(Path(path))
            raw.append(network_order_ras(data, affine))
            spacings.append(network_order_spacing(affine))
        # One contiguous label table shared by all maps, so ids agree between subjects.
        # 0 is background even in maps without any: the lowest label is a structure
        original = np.unique(np.concatenate([np.zeros(1, np.int32),
                                             *(np.unique(r) for r in raw)]))
        self.original_ids = original
        lookup = {int(v): i for i, v in enumerate(original)}
        self.maps = []
        for index, data in enumerate(raw):
            reduced = _reduce_labels(np.searchsorted(original, data).astype(np.int16), shape)
            spacings[index] = (spacings[index] * np.asarray(data.shape)
                               / np.asarray(reduced.shape[2:]))
            self.maps.append(reduced)
        self.background = [lookup[int(v)] for v in background_labels if int(v) in lookup]
        if align and len(self.maps) > 1:
            self.maps = _align_maps(self.maps, spacings, original, self.background)
        self.boxes = []
        for path, labels in zip(paths, self.maps, strict=True):
            try:
                self.boxes.append(_foreground_box(labels[0, 0].numpy()))
            except InputError as error:
                raise InputError(f"label map {path}: {error}") from None
        self.paths = [Path(p) for p in paths]

    @property
    def n_labels(self) -> int:
        return int(self.original_ids.size)

    def draw(self, shape: Shape, generator: torch.Generator) -> TrainingPair:
        inter = len(self.maps) > 1 and _chance(self.inter_probability, generator)
        first = _choice(len(self.maps), generator)
        second = first
        if inter:
            second = (first + 1 + _choice(len(self.maps) - 1, generator)) % len(self.maps)
        zero = [0] + (self.background if _chance(self.strip_probability, generator) else [])
        means = torch.rand(self.n_labels, generator=generator) * 0.95 + 0.05
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        # Field of view: from the tight foreground box (t = 0) to the whole volume (t = 1), the
        # same t for both images, as after an affine pre-alignment onto the fixed image's grid.
        t = float(torch.rand((), generator=generator))
        shared = random_affine(self.placement, generator) if self.placement is not None else None
        for index in (first, second):
            low, high = self.boxes[second if self.align else index]
            low, high = low * (1 - t), high + (1 - high) * t
            coords = random_spatial_map(shape, self.deformation, generator)
            if shared is not None:
                coords = apply_affine(coords, shared)
            coords = low.view(1, 3, 1, 1, 1) + coords * (high - low).view(1, 3, 1, 1, 1)
            warped = sample_labels(self.maps[index], coords)
            if not _chance(self.same_contrast_probability, generator) and images:
                means = torch.rand(self.n_labels, generator=generator) * 0.95 + 0.05
            images.append(synthesize(warped, self.intensity, generator, means, zero))
            for label in zero:
                warped = torch.where(warped == label, torch.zeros_like(warped), warped)
            labels.append(warped)
        pair_type = "inter" if inter else "intra"
        return TrainingPair(images[0], images[1], pair_type, self.region, labels[0], labels[1])


def _align_maps(maps: list[torch.Tensor], spacings: list[np.ndarray], original_ids: np.ndarray,
                background: Sequence[int]) -> list[torch.Tensor]:
    """Every label map resampled (nearest) onto the first one's grid through an affine
    registration of T1-like renderings, skull-stripped as registration usually sees brains."""
    from regpipe.affine import affine_register
    from regpipe.preprocess import network_input
    from regpipe.spaces import Geometry

    # A fixed intensity per label (the same for every map), background labels dark.
    table = np.random.default_rng(0).uniform(0.2, 1.0, original_ids.size).astype(np.float32)
    table[[0, *background]] = 0.0

    def rendering(labels: torch.Tensor) -> np.ndarray:
        return table[labels[0, 0].numpy().astype(np.int64)]

    def geometry(labels: torch.Tensor, spacing: np.ndarray) -> Geometry:
        n0, n1, n2 = labels.shape[2:]
        return Geometry((n0, n1, n2), np.diag([*spacing, 1.0]))

    reference = geometry(maps[0], spacings[0])
    fixed = rendering(maps[0])
    aligned = [maps[0]]
    for labels, spacing in zip(maps[1:], spacings[1:], strict=True):
        moving_geometry = geometry(labels, spacing)
        transform = affine_register(fixed, reference, rendering(labels), moving_geometry)
        resampled = network_input(labels[0, 0].numpy().astype(np.float32), moving_geometry,
                                  transform.matrix @ reference.affine, reference.shape,
                                  nearest=True)
        aligned.append(resampled.round().to(torch.int16))
    return aligned


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``root``: the ``anat`` T1w/T2w images of a BIDS dataset (when
    ``dataset_description.json`` exists, derivatives excluded), else every image file."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))
    if (root / "dataset_description.json").exists():
        files = [
            p for p in files
            if "derivatives" not in p.relative_to(root).parts
            and p.parent.name == "anat" and ("_T1w." in p.name or "_T2w." in p.name)
        ]
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


def network_order_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel array reoriented to the closest RAS axes, in network order ``(S, A, R)``.

    This is what the ``squash-ras`` grid mode feeds the network for any file orientation
    (see :func:`regpipe.spaces.network_grid`), so synthetic and real training images show
    anatomy the way registration will.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(canonical.transpose(2, 1, 0))


def _read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 labels, voxel-to-RAS affine)`` of a label-map file; what is no label map (an
    unreadable or 4-D file, an intensity image) is one clear :class:`InputError`."""
    from regpipe.imageio import load_image

    image = load_image(path, "any", "label map")  # NIfTI, MGH, .mha, .nrrd; 3-D checked
    data = np.asarray(image.data)
    rounded = np.rint(data) if data.dtype.kind == "f" else data
    if data.dtype.kind == "f" and (not np.all(np.isfinite(data))
                                   or float(np.abs(data - rounded).max()) > 0.01):
        raise InputError(f"label map {path} holds non-integer values: an intensity image, not "
                         "a label map?")
    labels = rounded.astype(np.int32)
    distinct = np.unique(labels.ravel()[::7]).size  # a sample is enough to tell
    if distinct > MANY_LABELS:  # a warning, not an error
        LOGGER.warning("label map %s holds over %d distinct values: is it an intensity image?",
                       path, MANY_LABELS)
    return labels, image.geometry.affine


def network_order_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) of :func:`network_order_ras`'s array: ``(S, A, R)`` axis order."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = np.empty(3)  # voxel axis i becomes RAS axis ornt[i, 0]
    zooms[ornt[:, 0].astype(int)] = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return zooms[::-1]


def _load_normalised(path: Path, shape: Shape, modality: str) -> torch.Tensor:
    from regpipe.imageio import load_image
    from regpipe.preprocess import normalize_intensity

    image = load_image(path)
    data = normalize_intensity(np.asarray(image.data, dtype=np.float32), modality)
    # squash-ras placement: closest-RAS axes in network order, each axis fills the grid.
    data = network_order_ras(data, image.geometry.affine)
    tensor = torch.from_numpy(data)[None, None]
    target = [min(int(n), 2 * int(s)) for n, s in zip(tensor.shape[2:], shape, strict=True)]
    return F.interpolate(tensor, size=tuple(target), mode="area")


class ImageSource:
    """Intra-subject pairs from real images: each image deformed twice, intensities augmented."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        shape: Shape,
        *,
        region: str = "brain",
        modality: str = "mri",
        deformation: DeformationRange | None = None,
        intensity: IntensityRange | None = None,
        name: str = "images",
    ) -> None:
        if not paths:
            raise InputError("ImageSource needs at least one image")
        self.name, self.region = name, region
        self.deformation = deformation or DeformationRange()
        self.intensity = intensity or IntensityRange(blur=0.5, noise=0.02)
        self.images = [_load_normalised(Path(p), shape, modality) for p in paths]

    def draw(self, shape: Shape, generator: torch.Generator) -> TrainingPair:
        image = self.images[_choice(len(self.images), generator)]
        pair = []
        for _ in range(2):
            coords = random_spatial_map(shape, self.deformation, generator)
            pair.append(augment_intensity(sample_image(image, coords), self.intensity, generator))
        return TrainingPair(pair[0], pair[1], "intra", self.region)


def __getattr__(name: str):
    """``ImagePairSource`` lives in :mod:`regpipe.image_pairs` (imported lazily: it uses this
    module)."""
    if name == "ImagePairSource":
        from regpipe.image_pairs import ImagePairSource

        return ImagePairSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MixedSource:
    """Draw from ``sources`` with probabilities proportional to ``weights``."""

    def __init__(
        self, sources: Sequence[PairSource], weights: Sequence[float] | None = None
    ) -> None:
        if not sources:
            raise InputError("no training data source was given")
        weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
            raise InputError(f"need one non-negative weight per source, got {weights}")
        self.sources = list(sources)
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.name = "+".join(s.name for s in self.sources)
        self.region = "mixed"

    def draw(self, shape: Shape, generator: torch.Generator) -> TrainingPair:
        index = int(torch.multinomial(self.weights, 1, generator=generator))
        return self.sources[index].draw(shape, generator)
