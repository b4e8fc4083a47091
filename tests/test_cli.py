"""Pairwise command-line tools: drop-in options, outputs, and clean failures."""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from regpipe.cli import jacobian as jacobian_cli
from regpipe.cli import register as register_cli
from regpipe.cli import warp as warp_cli
from regpipe.networks import NetworkConfig, build_network, save_weights
from regpipe.spaces import Geometry
from tests.conftest import blob_image, make_affine


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    fixed_geom = Geometry((30, 28, 24), make_affine("RAS", (30, 28, 24)))
    moving_geom = Geometry((30, 28, 24), make_affine("LPS", (30, 28, 24)))
    paths = {}
    for name, geom, seed in (("fixed", fixed_geom, 0), ("moving", moving_geom, 1)):
        paths[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(blob_image(geom, seed), geom.affine), str(paths[name]))
        seg = (blob_image(geom, seed) > 0.4).astype(np.int16) * 7
        paths[f"{name}_seg"] = folder / f"{name}_seg.nii.gz"
        nib.save(nib.Nifti1Image(seg, geom.affine), str(paths[f"{name}_seg"]))
    torch.manual_seed(0)
    network = build_network(NetworkConfig(grid_shape=(40, 40, 40), n_steps=1,
                                          down_channels=(4, 8, 8, 8, 8),
                                          up_channels=(4, 8, 8, 8, 8)))
    paths["weights"] = save_weights(network, folder / "tiny.pt", {"grid_mode": "isotropic"})
    return paths


def base_args(files, out):
    return ["--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--fixed_modality", "mri", "--moving-modality", "mri",
            "--network_weights", str(files["weights"]), "--transform_out", str(out / "fwd.h5")]


def test_register_writes_every_output(files, tmp_path, capsys):
    args = [
        *base_args(files, tmp_path),
        "--io_iterations", "None", "--inverse-transform-out", str(tmp_path / "inv.nii.gz"),
        "--warped_moving_out", str(tmp_path / "warped.nii.gz"),
        "--jacobian_out", str(tmp_path / "jac.nii.gz"), "--metrics_out", str(tmp_path / "m.json"),
        "--fixed_segmentation", str(files["fixed_seg"]),
        "--moving_segmentation", str(files["moving_seg"]), "--quiet",
    ]
    with pytest.warns(DeprecationWarning):  # segmentations as masks, as in unigradicon 1.0.6
        assert register_cli.main(args) == 0
    for name in ("fwd.h5", "inv.nii.gz", "warped.nii.gz", "jac.nii.gz", "m.json"):
        assert (tmp_path / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert "dice_mean" in metrics and metrics["folding_percent"] >= 0
    assert "done in" in capsys.readouterr().err


def test_metrics_file_is_strict_json_when_a_metric_is_undefined(files, tmp_path):
    args = [*base_args(files, tmp_path), "--io_iterations", "None", "--metrics_out",
            str(tmp_path / "m.json"), "--fixed_mask", str(files["fixed_seg"]),
            "--moving_mask", str(files["moving_seg"])]
    for side in ("fixed", "moving"):  # no labels on either side: Dice is undefined
        image = nib.load(str(files[f"{side}_seg"]))
        empty = tmp_path / f"{side}_empty.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine), str(empty))
        args += [f"--{side}_segmentation", str(empty)]
    assert register_cli.main(args) == 0

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    metrics = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)["metrics"]
    assert "dice_mean" in metrics and metrics["dice_mean"] is None


@pytest.mark.parametrize("problem", ["missing", "empty", "4d", "nan", "constant"])
def test_bad_moving_image_fails_without_output(files, tmp_path, capsys, problem):
    bad = tmp_path / "bad.nii.gz"
    if problem == "empty":
        bad.write_bytes(b"")
    elif problem == "4d":
        data = np.random.rand(8, 8, 8, 2).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad))
    elif problem == "nan":
        data = np.random.rand(8, 8, 8).astype(np.float32)
        data[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad))
    elif problem == "constant":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(bad))
    args = base_args(files, tmp_path)
    args[args.index("--moving") + 1] = str(bad)
    assert register_cli.main([*args, "--warped_moving_out", str(tmp_path / "w.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("regpipe-register: error: moving image")
    assert "Traceback" not in err
    left = ["bad.nii.gz"] if problem != "missing" else []
    assert sorted(p.name for p in tmp_path.iterdir()) == left


def test_mask_on_wrong_grid(files, tmp_path, capsys):
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), str(mask))
    args = [*base_args(files, tmp_path), "--fixed_mask", str(mask), "--moving_mask", str(mask),
            "--loss_function_masking"]
    assert register_cli.main(args) == 1
    assert "different grid" in capsys.readouterr().err
    assert not (tmp_path / "fwd.h5").exists()


def test_unknown_modality_is_a_usage_error(files, tmp_path):
    args = base_args(files, tmp_path)
    args[args.index("--fixed_modality") + 1] = "pet"
    with pytest.raises(SystemExit) as exit_info:
        register_cli.main(args)
    assert exit_info.value.code == 2


def test_incompatible_weights(files, tmp_path, capsys):
    bad = tmp_path / "bad.trch"
    state = torch.load(files["weights"], weights_only=True)["state_dict"]
    del state[next(k for k in state if k.endswith("lastConv.bias"))]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, bad)
    args = base_args(files, tmp_path)
    args[args.index("--network_weights") + 1] = str(bad)
    assert register_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "lastConv.bias" in err and "extra.weight" in err
    assert not (tmp_path / "fwd.h5").exists()


def test_missing_output_folder(files, tmp_path, capsys):
    args = base_args(files, tmp_path)
    args[args.index("--transform_out") + 1] = str(tmp_path / "nope" / "fwd.h5")
    assert register_cli.main(args) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "name", "message"), [
    ("--transform_out", "fwd.mat", "affine transforms only"),
    ("--transform_out", "fwd.xyz", "unknown transform file type"),
    ("--inverse_transform_out", "inv.txt", "affine transforms only"),
    ("--warped_moving_out", "warped.mhd", "images are written as"),
    ("--jacobian_out", "jac", "images are written as"),
    ("--warped_moving_out", ".", "is a folder"),
])
def test_bad_output_names_are_refused_before_registering(files, tmp_path, capsys, option, name,
                                                          message, monkeypatch):
    import regpipe.registration

    def never(*args, **kwargs):
        raise AssertionError("registered before checking the outputs")

    monkeypatch.setattr(regpipe.registration, "register", never)
    args = base_args(files, tmp_path)
    target = str(tmp_path if name == "." else tmp_path / name)
    if option in args:
        args[args.index(option) + 1] = target
    else:
        args += [option, target]
    assert register_cli.main(args) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(("option", "clash", "message"), [
    ("--warped_moving_out", "moving", "is the --moving input"),
    ("--transform_out", "fixed", "is the --fixed input"),
    ("--metrics_out", "fixed", "is the --fixed input"),
    ("--jacobian_out", "fixed_seg", "is the --fixed_segmentation input"),
    ("--inverse_transform_out", "fwd.h5",
     "--transform_out and --inverse_transform_out are the same"),
])
def test_outputs_that_are_inputs_or_each_other_are_refused(files, tmp_path, capsys, option,
                                                            clash, message, monkeypatch):
    import shutil

    import regpipe.registration

    monkeypatch.setattr(regpipe.registration, "register", lambda *a, **k: pytest.fail("ran"))
    inputs = {}
    for name in ("fixed", "moving", "fixed_seg"):  # copies: the test may not harm the fixture
        inputs[name] = tmp_path / files[name].name
        shutil.copy(files[name], inputs[name])
    before = {name: path.read_bytes() for name, path in inputs.items()}
    args = ["--fixed", str(inputs["fixed"]), "--moving", str(inputs["moving"]),
            "--fixed_modality", "mri", "--moving_modality", "mri",
            "--network_weights", str(files["weights"]),
            "--transform_out", str(tmp_path / "fwd.h5"),
            "--fixed_segmentation", str(inputs["fixed_seg"])]
    # the same file under another spelling: a detour through a folder and back
    target = tmp_path / "sub" / ".." / (inputs[clash].name if clash in inputs else clash)
    (tmp_path / "sub").mkdir()
    if option in args:
        args[args.index(option) + 1] = str(target)
    else:
        args += [option, str(target)]
    assert register_cli.main(args) == 1
    assert message in capsys.readouterr().err
    assert {name: path.read_bytes() for name, path in inputs.items()} == before


def test_itk_output_of_a_sheared_fixed_grid_is_refused_before_any_work(files, tmp_path, capsys,
                                                                       monkeypatch):
    import regpipe.registration

    monkeypatch.setattr(regpipe.registration, "register", lambda *a, **k: pytest.fail("ran"))
    image = nib.load(str(files["fixed"]))
    affine = image.affine.copy()
    affine[0, 1] += 0.4  # a gantry tilt
    sheared = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), str(sheared))
    args = [*base_args(files, tmp_path), "--warped_moving_out", str(tmp_path / "w.mha")]
    args[args.index("--fixed") + 1] = str(sheared)
    assert register_cli.main(args) == 1
    assert "--warped_moving_out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheared.nii.gz"]
    # regpipe-jacobian: the .mha output is refused before the .nii.gz one is written
    from regpipe.transform_files import write_transform
    from regpipe.transforms import AffineTransform

    write_transform(AffineTransform.identity(), tmp_path / "id.mat")
    assert jacobian_cli.main(["--fixed", str(sheared), "--transform", str(tmp_path / "id.mat"),
                              "--jacob", str(tmp_path / "j.nii.gz"),
                              "--log_jacob", str(tmp_path / "lj.mha")]) == 1
    assert "lj.mha" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.mat", "sheared.nii.gz"]


def test_two_dimensional_file_is_one_clear_line(files, tmp_path, capsys):
    flat = nib.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4))
    flat.set_qform(np.eye(4), code=1)  # both forms coded: checked for agreement after the shape
    flat.set_sform(np.eye(4), code=1)
    nib.save(flat, str(tmp_path / "flat.nii.gz"))
    args = base_args(files, tmp_path)
    args[args.index("--fixed") + 1] = str(tmp_path / "flat.nii.gz")
    assert register_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "flat.nii.gz" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_model_none_registers_without_a_network(files, tmp_path):
    args = ["--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--fixed_modality", "mri", "--moving_modality", "mri", "--model", "none",
            "--io_iterations", "5", "--transform_out", str(tmp_path / "fwd.h5"),
            "--metrics_out", str(tmp_path / "m.json"), "--quiet"]
    assert register_cli.main(args) == 0
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["weights"] is None and settings["io_iterations"] == 5


def test_warp_and_jacobian_refuse_to_overwrite_their_inputs(files, tmp_path, capsys):
    import shutil

    moving = shutil.copy(files["moving"], tmp_path / "m.nii.gz")
    link = tmp_path / "link.nii.gz"
    os.symlink(moving, link)
    before = (tmp_path / "m.nii.gz").read_bytes()
    assert warp_cli.main(["--fixed", str(files["fixed"]), "--moving", str(moving),
                          "--warped_moving_out", str(link), "--linear"]) == 1
    assert "is the --moving input" in capsys.readouterr().err
    assert jacobian_cli.main(["--fixed", str(moving), "--transform", str(files["fixed"]),
                              "--jacob", str(moving)]) == 1
    assert "is the --fixed input" in capsys.readouterr().err
    assert (tmp_path / "m.nii.gz").read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(files, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert warp_cli.main(["--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
                              "--warped_moving_out", str(folder / "w.nii.gz"), "--linear"]) == 1
    finally:
        folder.chmod(0o755)
    assert "not writable" in capsys.readouterr().err


def test_jacobian_mask_is_checked_before_anything_is_written(files, tmp_path, capsys):
    args = [*base_args(files, tmp_path), "--io_iterations", "None", "--quiet"]
    assert register_cli.main(args) == 0
    small = tmp_path / "small_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 12, 12), np.uint8), np.eye(4)), str(small))
    for mask, message in ((small, "different grid"), (tmp_path / "missing.nii.gz", "missing")):
        jacobian = tmp_path / "j.nii.gz"
        assert jacobian_cli.main(["--transform", str(tmp_path / "fwd.h5"),
                                  "--fixed", str(files["fixed"]), "--jacob", str(jacobian),
                                  "--mask", str(mask)]) == 1
        assert message in capsys.readouterr().err.lower() and not jacobian.exists()


def test_warp_and_jacobian_tools(files, tmp_path, capsys):
    args = [*base_args(files, tmp_path), "--io_iterations", "None", "--quiet"]
    assert register_cli.main(args) == 0
    out = tmp_path / "seg_in_fixed.nii.gz"
    assert warp_cli.main(["--fixed", str(files["fixed"]), "--moving", str(files["moving_seg"]),
                          "--transform", str(tmp_path / "fwd.h5"), "--warped_moving_out", str(out),
                          "--nearest_neighbor"]) == 0
    warped = nib.load(str(out))
    assert warped.get_data_dtype() == np.int16
    assert set(np.unique(np.asanyarray(warped.dataobj))) <= {0, 7}
    nrrd = tmp_path / "seg_in_fixed.nrrd"  # what unigradicon-warp can write, we can
    assert warp_cli.main(["--fixed", str(files["fixed"]), "--moving", str(files["moving_seg"]),
                          "--transform", str(tmp_path / "fwd.h5"), "--warped_moving_out",
                          str(nrrd), "--nearest_neighbor"]) == 0
    from regpipe.imageio import load_image

    same = load_image(nrrd)
    assert same.data.dtype == np.int16 and np.array_equal(same.data, np.asanyarray(warped.dataobj))
    assert np.allclose(same.geometry.affine, warped.affine, atol=1e-5)
    capsys.readouterr()
    assert jacobian_cli.main(["--transform", str(tmp_path / "fwd.h5"),
                              "--fixed", str(files["fixed"]),
                              "--jacob", str(tmp_path / "j.nii.gz"),
                              "--log_jacob", str(tmp_path / "lj.nii.gz")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["min_jacobian"] > 0
    assert (tmp_path / "lj.nii.gz").exists()
    # --fixed gives only the grid: an all-zero image on it does as well as the image
    blank = tmp_path / "blank.nii.gz"
    fixed = nib.load(str(files["fixed"]))
    nib.save(nib.Nifti1Image(np.zeros(fixed.shape, np.float32), fixed.affine), str(blank))
    assert jacobian_cli.main(["--transform", str(tmp_path / "fwd.h5"), "--fixed", str(blank),
                              "--jacob", str(tmp_path / "j2.nii.gz")]) == 0
    assert json.loads(capsys.readouterr().out) == stats


def test_warp_needs_an_interpolator(files, tmp_path):
    with pytest.raises(SystemExit):
        warp_cli.main(["--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
                       "--warped_moving_out", str(tmp_path / "w.nii.gz")])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--intensity_conservation_loss", "--io_method", "network"], "only supported for CT"),
        (["--dice_loss_weight", "1", "--io_method", "network"], "needs both --fixed_segmentation"),
        (["--dice_loss_weight", "-1"], "must be >= 0"),
    ],
)
def test_reference_loss_options_are_validated(files, tmp_path, capsys, option, message):
    assert register_cli.main(base_args(files, tmp_path) + option) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "fwd.h5").exists()


def ct_args_with_segmentations(files, out):
    args = [*base_args(files, out), "--fixed_segmentation", str(files["fixed_seg"]),
            "--moving_segmentation", str(files["moving_seg"])]
    args[args.index("--fixed_modality") + 1] = "ct"
    args[args.index("--moving-modality") + 1] = "ct"
    return args


@pytest.mark.parametrize("option",
                         [["--intensity_conservation_loss"], ["--dice_loss_weight", "1"]])
def test_reference_losses_with_fast_method_are_refused(files, tmp_path, capsys, option):
    assert register_cli.main(ct_args_with_segmentations(files, tmp_path) + option) == 1
    assert "use --io_method network" in capsys.readouterr().err
    assert not (tmp_path / "fwd.h5").exists()


def test_reference_io_options_without_io_are_accepted_silently(files, tmp_path, caplog):
    """unigradicon-register runs them with --io_iterations None (they only act in IO)."""
    args = [*ct_args_with_segmentations(files, tmp_path), "--dice_loss_weight", "1",
            "--intensity_conservation_loss", "--io_sim", "lncc2", "--io_iterations", "None",
            "--quiet"]
    assert register_cli.main(args) == 0
    assert "--io_sim and --io_lr" not in caplog.text
    assert (tmp_path / "fwd.h5").stat().st_size > 0


def test_ct_pair_with_both_reference_losses_runs(files, tmp_path):
    args = [
        *ct_args_with_segmentations(files, tmp_path),
        "--dice_loss_weight", "0.5", "--intensity_conservation_loss", "--io_method", "network",
        "--io_iterations", "2", "--affine", "none", "--metrics_out", str(tmp_path / "m.json"),
        "--quiet",
    ]
    assert register_cli.main(args) == 0
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["intensity_conservation"] is True and settings["dice_loss_weight"] == 0.5
    assert (tmp_path / "fwd.h5").stat().st_size > 0


def test_unigradicon_io_options_with_fast_io_run_with_a_warning(files, tmp_path, caplog):
    """A unigradicon-register script passing its own --io_lr/--io_sim keeps working."""
    args = [*base_args(files, tmp_path), "--io_iterations", "2", "--io_lr", "0.00002",
            "--io_sim", "lncc2", "--metrics_out", str(tmp_path / "m.json"), "--quiet"]
    assert register_cli.main(args) == 0
    assert "--io_sim and --io_lr set uniGradICON's network instance optimisation" in caplog.text
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["io_method"] == "fast" and settings["io_sim"] == "lncc"


def test_io_grid_caps_the_optimisation_grid(files, tmp_path):
    args = [
        *base_args(files, tmp_path),
        "--io_iterations", "2", "--io_grid", "20", "--metrics_out", str(tmp_path / "m.json"),
        "--quiet",
    ]
    assert register_cli.main(args) == 0
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["io_grid"] == 20 and max(settings["grid_shape"]) == 20


def test_mixed_precision_option_reaches_the_registration(files, tmp_path, caplog):
    args = [
        *base_args(files, tmp_path),
        "--mixed-precision", "--device", "cpu", "--metrics_out", str(tmp_path / "m.json"),
    ]
    with caplog.at_level(logging.INFO, logger="regpipe"):
        assert register_cli.main(args) == 0
    assert "mixed precision applies on CUDA only" in caplog.text
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["mixed_precision"] is False  # asked for, but on the CPU: float32


def test_no_symmetric_gives_the_single_pass_of_unigradicon(files, tmp_path):
    for option, expected in (([], True), (["--no-symmetric"], False)):
        args = [*base_args(files, tmp_path), "--io_iterations", "None", "--metrics_out",
                str(tmp_path / "m.json"), "--quiet", *option]
        assert register_cli.main(args) == 0
        settings = json.loads((tmp_path / "m.json").read_text())["settings"]
        assert settings["symmetric"] is expected


def test_network_passes_option(files, tmp_path):
    for option, expected in (([], 1), (["--network_passes", "2"], 2),
                             (["--network-passes", "3"], 3)):
        args = [*base_args(files, tmp_path), "--io_iterations", "None", "--metrics_out",
                str(tmp_path / "m.json"), "--quiet", *option]
        assert register_cli.main(args) == 0
        settings = json.loads((tmp_path / "m.json").read_text())["settings"]
        assert settings["network_passes"] == expected
    args = [*base_args(files, tmp_path), "--network_passes", "0", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        register_cli.main(args)
    assert exit_info.value.code == 2
