"""``regpipe-finetune``: pairs from a BIDS dataset, label maps for Dice, resume, errors, card.

One module-scoped BIDS dataset of five tiny phantom images (20x22x18 at 2 mm): sub-01 and
sub-02 with sessions 1 and 2, sub-03 with session 1; label maps (``desc-aseg_dseg``) in a
derivative dataset for sub-01 (both sessions) and sub-02 ses-1. The starting network is a
random 17^3 network with one U-Net whose card says ``grid_mode: isotropic``. Nothing touches
the network; registry weights are absent on purpose.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from regpipe.bids_app import finetune
from regpipe.bids_app.bids import Image
from regpipe.bids_app.exit_codes import AppError

from regpipe.errors import InputError
from regpipe.image_pairs import Preparation
from regpipe.networks import (
    NetworkConfig,
    build_network,
    network_from_file,
    save_weights,
)
from regpipe.spaces import network_grid
from regpipe.synth import DeformationRange, IntensityRange
from regpipe.training_data import ImagePairSource

pytest.importorskip("bids")

TINY = NetworkConfig((17, 17, 17), 1, (4, 8), (4, 8))
OTHER = NetworkConfig((17, 17, 17), 1, (4, 4), (4, 4))
SHAPE = (20, 22, 18)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SESSIONS = [("01", "1"), ("01", "2"), ("02", "1"), ("02", "2"), ("03", "1")]
STILL = DeformationRange(0, 0, 0, 0, 0)
PLAIN = IntensityRange(0, 0, 0, 0, 0)
FAST = ["--steps", "2", "--no-progress", "--threads", "1", "--affine-init", "none"]


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    """A private, empty weights cache; downloads forbidden."""
    monkeypatch.setenv("REGPIPE_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("REGPIPE_OFFLINE", "1")


def _phantom(shift) -> tuple[np.ndarray, np.ndarray]:
    """A smooth blob (labels 2) with a bright core (label 5), centred at ``centre + shift``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(float)
    centre = np.array([10.0, 11.0, 9.0]) + shift
    radius = np.linalg.norm((index - centre) / [6, 7, 5], axis=-1)
    core = np.linalg.norm((index - centre - [2, 1, 0]) / [2, 3, 2], axis=-1) < 1
    labels = (radius < 1) * 2 + core * 3
    return (np.exp(-2 * radius**2) * 100 + core * 50).astype(np.float32), labels.astype(np.int16)


def _save(data: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    bids_dir, labels_dir = root / "bids", root / "labels"
    bids_dir.mkdir()
    (bids_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "Tiny Study", "BIDSVersion": "1.10.0"}))
    labels_dir.mkdir()
    (labels_dir / "dataset_description.json").write_text(json.dumps(
        {"Name": "labels", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    for i, (subject, session) in enumerate(SESSIONS):
        image, labels = _phantom(np.array([i % 3 - 1, (2 * i) % 3 - 1, 0]))
        stem = f"sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}"
        _save(image, bids_dir / f"{stem}_T1w.nii.gz")
        if i < 3:
            _save(labels, labels_dir / f"{stem}_desc-aseg_dseg.nii.gz")
        if i == 0:
            _save((labels > 0).astype(np.uint8), labels_dir / f"{stem}_desc-brain_mask.nii.gz")
    torch.manual_seed(0)
    start = save_weights(build_network(TINY), root / "start.pt",
                         {"name": "tiny-start", "grid_mode": "isotropic"})
    other = save_weights(build_network(OTHER), root / "other.pt", {"name": "other"})
    return {"bids": bids_dir, "labels": labels_dir, "start": start, "other": other, "root": root}


def _finetune(data: dict, out: Path, *options) -> int:
    argv = [str(data["bids"]), str(out), "--weights", str(data["start"]), *map(str, options)]
    return finetune.main(argv)


def _card(folder: Path) -> dict:
    return network_from_file(folder / "weights.pt").metadata


def _log(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- pairs


def _images(*labels: tuple[str, str | None]) -> list[Image]:
    return [Image(s, t, Path(f"/d/sub-{s}_ses-{t}_T1w.nii.gz"), {}) for s, t in labels]


def test_inter_pairs_are_ordered_pairs_of_different_subjects():
    images = _images(("01", "1"), ("01", "2"), ("02", "1"))
    pairs = finetune.inter_pairs(images)
    assert len(pairs) == 4 and all(a.subject != b.subject for a, b in pairs)
    assert (images[0], images[2]) in pairs and (images[2], images[0]) in pairs


def test_intra_pairs_join_sessions_of_one_subject_both_ways():
    images = _images(("01", "1"), ("01", "2"), ("02", "1"), ("03", None))
    assert finetune.intra_pairs(images) == [(images[0], images[1]), (images[1], images[0])]


def test_both_uses_the_available_kind_when_the_other_has_none(caplog):
    images = _images(("01", "1"), ("02", "1"))
    pairs = finetune.form_pairs(images, "both")
    assert list(pairs) == ["inter"] and len(pairs["inter"]) == 2
    assert "two or more sessions" in caplog.text


def test_no_intra_pairs_says_why_and_what_would_work():
    with pytest.raises(AppError, match=r"two or more sessions.*--pairs inter") as error:
        finetune.form_pairs(_images(("01", "1"), ("02", None)), "intra")
    assert error.value.code == 66


def test_no_inter_pairs_with_one_subject():
    with pytest.raises(AppError, match=r"two or more subjects.*--pairs intra"):
        finetune.form_pairs(_images(("01", "1"), ("01", "2")), "inter")


@pytest.mark.parametrize("options, inter, intra", [
    (["--pairs", "both"], 16, 4),
    (["--pairs", "both", "--participant-label", "01", "sub-02"], 8, 4),
    (["--pairs", "inter", "--session-label", "1"], 6, 0),
    (["--pairs", "intra", "--participant-label", "02"], 0, 2),
])
def test_filters_select_the_pairs_recorded_in_the_card(data, tmp_path, options, inter, intra):
    assert _finetune(data, tmp_path / "run", *FAST, "--steps", "0", *options) == 0
    record = _card(tmp_path / "run")["finetuning"]
    assert (record["pairs_inter"], record["pairs_intra"]) == (inter, intra)


def test_intra_with_single_session_subjects_is_66(data, tmp_path, capsys):
    code = _finetune(data, tmp_path / "run", *FAST, "--pairs", "intra", "--session-label", "1")
    assert code == 66 and "two or more sessions" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- labels and Dice


def test_label_maps_are_found_and_give_a_dice_term(data, tmp_path):
    out = tmp_path / "run"
    assert _finetune(data, out, "--steps", "3", "--no-progress", "--threads", "1",
                     "--pairs", "intra", "--participant-label", "01",
                     "--labels", data["labels"], "--dice-weight", "1") == 0
    rows = _log(out)
    assert len(rows) == 3 and all(float(r["dice"]) > 0 for r in rows)
    assert {r["pair_type"] for r in rows} == {"intra"}
    assert _card(out)["finetuning"]["labelled_pairs"] == 2


def test_dice_weight_without_labels_is_a_usage_error(data, tmp_path, capsys):
    assert _finetune(data, tmp_path / "run", *FAST, "--dice-weight", "1") == 64
    assert "--labels" in capsys.readouterr().err


def test_labels_for_no_pair_is_66_before_any_image_is_prepared(data, tmp_path, capsys,
                                                               monkeypatch):
    from regpipe import image_pairs

    monkeypatch.setattr(image_pairs.Preparation, "__init__",
                        lambda *a, **k: pytest.fail("prepared images first"))
    code = _finetune(data, tmp_path / "run", *FAST, "--participant-label", "02", "03",
                     "--labels", data["labels"], "--dice-weight", "1")
    assert code == 66 and "no pair has label maps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pair_source_re_indexes_labels_shared_across_images(tmp_path):
    first, labels_a = _phantom(np.zeros(3))
    second, _ = _phantom(np.ones(3))
    labels_b = np.where(labels_a == 5, 9, labels_a).astype(np.int16)  # 2 and 9 instead of 2, 5
    a, b = _save(first, tmp_path / "a.nii.gz"), _save(second, tmp_path / "b.nii.gz")
    maps = {a: _save(labels_a, tmp_path / "a_dseg.nii.gz"),
            b: _save(labels_b, tmp_path / "b_dseg.nii.gz")}
    source = ImagePairSource([(a, b)], SHAPE[::-1], labels=maps, deformation=STILL)
    assert source.original_ids.tolist() == [0, 2, 5, 9]
    pair = source.draw(SHAPE[::-1], torch.Generator().manual_seed(0))
    assert set(pair.moving_labels.unique().tolist()) == {0, 1, 2}
    assert set(pair.fixed_labels.unique().tolist()) == {0, 1, 3}
    # still deformation, squash grid of the image's own network shape: the map itself
    expected = torch.from_numpy(np.searchsorted([0, 2, 5, 9], labels_a).T.copy())
    assert torch.equal(pair.moving_labels[0, 0], expected)


def test_label_map_on_another_grid_is_refused(tmp_path):
    image, labels = _phantom(np.zeros(3))
    path = _save(image, tmp_path / "a.nii.gz")
    wrong = _save(labels[:, :, :-2], tmp_path / "a_dseg.nii.gz")
    with pytest.raises(InputError, match=r"a_dseg\.nii\.gz is on another voxel grid"):
        ImagePairSource([(path, path)], (16, 16, 16), labels={path: wrong})


def test_label_map_in_another_voxel_order_is_reoriented(tmp_path):
    image, labels = _phantom(np.zeros(3))
    path = _save(image, tmp_path / "a.nii.gz")
    plain = ImagePairSource([(path, path)], SHAPE[::-1], deformation=STILL,
                            labels={path: _save(labels, tmp_path / "a_dseg.nii.gz")})
    flip = np.array([[1, 0, 0, 0], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    flipped = tmp_path / "a_flipped_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels[:, ::-1].copy(), AFFINE @ flip), flipped)
    again = ImagePairSource([(path, path)], SHAPE[::-1], deformation=STILL,
                            labels={path: flipped})
    assert torch.equal(again.label_maps[0], plain.label_maps[0])


# --------------------------------------------------------------------------- preparation


def _biased_ball(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 32^3 ball of one intensity under a strong left-right bias field, and its mask."""
    shape = (32, 32, 32)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    radius = np.linalg.norm((index - 15.5) / 12, axis=-1)
    bias = np.exp(0.8 * (index[..., 0] - 15.5) / 16)
    image = ((radius < 1) * 100 + (radius < 0.4) * 60 + 5) * bias
    path = tmp_path / "biased.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), path)
    return path, (radius < 1) & (radius > 0.5)


def _fixed_volume(source: ImagePairSource) -> np.ndarray:
    return source.images[0].tensor[0, 0].numpy().T


def test_bias_correction_flattens_a_biased_image_and_is_cached(tmp_path, monkeypatch):
    path, shell = _biased_ball(tmp_path)
    cache = tmp_path / "cache"

    def spread(preparation: Preparation | None) -> float:
        source = ImagePairSource([(path, path)], (16, 16, 16), preparation=preparation)
        values = _fixed_volume(source)[shell]
        return float(values.std() / values.mean())

    raw = spread(None)
    corrected = spread(Preparation(bias_correct=True, cache_dir=cache, threads=1))
    assert corrected < 0.8 * raw  # measured 0.19 vs 0.28
    assert len(list(cache.glob("biased_*_n4.nii.gz"))) == 1
    # a second run reads the cache instead of running N4 again
    import regpipe.ants_methods

    monkeypatch.setattr(regpipe.ants_methods, "n4_bias_correct", None)
    assert spread(Preparation(bias_correct=True, cache_dir=cache)) == pytest.approx(corrected)
    # CT is never bias-corrected: without a cache this would call the missing N4
    ImagePairSource([(path, path)], (16, 16, 16), modality="ct",
                    preparation=Preparation(bias_correct=True))


def test_masks_zero_the_outside_even_in_another_voxel_order(tmp_path):
    image, labels = _phantom(np.zeros(3))
    path = _save(image, tmp_path / "a.nii.gz")
    mask = (labels > 0).astype(np.uint8)
    plain = _fixed_volume(ImagePairSource([(path, path)], (16, 16, 16)))
    same = _save(mask, tmp_path / "a_mask.nii.gz")
    masked = _fixed_volume(ImagePairSource([(path, path)], (16, 16, 16),
                                           preparation=Preparation(masks={path: same})))
    assert np.all(masked[mask == 0] == 0) and np.allclose(masked[mask > 0], plain[mask > 0])
    # the same mask stored with its first axis flipped (another voxel order, same voxels)
    flipped_affine = AFFINE @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                        [0, 0, 0, 1]])
    flipped = tmp_path / "a_flipped_mask.nii.gz"
    nib.save(nib.Nifti1Image(mask[::-1].copy(), flipped_affine), flipped)
    again = _fixed_volume(ImagePairSource([(path, path)], (16, 16, 16),
                                          preparation=Preparation(masks={path: flipped})))
    assert np.array_equal(again, masked)
    wrong = _save(mask[:, :, :-2], tmp_path / "a_short_mask.nii.gz")
    with pytest.raises(InputError, match=r"a_short_mask\.nii\.gz is on another voxel grid"):
        ImagePairSource([(path, path)], (16, 16, 16), preparation=Preparation(masks={path: wrong}))


def test_finetuning_prepares_images_like_the_app(data, tmp_path):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--participant-label", "01", "02",
                     "--labels", data["labels"]) == 0
    record = _card(out)["finetuning"]["preprocessing"]
    assert record == {"bias_correct": True, "masked_images": 1}
    assert len(list((out / "preprocessed").glob("*_n4.nii.gz"))) == 4  # 4 images of 01 and 02
    skipped = tmp_path / "no-n4"
    assert _finetune(data, skipped, *FAST, "--participant-label", "01", "02", "--no-n4") == 0
    assert _card(skipped)["finetuning"]["preprocessing"] == {"bias_correct": False,
                                                             "masked_images": 0}
    assert not (skipped / "preprocessed").exists()


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize("mode", ["squash", "isotropic"])
def test_pairs_are_placed_on_the_grid_like_registration(tmp_path, mode):
    from regpipe.imageio import load_image
    from regpipe.preprocess import network_input, normalize_intensity

    path = _save(_phantom(np.zeros(3))[0], tmp_path / "a.nii.gz")
    grid = (12, 16, 20)
    source = ImagePairSource([(path, path)], grid, grid_mode=mode, deformation=STILL,
                             intensity=PLAIN)
    drawn = source.draw(grid, torch.Generator().manual_seed(0)).fixed
    image = load_image(path)
    norm = normalize_intensity(image.data.astype(np.float32), "mri")
    expected = network_input(norm, image.geometry, network_grid(image.geometry, grid, mode), grid)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(drawn, expected, atol=1e-5)


def test_large_images_are_reduced_without_moving_them(tmp_path):
    from regpipe.imageio import load_image
    from regpipe.preprocess import network_input, normalize_intensity

    path = _save(_phantom(np.array([3.0, -2.0, 1.0]))[0], tmp_path / "a.nii.gz")
    grid = (8, 8, 8)  # volumes are kept at <= 16 voxels per axis: this one is reduced
    source = ImagePairSource([(path, path)], grid, grid_mode="isotropic", deformation=STILL,
                             intensity=PLAIN)
    assert source.images[0].tensor.shape[2:] == (16, 16, 16)
    drawn = source.draw(grid, torch.Generator().manual_seed(0)).fixed
    image = load_image(path)
    norm = normalize_intensity(image.data.astype(np.float32), "mri")
    full = network_input(norm, image.geometry, network_grid(image.geometry, grid, "isotropic"),
                         grid)
    assert float(torch.corrcoef(torch.stack([drawn.flatten(), full.flatten()]))[0, 1]) > 0.98

    def centre(volume):  # intensity centre of mass, grid voxels
        index = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"))
        return (index * volume[0]).flatten(1).sum(1) / volume.sum()

    assert torch.allclose(centre(drawn), centre(full), atol=0.1)


def test_affine_init_aligns_the_moving_image_to_the_fixed_one(tmp_path):
    fixed_data, _ = _phantom(np.zeros(3))
    fixed = _save(fixed_data, tmp_path / "fixed.nii.gz")
    moving = _save(np.roll(fixed_data, 2, axis=0), tmp_path / "moving.nii.gz")
    kwargs = {"deformation": STILL, "intensity": PLAIN}
    plain = ImagePairSource([(moving, fixed)], (16, 16, 16), **kwargs)
    aligned = ImagePairSource([(moving, fixed)], (16, 16, 16), affine="ours", **kwargs)

    def error(source):
        pair = source.draw((16, 16, 16), torch.Generator().manual_seed(0))
        return float((pair.moving - pair.fixed).abs().mean())

    assert error(aligned) < 0.1 * error(plain)
    assert np.allclose(aligned.alignment(0, 1)[:3, 3], [4.0, 0, 0], atol=0.3)  # 2 voxels of 2 mm
    assert np.allclose(aligned.alignment(1, 0), np.linalg.inv(aligned.alignment(0, 1)))
    # the matrix does not depend on which direction was asked first (a resumed run, whose
    # cache is empty, must draw what an uninterrupted one draws)
    other = ImagePairSource([(moving, fixed)], (16, 16, 16), affine="ours", **kwargs)
    assert np.array_equal(other.alignment(1, 0), aligned.alignment(1, 0))
    assert np.array_equal(other.alignment(0, 1), aligned.alignment(0, 1))


# -------------------------------------------------------------------------- output, resume, errors


def test_card_records_start_dataset_pairs_and_training(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--pairs", "both") == 0
    printed = capsys.readouterr().out
    assert f"participant --weights {out / 'weights.pt'}" in printed
    card = _card(out)
    sha = hashlib.sha256(Path(data["start"]).read_bytes()).hexdigest()
    assert card["name"] == "tiny-start-finetuned-tiny-study" and card["grid_mode"] == "isotropic"
    record = card["finetuning"]
    assert record["starting_weights"] == "tiny-start"
    assert record["starting_weights_sha256"] == sha and record["dataset"] == "Tiny Study"
    assert (record["subjects"], record["images"], record["pair_type"]) == (3, 5, "both")
    assert card["training"]["steps"] == 2 and "CPU" in card["training"]["hardware"]
    text = (out / "weights.md").read_text()
    for expected in (sha, "Tiny Study", "wall_time_hours", "hardware", "pairs_inter", "lr"):
        assert expected in text
    assert network_from_file(out / "weights.pt").config == TINY


def test_running_again_resumes(data, tmp_path):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--steps", "1") == 0
    assert _finetune(data, out, *FAST, "--steps", "3") == 0
    assert [int(r["step"]) for r in _log(out)] == [1, 2, 3]
    assert _card(out)["training"]["steps"] == 3


def test_a_conditional_finetune_resumes(data, tmp_path):
    from regpipe.networks.conditional import ConditionalRegistrationNetwork, ConditioningConfig

    start = save_weights(ConditionalRegistrationNetwork(TINY, ConditioningConfig("film")),
                         tmp_path / "cond.pt", {"name": "cond", "grid_mode": "isotropic"})
    out = tmp_path / "run"
    argv = [str(data["bids"]), str(out), "--weights", str(start), *FAST]
    assert finetune.main([*argv, "--steps", "1"]) == 0
    assert finetune.main([*argv, "--steps", "2"]) == 0
    assert [int(r["step"]) for r in _log(out)] == [1, 2]


def test_card_keeps_the_starting_files_history_apart(data, tmp_path):
    network = network_from_file(data["start"])
    start = save_weights(network, tmp_path / "avg.pt", {
        "name": "tiny-start", "grid_mode": "isotropic", "model_card": "tiny-start.md",
        "averaged_from": ["step00700.pt", "step00750.pt"], "training": {"steps": 5000}})
    out = tmp_path / "run"
    assert finetune.main([str(data["bids"]), str(out), "--weights", str(start), *FAST]) == 0
    card = _card(out)
    assert "averaged_from" not in card and "model_card" not in card
    starting = card["finetuning"]["starting_card"]
    assert starting["averaged_from"] == ["step00700.pt", "step00750.pt"]
    assert starting["training"] == {"steps": 5000}
    again = tmp_path / "again"  # finetuning the finetuned file on the same data
    assert finetune.main([str(data["bids"]), str(again), "--weights", str(out / "weights.pt"),
                          *FAST]) == 0
    assert _card(again)["name"] == "tiny-start-finetuned-tiny-study"


def test_loss_settings_and_region_default_to_what_the_weights_and_the_app_use(data, tmp_path):
    network = network_from_file(data["start"])
    start = save_weights(network, tmp_path / "s.pt", {
        "name": "s", "grid_mode": "isotropic",
        "training": {"options": {"lncc_sigma": 2.0, "similarity": "lncc2"}}})
    out = tmp_path / "run"
    assert finetune.main([str(data["bids"]), str(out), "--weights", str(start), *FAST]) == 0
    card = _card(out)
    assert card["training"]["options"]["lncc_sigma"] == 2.0
    assert card["training"]["options"]["similarity"] == "lncc2"
    assert card["finetuning"]["region"] == "brain"  # the App's condition for MRI
    assert card["usage"].endswith(f"--weights {out / 'weights.pt'}")
    given = tmp_path / "given"
    assert finetune.main([str(data["bids"]), str(given), "--weights", str(start), *FAST,
                          "--lncc-sigma", "4"]) == 0
    assert _card(given)["training"]["options"]["lncc_sigma"] == 4.0


def _conditional_start(tmp_path: Path, lam_range=(0.3, 6.0)) -> Path:
    from regpipe.networks.conditional import ConditionalRegistrationNetwork, ConditioningConfig

    network = ConditionalRegistrationNetwork(TINY, ConditioningConfig("film", lam_range=lam_range))
    return save_weights(network, tmp_path / "cond.pt", {"name": "cond", "grid_mode": "isotropic"})


def test_the_usage_names_a_region_the_app_would_not_choose(data, tmp_path, capsys):
    start = _conditional_start(tmp_path)
    out = tmp_path / "run"
    assert finetune.main([str(data["bids"]), str(out), "--weights", str(start), *FAST,
                          "--region", "lung"]) == 0
    card = _card(out)
    assert card["finetuning"]["region"] == "thorax"
    # the App's --region auto would condition on brain for these T1w images
    assert card["usage"].endswith(f"--weights {out / 'weights.pt'} --region thorax")
    assert f"--weights {out / 'weights.pt'} --region thorax" in capsys.readouterr().out


def test_a_finetune_records_the_lam_range_it_trained_on(data, tmp_path, capsys):
    start = _conditional_start(tmp_path)
    out = tmp_path / "run"
    argv = [str(data["bids"]), str(out), "--weights", str(start), *FAST]
    assert finetune.main([*argv, "--steps", "1", "--lam-range", "0.01", "100"]) == 0
    finetuned = network_from_file(out / "weights.pt")
    assert finetuned.conditioning.lam_range == (0.01, 100.0)  # what register() clamps to
    assert finetuned.metadata["training"]["options"]["lam_range"] == [0.01, 100.0]
    # resuming without it would train on the starting file's range: refused, naming both
    assert finetune.main([*argv, "--steps", "2"]) == 64
    assert "--lam-range 0.01 100 (this command: 0.3 6)" in capsys.readouterr().err
    assert finetune.main([*argv, "--steps", "2", "--lam-range", "0.01", "100"]) == 0
    assert [int(r["step"]) for r in _log(out)] == [1, 2]


@pytest.mark.parametrize(("conditional", "option", "message"), [
    (False, ["--lam-range", "0.3", "6"], "--lam-range draws lam for a conditional network"),
    (False, ["--region", "lung"], "--region is the condition of a conditional network"),
    (False, ["--trainable", "controller"], "--trainable controller trains a conditional"),
    (True, ["--lam", "3"], "a conditional network draws it from --lam-range"),
])
def test_condition_options_are_refused_where_they_mean_nothing(data, tmp_path, capsys,
                                                               conditional, option, message):
    start = _conditional_start(tmp_path) if conditional else data["start"]
    out = tmp_path / "run"
    assert finetune.main([str(data["bids"]), str(out), "--weights", str(start), *FAST,
                          *option]) == 64
    assert message in capsys.readouterr().err
    assert not out.exists()  # before any image is prepared


@pytest.mark.parametrize(("option", "message"), [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--lr", "0"], "lr must be > 0"),
])
def test_bad_settings_are_64_before_any_work(data, tmp_path, capsys, option, message):
    assert _finetune(data, tmp_path / "run", *FAST, *option) == 64
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_filter_file_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--steps", "1") == 0
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"t1w": {"session": "1"}}))
    assert _finetune(data, out, *FAST, "--steps", "2", "--bids-filter-file", filters) == 64
    assert "bids_filters None -> " in capsys.readouterr().err


def test_weights_inside_the_output_and_training_runs_are_not_taken_over(data, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--steps", "1") == 0
    argv = [str(data["bids"]), str(out), "--weights", str(out / "weights.pt"), *FAST]
    assert finetune.main(argv) == 64 and "inside OUTPUT_DIR" in capsys.readouterr().err
    card = torch.load(out / "checkpoint.pt", weights_only=True)  # a regpipe-train run folder
    card["card"].pop("finetuning")
    torch.save(card, out / "checkpoint.pt")
    assert _finetune(data, out, *FAST, "--steps", "2") == 64
    assert "not a finetuning run" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_73(data, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from regpipe import run_folder

    def full(payload, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_folder.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    assert _finetune(data, tmp_path / "run", *FAST) == 73
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "Traceback" not in err


def test_resuming_with_other_participants_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--steps", "1", "--pairs", "inter") == 0
    assert _finetune(data, out, *FAST, "--steps", "2", "--pairs", "both") == 64
    assert "pair_type 'inter' -> 'both'" in capsys.readouterr().err


def test_resuming_on_a_dataset_that_gained_a_subject_is_refused(data, tmp_path, capsys):
    import shutil

    grown = {**data, "bids": tmp_path / "bids"}
    shutil.copytree(data["bids"], grown["bids"])
    out = tmp_path / "run"
    assert _finetune(grown, out, *FAST, "--steps", "1", "--pairs", "inter") == 0
    first = sorted((grown["bids"]).glob("sub-*"))[0]
    label = first.name[len("sub-"):]
    for path in sorted(first.rglob("*")):  # a new subject: a copy of the first, renamed
        target = grown["bids"] / str(path.relative_to(grown["bids"])).replace(label, "99")
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            shutil.copy(path, target)
    assert _finetune(grown, out, *FAST, "--steps", "2", "--pairs", "inter") == 1
    assert "the dataset changed" in capsys.readouterr().err
    assert [int(r["step"]) for r in _log(out)] == [1]  # nothing trained on the new pairs


def test_output_with_another_configuration_explains(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--steps", "1") == 0
    argv = [str(data["bids"]), str(out), "--weights", str(data["other"]), *FAST]
    assert finetune.main(argv) == 64
    err = capsys.readouterr().err
    assert "another network configuration" in err and "use another OUTPUT_DIR" in err


def test_output_started_from_other_weights_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--steps", "1") == 0
    network = network_from_file(data["start"])
    with torch.no_grad():
        next(network.parameters()).add_(1.0)
    same_shape = save_weights(network, tmp_path / "changed.pt", {"name": "changed"})
    argv = [str(data["bids"]), str(out), "--weights", str(same_shape), *FAST]
    assert finetune.main(argv) == 64 and "started from other weights" in capsys.readouterr().err


def test_missing_registry_weights_is_66_naming_fetch(data, tmp_path, capsys):
    argv = [str(data["bids"]), str(tmp_path / "run"), "--weights", "unigradicon", *FAST]
    assert finetune.main(argv) == 66
    assert "regpipe-weights fetch unigradicon" in capsys.readouterr().err


def test_output_inside_the_dataset_is_64(data, capsys):
    assert _finetune(data, data["bids"] / "model", *FAST) == 64
    assert "inside BIDS_DIR" in capsys.readouterr().err


def test_output_that_cannot_be_created_is_one_line_and_73(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _finetune(data, blocker / "run", *FAST) == 73
    err = capsys.readouterr().err
    assert err.startswith("regpipe-finetune: error:") and "Traceback" not in err


def test_weights_are_required(data, tmp_path):
    assert finetune.main([str(data["bids"]), str(tmp_path / "run")]) == 64


# --------------------------------------------------------------------------- use in the App


def test_finetuned_weights_work_in_the_bids_app_and_the_api(data, tmp_path, monkeypatch):
    from regpipe.bids_app import run as run_module

    import regpipe

    out = tmp_path / "model"
    assert _finetune(data, out, *FAST) == 0
    weights = out / "weights.pt"
    calls: dict = {}

    class Workflow:
        def __init__(self) -> None:
            self.config: dict = {"execution": {}}
            self.base_dir = None

        def run(self, plugin=None, plugin_args=None):
            calls["ran"] = True

    def factory(**kwargs):
        calls.update(kwargs)
        return Workflow()

    monkeypatch.setattr(run_module, "_workflow_factory", lambda: factory)
    monkeypatch.setattr(run_module, "_run", lambda workflow, *args: workflow.run())
    template = data["bids"] / "sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz"
    argv = [str(data["bids"]), str(tmp_path / "out"), "participant", "--template", str(template),
            "--weights", str(weights), "--participant-label", "01", "-w", str(tmp_path / "work")]
    assert run_module.main(argv) == 0 and calls["ran"]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert calls["weights"] == str(weights)
    assert {job["weights_sha256"] for job in calls["jobs"]} == {sha}

    pair = [data["bids"] / f"sub-0{s}/ses-1/anat/sub-0{s}_ses-1_T1w.nii.gz" for s in (1, 2)]
    result = regpipe.register(*pair, weights=str(weights), io_iterations=0)
    assert result.settings["grid_mode"] == "isotropic"
    assert result.settings["grid_shape"] == [17, 17, 17]
    assert result.warped.data.shape == SHAPE


def test_region_takes_the_aliases_the_other_tools_take():
    args = finetune.build_parser().parse_args(["b", "o", "--weights", "w.pt", "--region", "lung"])
    assert args.region == "thorax"
    assert finetune.build_parser().parse_args(["b", "o", "--weights", "w"]).region == "auto"


def test_resuming_with_other_preparation_is_refused_before_preparing(data, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--participant-label", "01", "02", "--no-n4") == 0
    import regpipe.image_pairs

    def no_preparing(*args, **kwargs):
        raise AssertionError("an image was prepared")

    monkeypatch.setattr(regpipe.image_pairs, "_load_placed_image", no_preparing)
    assert _finetune(data, out, *FAST, "--participant-label", "01", "02") == 64
    assert "bias_correct': False" in capsys.readouterr().err
    assert _finetune(data, out, *FAST, "--participant-label", "01", "02", "--no-n4",
                     "--labels", data["labels"]) == 64  # now with sub-01's mask
    assert "masked_images': 0" in capsys.readouterr().err



def test_no_masks_continues_a_run_trained_without_them(data, tmp_path, capsys):
    """A run that used --labels for Dice only (as every run did before masks were used)."""
    out = tmp_path / "run"
    common = [*FAST, "--participant-label", "01", "02", "--no-n4", "--labels", data["labels"]]
    assert _finetune(data, out, *common, "--no-masks") == 0
    assert _finetune(data, out, *common, "--steps", "3") == 64
    assert "masked_images': 0} -> " in capsys.readouterr().err
    assert _finetune(data, out, *common, "--steps", "3", "--no-masks") == 0


def test_a_second_finetune_in_the_folder_stops_before_preparing(data, tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("4242\n")
        other.flush()
        assert _finetune(data, out, *FAST) != 0
    assert "another run (process 4242)" in capsys.readouterr().err
    assert not (out / "preprocessed").exists()


def test_both_kinds_prepare_each_image_once_and_count_paired_masks(data, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="regpipe"):
        assert _finetune(data, out, *FAST, "--pairs", "both", "--participant-label", "01", "02",
                         "--labels", data["labels"]) == 0
    preparing = [r for r in caplog.messages if r.startswith("preparing image")]
    assert len(preparing) == 4  # four images, not once per pair kind
    assert _card(out)["finetuning"]["preprocessing"]["masked_images"] == 1
    intra = tmp_path / "intra"  # sub-01 ses-1 (masked) is in no pair of sub-02 alone
    assert _finetune(data, intra, *FAST, "--pairs", "intra", "--participant-label", "02",
                     "--labels", data["labels"]) == 0
    assert _card(intra)["finetuning"]["preprocessing"]["masked_images"] == 0


def test_budget_counts_image_preparation(data, tmp_path, monkeypatch):
    import regpipe.image_pairs

    original = regpipe.image_pairs._load_placed_image

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(regpipe.image_pairs, "_load_placed_image", slow)
    out = tmp_path / "run"
    assert _finetune(data, out, *FAST, "--steps", "50", "--budget", "1s", "--no-n4") == 0
    assert _card(out)["training"]["steps"] == 0  # 5 images x 0.5 s used the whole budget
