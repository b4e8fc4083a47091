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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.spaces import GRID_MODES, Geometry, GridMode
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
            nii = nib.load(os.fspath(path))
            data = np.rint(np.asanyarray(nii.dataobj)).astype(np.int32)
            raw.append(network_order_ras(data, nii.affine))
        # One contiguous label table shared by all maps, so ids agree between subjects.
        original = np.unique(np.concatenate([np.unique(r) for r in raw]))
        self.original_ids = original
        lookup = {int(v): i for i, v in enumerate(original)}
        self.maps, self.boxes = [], []
        for data in raw:
            contiguous = np.searchsorted(original, data).astype(np.int16)
            self.maps.append(_reduce_labels(contiguous, shape))
            self.boxes.append(_foreground_box(contiguous))
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
        # Field of view: from the tight foreground box (t = 0) to the whole volume (t = 1), the
        # same t for both images, as after an affine pre-alignment onto the fixed image's grid.
        t = float(torch.rand((), generator=generator))
        for index in (first, second):
            low, high = self.boxes[index]
            low, high = low * (1 - t), high + (1 - high) * t
            coords = random_spatial_map(shape, self.deformation, generator)
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


@dataclass(frozen=True)
class _Volume:
    """A volume in network order ``[1, 1, k, j, i]`` and the grid of its voxels."""

    tensor: torch.Tensor
    geometry: Geometry
    source: Geometry


def _reduce(volume: np.ndarray, geometry: Geometry, most: int, nearest: bool) -> _Volume:
    """Network-order tensor of ``volume`` with no axis longer than ``most`` (area or nearest)."""
    from regpipe.spaces import to_network_tensor

    tensor = to_network_tensor(volume)
    shape = np.asarray(geometry.shape)
    target = np.minimum(shape, most)
    if np.array_equal(target, shape):
        return _Volume(tensor, geometry, geometry)
    mode = "nearest-exact" if nearest else "area"
    tensor = F.interpolate(tensor, size=tuple(int(n) for n in target[::-1]), mode=mode)
    factor = shape / target  # new voxel i covers old voxels around factor * (i + 1/2) - 1/2
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(factor)
    to_old[:3, 3] = factor / 2 - 0.5
    reduced = Geometry(tuple(int(n) for n in target), geometry.affine @ to_old)  # type: ignore[arg-type]
    return _Volume(tensor, reduced, geometry)


def _normalised_to_volume(volume: Geometry, grid_to_world: np.ndarray, shape: Shape) -> np.ndarray:
    """4x4 map from normalised network-grid coordinates (``[0, 1]``, network order) to the
    normalised coordinates of ``volume``'s network-order tensor, through world space."""
    grid_scale = np.diag([max(int(n) - 1, 1) for n in shape] + [1]).astype(np.float64)
    volume_scale = np.diag([1 / max(n - 1, 1) for n in volume.network_shape()] + [1.0])
    return volume_scale @ np.linalg.inv(volume.network_to_world()) @ grid_to_world @ grid_scale


def _map_coordinates(matrix: np.ndarray, coordinates: torch.Tensor) -> torch.Tensor:
    linear = torch.as_tensor(matrix[:3, :3], dtype=coordinates.dtype)
    offset = torch.as_tensor(matrix[:3, 3], dtype=coordinates.dtype).view(1, 3, 1, 1, 1)
    return torch.einsum("ij,bj...->bi...", linear, coordinates) + offset


class ImagePairSource:
    """Pairs of real images (inter-subject, or sessions of one subject), optionally labelled.

    Each image is placed on the network grid the way :func:`regpipe.register` places it
    (``grid_mode`` ``"squash"`` or ``"isotropic"``, network axis order); with
    ``affine="ours"`` the moving image is first aligned to the fixed one by
    :func:`regpipe.affine.affine_register` (computed at a pair's first draw, then cached; the
    reverse pair reuses its inverse), as the BIDS App and ``regpipe-register`` do by default.
    Every draw adds a small random affine and intensity augmentation to both images.

    Parameters
    ----------
    pairs
        ``(moving, fixed)`` image paths.
    shape
        Network grid (volumes larger than twice its longest side are reduced once).
    labels
        Optional ``{image path: label-map path}`` (label maps on their image's voxel grid).
        A pair whose two images both have one carries ``moving_labels`` / ``fixed_labels``
        (nearest-neighbour samples at the images' coordinates) for a Dice term. Label values
        are re-indexed to contiguous ids shared by the whole dataset (``original_ids[k]`` is
        the value of id ``k``; 0 stays background).
    pair_type
        ``"inter"`` (different subjects) or ``"intra"`` (one subject's sessions).
    grid_mode
        Placement of images on the network grid: ``"squash"`` or ``"isotropic"`` (use the
        ``grid_mode`` of the network's model card).
    affine
        ``"none"`` (each image on its own placement, uniGradICON's training setting) or
        ``"ours"`` (moving image affinely aligned to the fixed image's placement).

    Example
    -------
    >>> source = ImagePairSource([("a.nii.gz", "b.nii.gz")], (96, 96, 96),
    ...                          labels={"a.nii.gz": "a_dseg.nii.gz",
    ...                                  "b.nii.gz": "b_dseg.nii.gz"})  # doctest: +SKIP
    >>> pair = source.draw((96, 96, 96), torch.Generator().manual_seed(0))  # doctest: +SKIP
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
        shape: Shape,
        *,
        region: str = "brain",
        modality: str = "mri",
        labels: Mapping[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        pair_type: str = "inter",
        grid_mode: str = "squash",
        affine: str = "none",
        deformation: DeformationRange | None = None,
        intensity: IntensityRange | None = None,
        name: str = "image-pairs",
    ) -> None:
        if not pairs:
            raise InputError("ImagePairSource needs at least one pair")
        for option, value, allowed in (("pair_type", pair_type, ("inter", "intra")),
                                       ("grid_mode", grid_mode, GRID_MODES),
                                       ("affine", affine, ("none", "ours"))):
            if value not in allowed:
                raise InputError(f"{option} must be {' or '.join(allowed)}, got {value!r}")
        self.name, self.region, self.pair_type = name, region, pair_type
        self.grid_mode, self.affine = grid_mode, affine
        self.deformation = deformation or DeformationRange(
            rotation_deg=4, scaling=0.04, shear=0.01, translation=0.02, warp=0.0)
        self.intensity = intensity or IntensityRange(blur=0.5, bias=0.15, gamma=0.1, noise=0.02)
        most = 2 * max(int(n) for n in shape)
        paths = list(dict.fromkeys(Path(p) for pair in pairs for p in pair))
        index = {path: i for i, path in enumerate(paths)}
        self.images = [_load_placed_image(path, modality, most) for path in paths]
        self.pairs = [(index[Path(m)], index[Path(f)]) for m, f in pairs]
        label_files = {Path(k): Path(v) for k, v in (labels or {}).items()}
        self.label_maps, self.original_ids = _load_label_maps(
            [label_files.get(path) for path in paths], self.images, most)
        self.paths = paths
        self._alignments: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def all_pairs(cls, paths: Sequence[str | os.PathLike[str]], shape: Shape, **kwargs) -> ImagePairSource:
        """Every ordered pair of distinct images."""
        pairs = [(a, b) for a in paths for b in paths if a != b]
        if not pairs:
            raise InputError("inter-subject pairs need at least two images")
        return cls(pairs, shape, **kwargs)

    @property
    def n_labelled_pairs(self) -> int:
        """Pairs whose two images both have a label map."""
        maps = self.label_maps
        return sum(maps[m] is not None and maps[f] is not None for m, f in self.pairs)

    def alignment(self, moving: int, fixed: int) -> np.ndarray:
        """RAS+ mm matrix mapping points of image ``fixed`` to image ``moving`` (cached)."""
        if self.affine == "none":
            return np.eye(4)
        if (moving, fixed) not in self._alignments:
            if (fixed, moving) in self._alignments:
                matrix = np.linalg.inv(self._alignments[(fixed, moving)])
            else:
                from regpipe.affine import affine_register
                from regpipe.spaces import from_network_tensor

                a, b = self.images[fixed], self.images[moving]
                matrix = affine_register(from_network_tensor(a.tensor), a.geometry,
                                         from_network_tensor(b.tensor), b.geometry).matrix
            self._alignments[(moving, fixed)] = matrix
        return self._alignments[(moving, fixed)]

    def draw(self, shape: Shape, generator: torch.Generator) -> TrainingPair:
        from regpipe.spaces import network_grid

        moving, fixed = self.pairs[_choice(len(self.pairs), generator)]
        grid_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        mode: GridMode = self.grid_mode  # type: ignore[assignment]
        # placed on the images' own grids (as registration does), sampled from the stored volumes
        fixed_grid = network_grid(self.images[fixed].source, grid_shape, mode)
        if self.affine == "none":
            moving_grid = network_grid(self.images[moving].source, grid_shape, mode)
        else:
            moving_grid = self.alignment(moving, fixed) @ fixed_grid
        images, maps = [], []
        for which, grid in ((moving, moving_grid), (fixed, fixed_grid)):
            matrix = _normalised_to_volume(self.images[which].geometry, grid, shape)
            coords = _map_coordinates(matrix, random_spatial_map(shape, self.deformation, generator))
            image = sample_image(self.images[which].tensor, coords)
            images.append(augment_intensity(image, self.intensity, generator))
            label_map = self.label_maps[which]
            maps.append(None if label_map is None else sample_labels(label_map, coords))
        if maps[0] is None or maps[1] is None:
            maps = [None, None]
        return TrainingPair(images[0], images[1], self.pair_type, self.region, maps[0], maps[1])


def _load_placed_image(path: Path, modality: str, most: int) -> _Volume:
    from regpipe.imageio import load_image
    from regpipe.preprocess import normalize_intensity

    image = load_image(path)
    data = normalize_intensity(np.asarray(image.data, dtype=np.float32), modality)
    return _reduce(data, image.geometry, most, nearest=False)


def _load_label_maps(files: Sequence[Path | None], images: Sequence[_Volume], most: int
                     ) -> tuple[list[torch.Tensor | None], np.ndarray]:
    """Label maps (int16 network-order tensors, contiguous shared ids) beside their images."""
    from regpipe.imageio import load_image

    raw: list[tuple[np.ndarray, Geometry] | None] = []
    for path in files:
        if path is None:
            raw.append(None)
            continue
        loaded = load_image(path, "labels", "label map")
        raw.append((np.rint(loaded.data).astype(np.int64), loaded.geometry))
    values = [np.unique(r[0]) for r in raw if r is not None]
    original = np.unique(np.concatenate([np.zeros(1, np.int64), *values]))
    if original.size > np.iinfo(np.int16).max:
        raise InputError(f"the label maps hold {original.size} distinct labels (at most 32767)")
    maps: list[torch.Tensor | None] = []
    for path, entry, image in zip(files, raw, images, strict=True):
        if entry is None:
            maps.append(None)
            continue
        data, geometry = entry
        if not geometry.same_as(image.source, atol=1e-3):
            raise InputError(
                f"label map {path} is not on its image's voxel grid (shape {geometry.shape} vs "
                f"{image.source.shape}, or another affine): resample it onto the image first")
        contiguous = np.searchsorted(original, data).astype(np.int16)
        maps.append(_reduce(contiguous, geometry, most, nearest=True).tensor.to(torch.int16))
    return maps, original


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
