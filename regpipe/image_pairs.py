"""Real image pairs for training and finetuning, placed on the network grid like registration.

:class:`ImagePairSource` draws inter- (or intra-) subject pairs of real images, each placed on
the network grid exactly as :func:`regpipe.register` places them (grid mode, network axis
order, optional affine pre-alignment), with optional label maps for the Dice term. It is
re-exported by :mod:`regpipe.training_data` with the other sources. Images can be prepared the
way the BIDS App prepares them before registration (:class:`Preparation`: N4 bias correction
of MRI, brain mask), so that a finetuned network sees what it will register.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regpipe.errors import InputError
from regpipe.spaces import GRID_MODES, Geometry, GridMode
from regpipe.synth import (
    DeformationRange,
    IntensityRange,
    augment_intensity,
    random_spatial_map,
    sample_image,
    sample_labels,
)
from regpipe.training_data import Shape, TrainingPair, _choice

__all__ = ["ImagePairSource", "Preparation"]

LOGGER = logging.getLogger("regpipe.image_pairs")


@dataclass(frozen=True)
class Preparation:
    """How each image is prepared before it is placed on the grid (the BIDS App's steps).

    Attributes
    ----------
    bias_correct
        N4 bias-field correction of MRI images (:func:`regpipe.ants_methods.n4_bias_correct`,
        estimated inside the brain mask when there is one); CT is never bias-corrected.
    masks
        ``{image path: brain mask}``; voxels outside the mask become 0 after intensity
        normalisation (the App's ``--labels`` masks). A mask must share its image's grid, up to
        the order and direction of the voxel axes.
    cache_dir
        Folder for bias-corrected images, reused by later runs (keyed by the image's and the
        mask's path, size and modification time); ``None`` keeps nothing.
    threads
        ITK threads of N4.
    """

    bias_correct: bool = False
    masks: Mapping[Path, Path] = field(default_factory=dict)
    cache_dir: Path | None = None
    threads: int | None = None

    def mask_of(self, path: Path) -> Path | None:
        found = self.masks.get(Path(path))
        return None if found is None else Path(found)


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
    preparation
        Bias correction and brain masks applied to each image before intensity normalisation
        (default: none; ``regpipe-finetune`` prepares images as the BIDS App does).
    image_cache
        A dict shared by sources of the same images with the same ``shape``, ``modality`` and
        ``preparation``: each image is read and prepared once and held in memory once.

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
        preparation: Preparation | None = None,
        image_cache: dict[Path, _Volume] | None = None,
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
        preparation = preparation or Preparation()
        cache = {} if image_cache is None else image_cache
        self.images = []
        for number, path in enumerate(paths, 1):
            if path not in cache:
                if preparation.bias_correct and modality == "mri":
                    LOGGER.info("preparing image %d of %d: %s", number, len(paths), path.name)
                cache[path] = _load_placed_image(path, modality, most, preparation)
            self.images.append(cache[path])
        self.pairs = [(index[Path(m)], index[Path(f)]) for m, f in pairs]
        label_files = {Path(k): Path(v) for k, v in (labels or {}).items()}
        self.label_maps, self.original_ids = _load_label_maps(
            [label_files.get(path) for path in paths], self.images, most)
        self.paths = paths
        self._alignments: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def all_pairs(
        cls, paths: Sequence[str | os.PathLike[str]], shape: Shape, **kwargs
    ) -> ImagePairSource:
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
            # one registration per unordered pair, always in the same direction (the lower
            # index moving): the matrix must not depend on which direction was drawn first,
            # or a resumed run (empty cache) would not repeat an uninterrupted one
            low, high = sorted((moving, fixed))
            if (low, high) not in self._alignments:
                from regpipe.affine import affine_register
                from regpipe.spaces import from_network_tensor

                a, b = self.images[high], self.images[low]
                self._alignments[(low, high)] = affine_register(
                    from_network_tensor(a.tensor), a.geometry,
                    from_network_tensor(b.tensor), b.geometry).matrix
            if (moving, fixed) != (low, high):
                self._alignments[(moving, fixed)] = np.linalg.inv(self._alignments[(low, high)])
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
            spatial_map = random_spatial_map(shape, self.deformation, generator)
            coords = _map_coordinates(matrix, spatial_map)
            image = sample_image(self.images[which].tensor, coords)
            images.append(augment_intensity(image, self.intensity, generator))
            label_map = self.label_maps[which]
            maps.append(None if label_map is None else sample_labels(label_map, coords))
        if maps[0] is None or maps[1] is None:
            maps = [None, None]
        return TrainingPair(images[0], images[1], self.pair_type, self.region, maps[0], maps[1])


def _load_placed_image(path: Path, modality: str, most: int,
                       preparation: Preparation | None = None) -> _Volume:
    from regpipe.imageio import load_image
    from regpipe.preprocess import normalize_intensity

    preparation = preparation or Preparation()
    image = load_image(path)
    mask_path = preparation.mask_of(path)
    mask = None if mask_path is None else mask_on_grid(mask_path, image)
    if preparation.bias_correct and modality == "mri":
        image = _bias_corrected(image, mask, mask_path, preparation)
    data = normalize_intensity(np.asarray(image.data, dtype=np.float32), modality, mask=mask)
    return _reduce(data, image.geometry, most, nearest=False)


def mask_on_grid(mask_path: Path, image) -> np.ndarray:
    """``mask_path``'s mask (bool) on ``image``'s voxel grid (see :func:`_onto_grid`)."""
    from regpipe.imageio import load_image

    mask = load_image(mask_path, "mask", "brain mask")
    return _onto_grid(np.asarray(mask.data) != 0, mask.geometry, image.geometry,
                      f"brain mask {mask_path}", image.name)


def _onto_grid(data: np.ndarray, geometry: Geometry, target: Geometry, what: str,
               owner: str) -> np.ndarray:
    """``data`` (on ``geometry``) on the voxel grid ``target`` of its image.

    Data whose voxel axes are ordered or directed differently (a mask or label map saved in
    RAS order for an image stored LIP, say) are reoriented; any other grid is refused, as the
    BIDS App refuses it.
    """
    from nibabel import orientations

    if geometry.same_as(target, atol=1e-3):
        return data
    change = orientations.ornt_transform(orientations.io_orientation(geometry.affine),
                                         orientations.io_orientation(target.affine))
    moved = orientations.apply_orientation(data, change)
    affine = geometry.affine @ orientations.inv_ornt_aff(change, geometry.shape)
    if Geometry(moved.shape, affine).same_as(target, atol=1e-3):
        return np.ascontiguousarray(moved)
    named = f" {owner}" if owner else ""
    raise InputError(f"{what} is on another voxel grid (shape {geometry.shape}) than its image"
                     f"{named} (shape {target.shape}); resample it onto the image first")


def _cache_key(*paths: Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            digest.update(b"-")
            continue
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _bias_corrected(image, mask: np.ndarray | None, mask_path: Path | None,
                    preparation: Preparation):
    """N4 of ``image`` (inside ``mask``), read from / written to the preparation's cache."""
    from regpipe.ants_methods import n4_bias_correct
    from regpipe.imageio import Image, load_image, save_image

    assert image.path is not None
    cached = None
    if preparation.cache_dir is not None:
        stem = image.path.name.split(".")[0]
        key = _cache_key(image.path, mask_path)
        cached = Path(preparation.cache_dir) / f"{stem}_{key}_n4.nii.gz"
        if cached.is_file():
            try:
                return Image(load_image(cached).data, image.geometry, image.path, image.header)
            except Exception:  # a damaged cache file is computed again
                LOGGER.warning("cached N4 image %s cannot be read: computing it again", cached)
    region = None if mask is None else Image(mask.astype(np.uint8), image.geometry)
    corrected = n4_bias_correct(image, mask=region, threads=preparation.threads)
    corrected = Image(corrected.data, image.geometry, image.path, image.header)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_image(corrected, cached, np.dtype(np.float32))
    return corrected


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
        data = _onto_grid(data, geometry, image.source, f"label map {path}", "")
        contiguous = np.searchsorted(original, data).astype(np.int16)
        maps.append(_reduce(contiguous, image.source, most, nearest=True).tensor.to(torch.int16))
    return maps, original
