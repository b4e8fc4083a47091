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
    Real inter-subject pairs (every two images of a folder, or an explicit list).
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

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.synth import (
    DeformationRange,
    IntensityRange,
    augment_intensity,
    random_shapes,
    random_spatial_map,
    sample_image,
    sample_labels,
    synthesize,
)

__all__ = [
    "REGIONS",
    "ImagePairSource",
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


def _crop_and_reduce(volume: np.ndarray, shape: Shape, nearest: bool) -> torch.Tensor:
    """Crop to the non-zero bounding box (+4 voxels), reduce to at most 2x ``shape``."""
    where = np.nonzero(volume)
    if where[0].size == 0:
        raise InputError("the volume is empty (all zeros)")
    box = tuple(
        slice(max(int(w.min()) - 4, 0), min(int(w.max()) + 5, n))
        for w, n in zip(where, volume.shape, strict=True)
    )
    tensor = torch.from_numpy(np.ascontiguousarray(volume[box])).float()[None, None]
    target = [min(int(n), 2 * int(s)) for n, s in zip(tensor.shape[2:], shape, strict=True)]
    if list(tensor.shape[2:]) != target:
        mode = "nearest" if nearest else "area"
        tensor = F.interpolate(tensor, size=tuple(target), mode=mode)
    return tensor


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
        name: str = "label-maps",
    ) -> None:
        import nibabel as nib

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
        raw = []
        for path in paths:
            data = np.asanyarray(nib.load(os.fspath(path)).dataobj)
            raw.append(np.rint(data).astype(np.int32))
        # One contiguous label table shared by all maps, so ids agree between subjects.
        original = np.unique(np.concatenate([np.unique(r) for r in raw]))
        self.original_ids = original
        lookup = {int(v): i for i, v in enumerate(original)}
        self.maps = []
        for data in raw:
            contiguous = np.searchsorted(original, data).astype(np.int32)
            self.maps.append(_crop_and_reduce(contiguous, shape, nearest=True).long())
        self.background = [lookup[int(v)] for v in background_labels if int(v) in lookup]
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
        images, labels = [], []
        for index in (first, second):
            coords = random_spatial_map(shape, self.deformation, generator)
            warped = sample_labels(self.maps[index], coords)
            if not _chance(self.same_contrast_probability, generator) and images:
                means = torch.rand(self.n_labels, generator=generator) * 0.95 + 0.05
            images.append(synthesize(warped, self.intensity, generator, means, zero))
            for label in zero:
                warped = torch.where(warped == label, torch.zeros_like(warped), warped)
            labels.append(warped)
        pair_type = "inter" if inter else "intra"
        return TrainingPair(images[0], images[1], pair_type, self.region, labels[0], labels[1])


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


def _load_normalised(path: Path, shape: Shape, modality: str) -> torch.Tensor:
    from regpipe.imageio import load_image
    from regpipe.preprocess import normalize_intensity

    image = load_image(path)
    data = normalize_intensity(np.asarray(image.data, dtype=np.float32), modality)
    # Squash placement, like the network input: the array's own axes fill the grid.
    tensor = torch.from_numpy(np.ascontiguousarray(data))[None, None]
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


class ImagePairSource:
    """Inter-subject pairs of real images, each with a small random affine and augmentation."""

    def __init__(
        self,
        pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
        shape: Shape,
        *,
        region: str = "brain",
        modality: str = "mri",
        name: str = "image-pairs",
    ) -> None:
        if not pairs:
            raise InputError("ImagePairSource needs at least one pair")
        self.name, self.region = name, region
        self.deformation = DeformationRange(rotation_deg=4, scaling=0.04, shear=0.01, translation=0.02, warp=0.0)
        self.intensity = IntensityRange(blur=0.5, bias=0.15, gamma=0.1, noise=0.02)
        cache: dict[Path, torch.Tensor] = {}
        self.pairs = []
        for moving, fixed in pairs:
            for path in (Path(moving), Path(fixed)):
                if path not in cache:
                    cache[path] = _load_normalised(path, shape, modality)
            self.pairs.append((cache[Path(moving)], cache[Path(fixed)]))

    @classmethod
    def all_pairs(cls, paths: Sequence[str | os.PathLike[str]], shape: Shape, **kwargs) -> ImagePairSource:
        """Every ordered pair of distinct images."""
        pairs = [(a, b) for a in paths for b in paths if a != b]
        if not pairs:
            raise InputError("inter-subject pairs need at least two images")
        return cls(pairs, shape, **kwargs)

    def draw(self, shape: Shape, generator: torch.Generator) -> TrainingPair:
        moving, fixed = self.pairs[_choice(len(self.pairs), generator)]
        out = []
        for image in (moving, fixed):
            coords = random_spatial_map(shape, self.deformation, generator)
            out.append(augment_intensity(sample_image(image, coords), self.intensity, generator))
        return TrainingPair(out[0], out[1], "inter", self.region)


class MixedSource:
    """Draw from ``sources`` with probabilities proportional to ``weights``."""

    def __init__(self, sources: Sequence[PairSource], weights: Sequence[float] | None = None) -> None:
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
