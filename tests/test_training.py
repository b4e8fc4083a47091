"""Synthetic pairs, training sources, the training loop and ``regpipe-train``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regpipe.errors import InputError
from regpipe.networks import NetworkConfig, build_network, network_from_file, save_weights
from regpipe.synth import (
    DeformationRange,
    IntensityRange,
    apply_affine,
    random_affine,
    random_shapes,
    random_spatial_map,
    sample_labels,
    synthesize,
)
from regpipe.training import TrainingOptions, train
from regpipe.training_data import (
    ImagePairSource,
    ImageSource,
    LabelMapSource,
    MixedSource,
    RandomShapesSource,
    find_images,
)

SHAPE = (24, 24, 24)
TINY = NetworkConfig((33, 33, 33), 1, (4, 8, 8), (4, 8, 8))
STILL = DeformationRange(0, 0, 0, 0, 0)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _label_map(path, seed: int, shape=(40, 44, 36)) -> str:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int16)
    labels[5:-5, 6:-6, 5:-5] = 2
    labels[10:-10, 12:-12, 10:-10] = 3
    centre = rng.integers(15, 22, size=3)
    labels[centre[0] - 4:centre[0] + 4, centre[1] - 4:centre[1] + 4,
           centre[2] - 3:centre[2] + 3] = 4
    labels[:3] = 150  # a "non-brain" label
    nib.save(nib.Nifti1Image(labels, np.diag([1.2, 1.0, 1.1, 1.0])), path)
    return str(path)


# ----------------------------------------------------------------------------- synth


def test_random_shapes_has_the_requested_labels_and_is_seeded():
    labels = random_shapes(SHAPE, 6, _generator(1))
    assert labels.shape == (1, 1, *SHAPE) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= set(range(6)) and labels.unique().numel() >= 4
    assert torch.equal(labels, random_shapes(SHAPE, 6, _generator(1)))


def test_random_shapes_refuses_one_label():
    with pytest.raises(InputError):
        random_shapes(SHAPE, 1)


def test_still_spatial_map_is_the_identity_and_keeps_labels():
    labels = random_shapes(SHAPE, 5, _generator(2))
    coordinates = random_spatial_map(SHAPE, STILL, _generator(3))
    assert torch.equal(sample_labels(labels, coordinates), labels)


def test_spatial_map_moves_points_within_its_range():
    ranges = DeformationRange(rotation_deg=0, scaling=0, shear=0, translation=0.1, warp=0)
    coordinates = random_spatial_map(SHAPE, ranges, _generator(4))
    still = random_spatial_map(SHAPE, STILL, _generator(4))
    shift = (coordinates - still).flatten(2)
    assert torch.allclose(shift, shift[:, :, :1], atol=1e-6)  # a pure translation
    assert 0 < shift.abs().max() <= 0.1 + 1e-6


def test_spatial_map_without_warp_is_its_random_affine():
    ranges = DeformationRange(rotation_deg=8, scaling=0.1, shear=0.03, translation=0.05, warp=0)
    from regpipe.spaces import identity_grid

    expected = apply_affine(identity_grid(SHAPE), random_affine(ranges, _generator(9)))
    assert torch.allclose(random_spatial_map(SHAPE, ranges, _generator(9)), expected)
    matrix, _ = random_affine(ranges, _generator(9))
    assert not torch.allclose(matrix, torch.eye(3))


def test_negative_ranges_are_refused():
    with pytest.raises(InputError):
        DeformationRange(rotation_deg=-1)


def test_synthesized_image_is_normalised_and_background_stays_zero():
    labels = random_shapes(SHAPE, 5, _generator(5))
    image = synthesize(labels, IntensityRange(), _generator(6), zero_labels=(0, 1))
    assert image.shape == labels.shape
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert torch.all(image[(labels == 0) | (labels == 1)] == 0)
    assert float(image[labels > 1].mean()) > 0


def test_same_means_give_the_same_label_order():
    labels = random_shapes(SHAPE, 4, _generator(7))
    means = torch.tensor([0.0, 0.2, 0.5, 0.9])
    plain = IntensityRange(label_noise=0, blur=0, bias=0, gamma=0, noise=0)
    image = synthesize(labels, plain, _generator(8), means=means)
    averages = [float(image[labels == k].mean()) for k in (1, 2, 3)]
    assert averages == sorted(averages)


# ----------------------------------------------------------------------------- sources


def test_label_map_source_draws_pairs_with_shared_label_ids(tmp_path):
    paths = [_label_map(tmp_path / f"s{i}.nii.gz", i) for i in range(3)]
    source = LabelMapSource(paths, SHAPE, inter_probability=1.0, background_labels=[150])
    pair = source.draw(SHAPE, _generator())
    assert pair.pair_type == "inter" and pair.region == "brain"
    assert pair.moving.shape == pair.fixed.shape == (1, 1, *SHAPE)
    # ids are the contiguous indices of the union of the maps' labels (0, 2, 3, 4, 150)
    assert source.original_ids.tolist() == [0, 2, 3, 4, 150]
    assert set(pair.moving_labels.unique().tolist()) <= {0, 1, 2, 3, 4}


def test_label_maps_without_background_keep_their_lowest_label(tmp_path):
    data = np.full((20, 20, 20), 5, np.int16)
    data[10:] = 6
    path = tmp_path / "full.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    source = LabelMapSource([path], SHAPE)
    assert source.original_ids.tolist() == [0, 5, 6]
    pair = source.draw(SHAPE, _generator())
    assert {1, 2} <= set(pair.moving_labels.unique().tolist())
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match=r"empty\.nii\.gz: .*empty"):
        LabelMapSource([tmp_path / "empty.nii.gz"], SHAPE)


@pytest.mark.parametrize("problem", ["4d", "not-an-image", "intensities"])
def test_what_is_no_label_map_is_one_clear_error(tmp_path, problem):
    path = tmp_path / "bad.nii.gz"
    rng = np.random.default_rng(0)
    if problem == "not-an-image":
        path.write_bytes(b"not a gzip file")
    else:
        data = {"4d": np.ones((8, 8, 8, 3), np.int16),
                "intensities": rng.uniform(0, 300, (8, 8, 8)).astype(np.float32)}[problem]
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"bad\.nii\.gz"):
        LabelMapSource([path], SHAPE)


def test_a_label_map_with_very_many_values_is_warned_about(tmp_path, caplog):
    path = tmp_path / "many.nii.gz"
    values = np.random.default_rng(0).integers(0, 30000, (40, 40, 40)).astype(np.int16)
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))  # an int16 intensity image?
    LabelMapSource([path], SHAPE)
    assert "is it an intensity image?" in caplog.text


def test_network_order_spacing_follows_the_axes_of_a_sagittal_file():
    from regpipe.training_data import network_order_spacing

    affine = np.zeros((4, 4))  # voxel axes i, j, k run along A, S, R (a 3-cycle of RAS)
    affine[1, 0], affine[2, 1], affine[0, 2], affine[3, 3] = 3.0, 1.0, 2.0, 1.0
    assert network_order_spacing(affine).tolist() == [1.0, 3.0, 2.0]  # (S, A, R)


def test_label_maps_in_itk_formats_are_read(tmp_path):
    import SimpleITK as sitk

    labels = np.zeros((20, 22, 18), np.int16)
    labels[4:16, 5:17, 4:14] = 3
    labels[8:12, 8:14, 6:12] = 7
    image = sitk.GetImageFromArray(labels.transpose(2, 1, 0).copy())
    sitk.WriteImage(image, str(tmp_path / "map.mha"))
    source = LabelMapSource([tmp_path / "map.mha"], SHAPE)
    assert source.original_ids.tolist() == [0, 3, 7]


def test_label_map_source_intra_pairs_come_from_one_map(tmp_path):
    paths = [_label_map(tmp_path / f"s{i}.nii.gz", i) for i in range(2)]
    source = LabelMapSource(paths, SHAPE, inter_probability=0.0, deformation=STILL)
    pair = source.draw(SHAPE, _generator(1))
    assert pair.pair_type == "intra"
    assert torch.equal(pair.moving_labels, pair.fixed_labels)


def test_stripped_labels_are_background_in_image_and_labels(tmp_path):
    paths = [_label_map(tmp_path / "s.nii.gz", 0)]
    source = LabelMapSource(paths, SHAPE, background_labels=[150], strip_probability=1.0,
                            deformation=STILL)
    pair = source.draw(SHAPE, _generator(2))
    stripped = source.original_ids.tolist().index(150)
    assert not torch.any(pair.moving_labels == stripped)


def test_shared_placement_moves_both_images_alike(tmp_path):
    paths = [_label_map(tmp_path / "s.nii.gz", 0)]
    placement = DeformationRange(rotation_deg=15, scaling=0.1, shear=0.03, translation=0.05,
                                 warp=0)
    placed = LabelMapSource(paths, SHAPE, deformation=STILL,
                            placement=placement).draw(SHAPE, _generator(3))
    plain = LabelMapSource(paths, SHAPE, deformation=STILL).draw(SHAPE, _generator(3))
    assert torch.equal(placed.moving_labels, placed.fixed_labels)  # no misalignment added
    assert not torch.equal(placed.fixed_labels, plain.fixed_labels)  # but another pose


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    labels = [k for k in b.unique().tolist() if k != 0]
    return float(np.mean([2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())
                          for k in labels]))


def test_aligned_maps_start_pairs_as_an_affine_pre_alignment_would(tmp_path):
    from scipy import ndimage

    shape = (48, 48, 48)
    first = np.zeros(shape, np.int16)
    first[10:38, 12:36, 9:39] = 1
    first[16:30, 18:30, 14:26] = 2
    first[20:26, 14:20, 28:34] = 3
    # the same anatomy turned by 12 degrees and shifted, in a differently framed volume
    second = ndimage.rotate(first, 12, axes=(0, 2), reshape=False, order=0)
    second = np.pad(ndimage.shift(second, (3, -2, 2), order=0), ((0, 8), (4, 0), (0, 0)))
    paths = []
    for i, data in enumerate((first, second)):
        paths.append(str(tmp_path / f"m{i}.nii.gz"))
        nib.save(nib.Nifti1Image(data, np.eye(4)), paths[-1])
    kwargs = {"inter_probability": 1.0, "deformation": STILL}
    boxes = LabelMapSource(paths, SHAPE, **kwargs).draw(SHAPE, _generator(4))
    aligned = LabelMapSource(paths, SHAPE, align=True, **kwargs).draw(SHAPE, _generator(4))
    assert _overlap(aligned.moving_labels, aligned.fixed_labels) > 0.85
    assert _overlap(aligned.moving_labels, aligned.fixed_labels) > (
        _overlap(boxes.moving_labels, boxes.fixed_labels) + 0.1)


def test_recipe_ranges_become_deformation_ranges(tmp_path):
    from regpipe.cli.train import build_source

    paths = [_label_map(tmp_path / "s.nii.gz", 0)]
    source = build_source([
        {"type": "label-maps", "paths": paths, "placement": {"rotation_deg": 5, "warp": 0},
         "deformation": {"warp": 0.01, "warp_resolution": [3, 5]}},
        {"type": "random-shapes", "deformation": {"scaling": 0.02}},
    ], SHAPE, tmp_path)
    labels, shapes = source.sources
    assert labels.placement == DeformationRange(rotation_deg=5, warp=0)
    assert labels.deformation.warp_resolution == (3, 5)
    assert shapes.deformation == DeformationRange(scaling=0.02)
    with pytest.raises(InputError, match="placement"):
        build_source([{"type": "label-maps", "paths": paths, "placement": {"spin": 1}}], SHAPE,
                     tmp_path)


def test_unknown_region_is_refused(tmp_path):
    with pytest.raises(InputError, match="region"):
        LabelMapSource([_label_map(tmp_path / "s.nii.gz", 0)], SHAPE, region="elbow")


def test_find_images_in_a_bids_dataset_keeps_anat_t1w_outside_derivatives(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    for rel in ("sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_dseg.nii.gz",
                "derivatives/x/sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii"]


def test_find_images_in_an_empty_folder_says_so(tmp_path):
    with pytest.raises(InputError, match="no images"):
        find_images(tmp_path)


def _image(path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    data = np.zeros((30, 28, 26), np.float32)
    data[6:-6, 6:-6, 5:-5] = 100 + rng.normal(0, 5, (18, 16, 16))
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return str(path)


def test_image_sources_give_intra_and_inter_pairs(tmp_path):
    paths = [_image(tmp_path / f"i{i}.nii.gz", i) for i in range(2)]
    intra = ImageSource(paths, SHAPE).draw(SHAPE, _generator())
    inter = ImagePairSource.all_pairs(paths, SHAPE).draw(SHAPE, _generator())
    assert (intra.pair_type, inter.pair_type) == ("intra", "inter")
    for image in (intra.moving, intra.fixed, inter.moving, inter.fixed):
        assert (image.shape == (1, 1, *SHAPE) and 0 <= float(image.min())
                and float(image.max()) <= 1)


def test_mixed_source_never_draws_a_zero_weight_source():
    shapes = RandomShapesSource(region="other")
    knees = RandomShapesSource(region="knee")
    mixed = MixedSource([shapes, knees], [0.0, 1.0])
    regions = {mixed.draw((16, 16, 16), _generator(i)).region for i in range(5)}
    assert regions == {"knee"}
    with pytest.raises(InputError):
        MixedSource([shapes], [-1.0])


# ----------------------------------------------------------------------------- training


def _train(folder, steps, **kwargs):
    torch.manual_seed(0)
    network = build_network(TINY)
    options = TrainingOptions(steps=steps, progress=False, checkpoint_every=1, **kwargs)
    return network, train(network, RandomShapesSource(), folder, options, {"name": "tiny"})


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, state = _train(tmp_path / "whole", 4)
    _train(tmp_path / "split", 2)
    resumed, state2 = _train(tmp_path / "split", 4)
    assert state.step == state2.step == 4
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), key
    rows = list(csv.DictReader((tmp_path / "split" / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_workers_draw_the_same_pairs_and_give_the_same_run(tmp_path):
    serial, _ = _train(tmp_path / "serial", 3, workers=0, batch_size=2, lam_range=(0.5, 5.0))
    threaded, state = _train(tmp_path / "threaded", 3, workers=3, batch_size=2,
                             lam_range=(0.5, 5.0))
    assert state.step == 3 and state.data_wait_seconds >= 0
    for (key, a), b in zip(serial.state_dict().items(), threaded.state_dict().values(),
                           strict=True):
        assert torch.allclose(a, b, atol=1e-6), key
    logs = [[(r["similarity"], r["lam"], r["pair_type"]) for r in
             csv.DictReader((tmp_path / run / "log.csv").read_text().splitlines())]
            for run in ("serial", "threaded")]
    assert logs[0] == logs[1]
    assert len({lam for _, lam, _ in logs[0]}) == 3  # each step its own lam


def test_resumed_threaded_run_equals_an_uninterrupted_one(tmp_path):
    whole, _ = _train(tmp_path / "whole", 4, workers=0)
    _train(tmp_path / "split", 2, workers=2)
    resumed, _ = _train(tmp_path / "split", 4, workers=2)
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), key


def test_a_failing_draw_in_a_worker_reaches_the_caller(tmp_path):
    class Broken:
        name, region = "broken", "other"

        def draw(self, shape, generator):
            raise InputError("this source cannot draw")

    options = TrainingOptions(steps=3, progress=False, workers=2)
    with pytest.raises(InputError, match="cannot draw"):
        train(build_network(TINY), Broken(), tmp_path, options)
    with pytest.raises(InputError, match="workers"):
        TrainingOptions(workers=-1)


def test_pairs_depend_on_seed_step_and_place_only():
    from regpipe.pair_stream import PairStream

    def stream(workers):
        return PairStream(RandomShapesSource(), SHAPE, seed=3, batch_size=2, workers=workers,
                          last_step=5)

    serial, threaded = stream(0), stream(2)
    try:
        late = threaded.pairs(4)  # steps 1-3 never drawn by this one
        assert all(torch.equal(a.moving, b.moving)
                   for a, b in zip(serial.pairs(4), late, strict=True))
        assert not torch.equal(late[0].moving, late[1].moving)
        assert not torch.equal(serial.pairs(5)[0].moving, late[0].moving)
    finally:
        serial.close()
        threaded.close()


def test_workers_default_to_none_on_the_cpu_and_some_on_a_gpu():
    from regpipe.pair_stream import default_workers

    assert default_workers(torch.device("cpu")) == 0
    assert 1 <= default_workers(torch.device("cuda")) <= 8


def test_weight_average_of_a_resumed_run_is_the_mean_of_its_snapshots(tmp_path):
    import shutil

    from regpipe.networks import average_weights

    snapshots = []
    for steps in (2, 4, 6):  # three calls: the average travels in the checkpoint
        _train(tmp_path / "run", steps, average_from=2, average_every=2, lr=1e-2)
        snapshots.append(shutil.copy(tmp_path / "run" / "weights.pt",
                                     tmp_path / f"step{steps}.pt"))
    average_weights(snapshots, tmp_path / "expected.pt")
    expected = network_from_file(tmp_path / "expected.pt").regis_net.state_dict()
    averaged = network_from_file(tmp_path / "run" / "weights-avg.pt")
    last = network_from_file(tmp_path / "run" / "weights.pt").regis_net.state_dict()
    for key, value in averaged.regis_net.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    assert any(not torch.allclose(averaged.regis_net.state_dict()[k], last[k]) for k in last)
    assert averaged.metadata["weight_average"] == {"snapshots": 3, "first_step": 2, "last_step": 6}
    assert "weight_average" in (tmp_path / "run" / "weights-avg.md").read_text()
    with pytest.raises(InputError, match="average_every"):
        TrainingOptions(average_every=0)


def test_without_a_progress_bar_each_checkpoint_logs_a_line(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="regpipe.training"):
        torch.manual_seed(0)
        train(build_network(TINY), RandomShapesSource(), tmp_path,
              TrainingOptions(steps=4, checkpoint_every=2, progress=False))
    lines = [r.getMessage() for r in caplog.records if r.name == "regpipe.training"]
    assert lines[0].startswith("starting at step 0 of 4 on CPU") and "0 thread(s)" in lines[0]
    assert lines[-1].startswith("waited ") and "for training pairs" in lines[-1]
    lines = lines[1:-1]
    assert len(lines) == 2 and lines[0].startswith("step 2/4: loss ") and "s/step" in lines[0]
    assert "mean of 2 steps" in lines[1] and lines[1].endswith("0 min to go")


def test_no_average_file_without_average_from(tmp_path):
    _train(tmp_path, 2)
    assert not (tmp_path / "weights-avg.pt").exists()


def test_budget_stops_cleanly_with_a_checkpoint(tmp_path):
    _, state = _train(tmp_path, 50, budget_seconds=0.0)
    assert state.stopped_by == "budget" and state.step == 0
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "weights.pt").exists()


def test_weights_file_loads_with_its_card(tmp_path):
    _train(tmp_path, 1)
    network = network_from_file(tmp_path / "weights.pt")
    assert network.config == TINY
    assert network.metadata["name"] == "tiny" and network.metadata["training"]["steps"] == 1
    assert "Model card: tiny" in (tmp_path / "weights.md").read_text()


def test_resuming_with_another_configuration_is_refused(tmp_path):
    _train(tmp_path, 1)
    other = build_network(NetworkConfig((33, 33, 33), 1, (4, 8, 16), (4, 8, 8)))
    with pytest.raises(InputError, match="--init"):
        train(other, RandomShapesSource(), tmp_path, TrainingOptions(steps=2, progress=False))


def test_training_lowers_the_loss_on_a_fixed_pair(tmp_path):
    class OnePair:
        name, region = "one", "other"

        def __init__(self):
            self.pair = RandomShapesSource().draw(TINY.grid_shape, _generator(11))

        def draw(self, shape, generator):
            return self.pair

    torch.manual_seed(0)
    network = build_network(TINY)
    options = TrainingOptions(steps=40, lr=2e-3, progress=False, checkpoint_every=100)
    train(network, OnePair(), tmp_path, options)
    rows = list(csv.DictReader((tmp_path / "log.csv").read_text().splitlines()))
    first = np.mean([float(r["similarity"]) for r in rows[:5]])
    last = np.mean([float(r["similarity"]) for r in rows[-5:]])
    assert last < first - 0.02


def test_dice_term_is_logged_for_labelled_pairs(tmp_path):
    torch.manual_seed(0)
    train(build_network(TINY), RandomShapesSource(), tmp_path,
          TrainingOptions(steps=2, dice_weight=1.0, progress=False))
    rows = list(csv.DictReader((tmp_path / "log.csv").read_text().splitlines()))
    assert all(float(r["dice"]) > 0 for r in rows)


def test_drawn_dice_labels_keep_at_most_n_shared_labels_in_both_maps():
    from regpipe.training import _draw_labels

    moving = torch.tensor([0, 1, 2, 3, 4, 5, 9]).view(1, 1, 7, 1, 1)
    fixed = torch.tensor([0, 1, 2, 3, 4, 5, 6]).view(1, 1, 7, 1, 1)
    kept_moving, kept_fixed = _draw_labels((moving, fixed), 2, _generator(3))
    kept = set(kept_moving.unique().tolist()) - {0}
    assert len(kept) == 2 and kept <= {1, 2, 3, 4, 5}
    assert set(kept_fixed.unique().tolist()) - {0} == kept
    assert torch.equal(kept_moving != 0, torch.isin(moving, torch.tensor(sorted(kept))))
    assert _draw_labels((moving, fixed), 5, _generator()) == (moving, fixed)
    draws = {frozenset(_draw_labels((moving, fixed), 2, _generator(s))[0].unique().tolist())
             for s in range(20)}
    assert len(draws) > 3  # different labels on different steps
    with pytest.raises(InputError, match="dice_labels"):
        TrainingOptions(dice_labels=0)


def test_dice_labels_reach_the_dice_term(tmp_path, monkeypatch):
    from regpipe import losses

    seen = []
    original = losses.shared_label_one_hot

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result[0].shape[1])
        return result

    monkeypatch.setattr(losses, "shared_label_one_hot", spy)
    torch.manual_seed(0)
    train(build_network(TINY), RandomShapesSource(labels_range=(8, 8)), tmp_path,
          TrainingOptions(steps=2, dice_weight=1.0, dice_labels=2, progress=False))
    assert seen and max(seen) == 2


def test_lam_range_draws_lam_per_step(tmp_path):
    torch.manual_seed(0)
    train(build_network(TINY), RandomShapesSource(), tmp_path,
          TrainingOptions(steps=3, lam_range=(0.5, 5.0), progress=False))
    rows = csv.DictReader((tmp_path / "log.csv").read_text().splitlines())
    lams = [float(r["lam"]) for r in rows]
    assert len(set(lams)) == 3 and all(0.5 <= v <= 5.0 for v in lams)


def test_lncc_sigma_reaches_the_similarity(tmp_path, monkeypatch):
    from regpipe import losses

    seen = []
    original = losses.lncc_loss

    def spy(*args, sigma=losses.LNCC_SIGMA, **kwargs):
        seen.append(sigma)
        return original(*args, sigma=sigma, **kwargs)

    monkeypatch.setitem(losses.SIMILARITIES, "lncc", spy)
    torch.manual_seed(0)
    train(build_network(TINY), RandomShapesSource(), tmp_path,
          TrainingOptions(steps=1, lncc_sigma=2.0, progress=False))
    assert seen and set(seen) == {2.0}
    with pytest.raises(InputError, match="lncc_sigma"):
        TrainingOptions(lncc_sigma=0)


def test_invalid_options_are_refused():
    with pytest.raises(InputError):
        TrainingOptions(similarity="mse")
    with pytest.raises(InputError):
        TrainingOptions(lam_range=(2.0, 1.0))


# ----------------------------------------------------------------------------- CLI


def test_parse_duration():
    from regpipe.cli.train import parse_duration

    assert parse_duration("90m") == 5400 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45 and parse_duration("2h") == 7200
    with pytest.raises(Exception, match="duration"):
        parse_duration("soon")
    assert parse_duration("2h30m") == 9000 and parse_duration("1m30s") == 90
    with pytest.raises(Exception, match="ambiguous"):
        parse_duration("2h30")


def test_card_grid_mode_follows_the_sources_and_init():
    from types import SimpleNamespace

    from regpipe.cli.train import training_grid_mode

    maps = {"sources": [{"type": "label-maps", "paths": ["x"]}]}
    assert training_grid_mode(maps) == "squash-ras"
    assert training_grid_mode({**maps, "grid_mode": "squash-ras"}) == "squash-ras"
    with pytest.raises(InputError, match="RAS-reoriented"):
        training_grid_mode({**maps, "grid_mode": "squash"})
    with pytest.raises(InputError, match="grid_mode must be one of"):
        training_grid_mode({"sources": [], "grid_mode": "isotropc"})
    shapes = {"sources": [{"type": "random-shapes"}]}
    assert training_grid_mode(shapes) == "squash"
    init = SimpleNamespace(card={"grid_mode": "isotropic"})
    assert training_grid_mode(shapes, init) == "isotropic"
    assert training_grid_mode({**shapes, "grid_mode": "squash"}, init) == "squash"


TINY_ARGS = ["--grid", "33", "--unets", "1", "--down-channels", "4,8,8", "--up-channels", "4,8,8",
             "--no-progress"]


def test_cli_trains_from_a_recipe_and_continues(tmp_path, capsys):
    from regpipe.cli.train import main

    maps = [_label_map(tmp_path / f"s{i}.nii.gz", i) for i in range(2)]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({
        "name": "unit", "steps": 2, "dice_weight": 0.5,
        "sources": [{"type": "label-maps", "paths": ["s*.nii.gz"], "weight": 1,
                     "strip_labels_from": 100}, {"type": "random-shapes", "weight": 1}],
    }))
    run = tmp_path / "run"
    assert main([str(run), "--recipe", str(recipe), "--data-root", str(tmp_path), *TINY_ARGS]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert main([str(run), "--recipe", str(recipe), "--data-root", str(tmp_path), "--steps", "3",
                 "--workers", "2", "--average-from", "1", "--average-every", "1", *TINY_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["data_wait_seconds"] >= 0
    card = network_from_file(run / "weights.pt").metadata
    assert card["name"] == "unit" and card["training"]["steps"] == 3
    assert card["training"]["options"]["workers"] == 2
    assert network_from_file(run / "weights-avg.pt").metadata["weight_average"]["snapshots"] == 1
    assert len(maps) == 2


def test_resume_refuses_other_settings_and_applies_a_new_lr(tmp_path, capsys):
    from regpipe.cli.train import main

    run = tmp_path / "run"
    assert main([str(run), "--steps", "2", *TINY_ARGS]) == 0
    assert main([str(run), "--steps", "3", "--seed", "7", *TINY_ARGS]) == 1
    assert "seed 0 -> 7" in capsys.readouterr().err
    assert main([str(run), "--steps", "3", "--trainable", "controller", *TINY_ARGS]) == 1
    capsys.readouterr()
    assert main([str(run), "--steps", "3", "--lr", "0.01", *TINY_ARGS]) == 0
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [0.01]


def test_resume_keeps_the_init_and_its_placement_and_checks_the_data_root(
        tmp_path, capsys, monkeypatch):
    from regpipe.cli.train import main
    from regpipe.weights import sha256sum

    start = save_weights(build_network(TINY), tmp_path / "start.pt",
                         {"grid_mode": "squash-ras"})
    (tmp_path / "a").mkdir()
    maps = [Path(_label_map(tmp_path / "a" / f"s{i}.nii.gz", i)) for i in range(2)]
    source = ["--label-maps", "s*.nii.gz"]
    run = tmp_path / "run"
    assert main([str(run), "--steps", "1", "--init", str(start), "--data-root",
                 str(tmp_path / "a"), *source, "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)  # the same file under another name: still the same start
    assert main([str(run), "--steps", "2", "--init", "./start.pt", "--data-root", "a", *source,
                 "--no-progress"]) == 0
    sha = sha256sum(start)
    start.rename(tmp_path / "moved.pt")  # resumed without --init: the run's own record holds
    assert main([str(run), "--steps", "3", "--data-root", "a", *source, "--no-progress"]) == 0
    card = network_from_file(run / "weights.pt").metadata
    assert card["grid_mode"] == "squash-ras" and card["training"]["steps"] == 3
    assert card["training"]["recipe"]["init"] == "./start.pt"  # as the last resume named it
    assert card["training"]["recipe"]["init_sha256"] == sha
    (tmp_path / "b").mkdir()  # another data set with the same file names: refused
    for path in maps:
        path.rename(tmp_path / "b" / path.name)
    capsys.readouterr()
    assert main([str(run), "--steps", "4", "--data-root", "b", *source, "--no-progress"]) == 1
    assert "data_root" in capsys.readouterr().err


def test_budget_counts_reading_the_data_and_a_finished_run_says_so(tmp_path, capsys,
                                                                   monkeypatch, caplog):
    import time

    from regpipe.cli import train as train_cli

    real = train_cli.build_source

    def slow(*args, **kwargs):  # reading large label maps takes a while
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_cli, "build_source", slow)
    caplog.set_level("INFO", logger="regpipe")
    run = tmp_path / "run"
    assert train_cli.main([str(run), "--steps", "50", "--budget", "1", *TINY_ARGS]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] <= 1
    assert "of --budget spent on reading the data sources" in caplog.text
    monkeypatch.setattr(train_cli, "build_source", real)
    assert train_cli.main([str(run), "--steps", "2", *TINY_ARGS]) == 0
    assert train_cli.main([str(run), "--steps", "2", *TINY_ARGS]) == 0
    assert "already at step 2 of --steps 2: nothing to train" in caplog.text


def test_a_conditional_run_resumes_without_init_and_absolute_sources_from_anywhere(
        tmp_path, monkeypatch):
    from regpipe.cli.train import main

    start = save_weights(build_network(TINY), tmp_path / "start.pt", {"grid_mode": "squash"})
    (tmp_path / "a").mkdir()
    _label_map(tmp_path / "a" / "s0.nii.gz", 0)
    source = ["--label-maps", str(tmp_path / "a" / "s*.nii.gz")]  # absolute: no data root
    run = tmp_path / "run"
    assert main([str(run), "--steps", "1", "--init", str(start), "--conditional", "film",
                 *source, "--no-progress"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # another default data root ".": same data
    assert main([str(run), "--steps", "2", *source, "--no-progress"]) == 0
    assert network_from_file(run / "weights.pt").metadata["training"]["steps"] == 2
    preset = tmp_path / "preset"  # a conditional run of a preset network, no --init at all
    assert main([str(preset), "--steps", "1", "--conditional", "film", *TINY_ARGS]) == 0
    assert main([str(preset), "--steps", "2", *TINY_ARGS]) == 0


def test_nan_loss_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    from regpipe import training
    from regpipe.cli.train import main

    original = training._objective

    def nan_objective(*args, **kwargs):
        terms, used = original(*args, **kwargs)
        return terms._replace(all_loss=terms.all_loss * float("nan")), used

    monkeypatch.setattr(training, "_objective", nan_objective)
    assert main([str(tmp_path / "run"), "--steps", "2", *TINY_ARGS]) == 1
    err = capsys.readouterr().err
    assert "the loss became nan at step 1; start again with a lower --lr" in err
    assert "Traceback" not in err


def test_a_run_stopped_by_a_signal_exits_130(tmp_path, monkeypatch):
    from regpipe import training
    from regpipe.cli.train import main

    def stopped(network, source, folder, options, card):
        return training.TrainingState(1, 1.0, "signal", folder, {}, 0.0)

    monkeypatch.setattr(training, "train", stopped)
    assert main([str(tmp_path / "run"), "--steps", "2", *TINY_ARGS]) == 130


def test_a_row_cut_off_by_a_kill_is_dropped_not_glued_to_the_next(tmp_path):
    torch.manual_seed(0)
    options = TrainingOptions(steps=2, checkpoint_every=2, progress=False)
    train(build_network(TINY), RandomShapesSource(), tmp_path, options)
    log = tmp_path / "log.csv"
    log.write_text(log.read_text() + "2,1,1,1,1,0,0.1,other,intra,1.5\n10")  # cut mid-row
    train(build_network(TINY), RandomShapesSource(), tmp_path,
          TrainingOptions(steps=3, checkpoint_every=2, progress=False))
    rows = log.read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "2", "3"]
    assert all(r.count(",") == rows[0].count(",") for r in rows)


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    import fcntl

    with open(tmp_path / ".lock", "w") as other:  # another process's lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("12345\n")
        other.flush()
        with pytest.raises(InputError, match=r"another run \(process 12345\) is training"):
            _train(tmp_path, 1)
    _train(tmp_path, 1)  # free again once the first run is over


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                   caplog):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="regpipe.training"):
        _, state = _train(tmp_path, 1)
    assert state.step == 1 and "cannot lock" in caplog.text


def test_seed_sets_the_initial_weights_of_a_new_network(tmp_path):
    from regpipe.cli.train import main

    for name in ("a", "b"):
        torch.manual_seed(123 if name == "a" else 456)  # whatever ran before
        assert main([str(tmp_path / name), "--steps", "1", "--seed", "5", "--no-progress",
                     *TINY_ARGS]) == 0
    first, second = (network_from_file(tmp_path / n / "weights.pt").state_dict()
                     for n in ("a", "b"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resuming_without_averaging_keeps_the_average(tmp_path, caplog):
    _train(tmp_path, 4, average_from=2, average_every=2)
    before = network_from_file(tmp_path / "weights-avg.pt").metadata["weight_average"]
    with caplog.at_level("WARNING", logger="regpipe.training"):
        _train(tmp_path, 6)
    assert "kept but not extended" in caplog.text
    _train(tmp_path, 8, average_from=2, average_every=2)
    after = network_from_file(tmp_path / "weights-avg.pt").metadata["weight_average"]
    assert before == {"snapshots": 2, "first_step": 2, "last_step": 4}
    assert after == {"snapshots": 3, "first_step": 2, "last_step": 8}


def test_log_rows_after_the_resumed_checkpoint_are_dropped(tmp_path):
    torch.manual_seed(0)
    options = TrainingOptions(steps=2, checkpoint_every=2, progress=False)
    train(build_network(TINY), RandomShapesSource(), tmp_path, options)
    log = tmp_path / "log.csv"
    rows = log.read_text().splitlines()
    log.write_text("\n".join([*rows, "3,1,1,1,1,0,0.1,other,intra,1.5"]) + "\n")  # a lost step
    train(build_network(TINY), RandomShapesSource(), tmp_path,
          TrainingOptions(steps=3, checkpoint_every=2, progress=False))
    steps = [r.split(",")[0] for r in log.read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3"]


@pytest.mark.parametrize(("recipe", "message"), [
    ({"step": 2}, "unknown key(s) step"),
    ({"steps": "2"}, "steps must be int"),
    ({"lr": True}, "lr must be"),
    ({"budget": "1 hour"}, "budget: cannot read the duration"),
    ([1, 2], "a recipe is a JSON object"),
    ({"sources": {"type": "random-shapes"}}, "sources must be list"),
    ({"sources": [{"type": "random-shapes", "weigth": 2}]}, "unexpected keyword argument"),
    ({"sources": [{"type": "label-maps"}]}, "needs 'paths'"),
    ({"down_channels": 4}, "down_channels must be list"),
    ({"lam_range": 2}, "lam_range must be list"),
    ({"lam_range": [1, 2, 3]}, "lam_range must be [low, high]"),
    ({"grid": [17, "a", 17]}, "grid must be a list of integers"),
    ({"sources": [{"type": "random-shapes", "weight": "abc"}]}, "weight must be a number"),
    ({"no_amp": "no"}, "no_amp must be bool"),
    ({"sources": []}, "sources is empty"),
    ({"sources": [{"type": "label-maps", "paths": ["*.nii.gz"], "align": "false"}]},
     "align must be true or false"),
    ({"sources": [{"type": "label-maps", "paths": ["*.nii.gz"], "strip_labels_from": "abc"}]},
     "strip_labels_from must be an integer"),
    ({"sources": [{"type": "random-shapes", "labels_range": 5}]}, "labels_range must be"),
    ({"sources": [{"type": "label-maps", "paths": ["*.nii.gz"], "inter_probability": 2}]},
     "inter_probability must be a number from 0 to 1"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, capsys, recipe, message):
    from regpipe.cli.train import main

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    assert main([str(tmp_path / "run"), "--recipe", str(path), *TINY_ARGS]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_recipe_grid_may_be_one_number(tmp_path, capsys):
    from regpipe.cli.train import main

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"grid": 33, "steps": 1, "unets": 1, "down_channels": [4, 8, 8],
                                "up_channels": [4, 8, 8]}))
    assert main([str(tmp_path / "run"), "--recipe", str(path), "--no-progress"]) == 0
    assert network_from_file(tmp_path / "run" / "weights.pt").config.grid_shape == (33, 33, 33)


def test_cli_init_from_weights_at_another_grid(tmp_path, capsys):
    from regpipe.cli.train import main

    assert main([str(tmp_path / "a"), "--steps", "1", *TINY_ARGS]) == 0
    args = [str(tmp_path / "b"), "--init", str(tmp_path / "a" / "weights.pt"), "--grid", "41",
            "--steps", "1", "--no-progress"]
    assert main(args) == 0
    assert network_from_file(tmp_path / "b" / "weights.pt").config.grid_shape == (41, 41, 41)


def test_cli_reports_a_missing_data_path(tmp_path, capsys):
    from regpipe.cli.train import main

    code = main([str(tmp_path / "run"), "--label-maps", str(tmp_path / "nothing*.nii.gz"),
                 *TINY_ARGS])
    assert code == 1 and "no file matches" in capsys.readouterr().err
