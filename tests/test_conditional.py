"""Conditional (controllable) registration: condition vector, controller, files, training,
command lines, BIDS App options and sidecars. Tiny networks only (seconds on a CPU)."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
from nipype.interfaces.base import isdefined

import regpipe
from regpipe.errors import InputError, WeightsError
from regpipe.imageio import Image, save_image
from regpipe.losses import gradicon_objective
from regpipe.networks import (
    CONDITION_SIZE,
    Condition,
    ConditionalRegistrationNetwork,
    ConditioningConfig,
    NetworkConfig,
    RegistrationNetwork,
    build_network,
    is_conditional_file,
    load_weights,
    network_from_file,
    save_weights,
)
from regpipe.spaces import Geometry
from regpipe.training import TrainingOptions, train
from regpipe.training_data import REGIONS as TRAINING_REGIONS
from regpipe.training_data import RandomShapesSource, TrainingPair
from tests.conftest import blob_image, make_affine

TINY = NetworkConfig((33, 33, 33), 2, (4, 8, 8), (4, 8, 8))
MODES = ("film", "dynamic")
TINY_ARGS = ["--grid", "33", "--unets", "1", "--down-channels", "4,8,8", "--up-channels", "4,8,8",
             "--no-progress"]


def _base(seed: int = 0) -> RegistrationNetwork:
    """A tiny base network whose flow heads are not zero (so the output is not the identity)."""
    torch.manual_seed(seed)
    network = build_network(TINY)
    with torch.no_grad():
        for unet in network.unets():
            unet.lastConv.weight.normal_(0.0, 0.02)
    return network.eval()


def _perturb(network: ConditionalRegistrationNetwork) -> ConditionalRegistrationNetwork:
    with torch.no_grad():
        for head in network.controller.heads:
            head.weight.normal_(0.0, 0.05)
    return network


def _images(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 1, *TINY.grid_shape)
    return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)


# ----------------------------------------------------------------------------- condition


def test_condition_vector_is_one_hot_region_type_and_log_lam():
    vector = Condition("thorax", "intra", 15.0).vector()
    assert vector.shape == (CONDITION_SIZE,) == (10,)
    assert vector[:7].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert vector[7:9].tolist() == [0, 1]
    assert vector[9].item() == pytest.approx(1.0)  # log(15 / 1.5) / log(10)
    assert Condition().vector()[9].item() == 0.0  # lam 1.5 is the centre


def test_region_aliases_name_the_canonical_regions():
    assert Condition("lung").region == "thorax"
    assert Condition("Head-Neck").region == "head_neck"
    assert Condition("prostate").region == "pelvis"


def test_unknown_region_is_refused_with_the_choices():
    with pytest.raises(InputError, match=r"unknown region 'liver'.*brain, head_neck"):
        Condition("liver")


@pytest.mark.parametrize("kwargs", [{"pair_type": "both"}, {"lam": 0.0}, {"lam": math.nan},
                                    {"lam": -1.0}, {"lam": "smooth"}])
def test_invalid_pair_type_or_lam_is_refused(kwargs):
    with pytest.raises(InputError):
        Condition("brain", **kwargs)


def test_condition_regions_are_the_training_regions():
    assert tuple(TRAINING_REGIONS) == regpipe.networks.REGIONS


def test_unknown_conditioning_mode_is_refused():
    with pytest.raises(InputError, match="film or dynamic"):
        ConditioningConfig("prompt")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("mode", MODES)
def test_untrained_conditional_network_reproduces_the_base_network(mode):
    base = _base()
    network = ConditionalRegistrationNetwork.from_base(base, mode).eval()
    moving, fixed = _images(batch=2)
    conditions = [Condition("brain", "intra", 6.0), Condition("knee", "inter", 0.3)]
    with torch.no_grad():
        expected = base.displacement(moving, fixed)
        assert expected.abs().max() > 0
        assert torch.equal(network.displacement(moving, fixed, conditions), expected)
        assert torch.equal(network.displacement(moving, fixed), expected)  # default condition


@pytest.mark.parametrize("mode", MODES)
def test_the_condition_changes_the_prediction_per_sample(mode):
    network = _perturb(ConditionalRegistrationNetwork.from_base(_base(), mode)).eval()
    moving, fixed = _images(batch=2)
    brain, knee = Condition("brain", "intra", 6.0), Condition("knee", "inter", 0.3)
    with torch.no_grad():
        both = network.displacement(moving, fixed, [brain, knee])
        first = network.displacement(moving[:1], fixed[:1], brain)
        second = network.displacement(moving[1:], fixed[1:], knee)
        other = network.displacement(moving[:1], fixed[:1], knee)
    assert torch.allclose(both[:1], first, atol=1e-6)
    assert torch.allclose(both[1:], second, atol=1e-6)
    assert (first - other).abs().max() > 1e-4


def test_a_wrong_number_of_conditions_is_refused():
    network = ConditionalRegistrationNetwork.from_base(_base(), "film")
    moving, fixed = _images(batch=3)
    with pytest.raises(InputError, match="2 conditions for a batch of 3"):
        network.map(moving, fixed, [Condition(), Condition()])


def test_conditioned_restores_the_previous_condition():
    network = ConditionalRegistrationNetwork.from_base(_base(), "dynamic")
    network.set_condition(Condition("pelvis"))
    with network.conditioned([Condition("brain")]):
        assert network.condition == (Condition("brain"),)
    assert network.condition == (Condition("pelvis"),)


@pytest.mark.parametrize("mode", MODES)
def test_gradicon_objective_follows_the_set_condition(mode):
    network = _perturb(ConditionalRegistrationNetwork.from_base(_base(), mode)).eval()
    moving, fixed = _images()
    losses = []
    for condition in (Condition("brain", lam=0.3), Condition("abdomen", lam=6.0)):
        with torch.no_grad(), network.conditioned(condition):
            losses.append(gradicon_objective(network, moving, fixed, "lncc", 1.5).all_loss.item())
    assert losses[0] != losses[1]


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("mode", MODES)
def test_conditional_weights_round_trip(tmp_path, mode):
    network = _perturb(ConditionalRegistrationNetwork.from_base(
        _base(), ConditioningConfig(mode, hidden=16, lam_range=(0.3, 6.0)))).eval()
    path = save_weights(network, tmp_path / "cond.pt", {"name": "cond"})
    loaded = network_from_file(path)
    assert isinstance(loaded, ConditionalRegistrationNetwork)
    assert loaded.conditioning == network.conditioning and loaded.config == TINY
    assert loaded.metadata["name"] == "cond" and is_conditional_file(path)
    moving, fixed = _images()
    condition = Condition("head_neck", "intra", 2.0)
    with torch.no_grad():
        assert torch.equal(loaded.displacement(moving, fixed, condition),
                           network.displacement(moving, fixed, condition))
    payload = torch.load(path, weights_only=True)
    assert set(payload["state_dict"]) == set(build_network(TINY).regis_net.state_dict())


def test_unconditional_files_still_load_as_plain_networks(tmp_path):
    base = _base()
    path = save_weights(base, tmp_path / "plain.pt")
    torch.save(base.regis_net.state_dict(), tmp_path / "bare.trch")  # official layout
    assert not is_conditional_file(path)
    assert type(network_from_file(path)) is RegistrationNetwork
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"state_dict", "config", "card"}  # the format is unchanged


def test_warm_start_from_unconditional_weights_is_strict_and_neutral(tmp_path):
    base = _base()
    path = save_weights(base, tmp_path / "plain.pt")
    network = ConditionalRegistrationNetwork(TINY, ConditioningConfig("dynamic"))
    load_weights(network, path)
    for key, value in base.regis_net.state_dict().items():
        assert torch.equal(network.regis_net.state_dict()[key], value), key
    moving, fixed = _images()
    with torch.no_grad():
        assert torch.equal(network.eval().displacement(moving, fixed, Condition("brain")),
                           base.displacement(moving, fixed))


def test_conditional_file_is_refused_by_a_plain_or_other_mode_network(tmp_path):
    path = save_weights(ConditionalRegistrationNetwork.from_base(_base(), "film"),
                        tmp_path / "film.pt")
    with pytest.raises(WeightsError, match="conditional"):
        load_weights(build_network(TINY), path)
    with pytest.raises(WeightsError, match=r"film.*dynamic"):
        load_weights(ConditionalRegistrationNetwork(TINY, ConditioningConfig("dynamic")), path)


def test_a_conditional_networks_bare_state_dict_says_how_to_save_it(tmp_path):
    network = ConditionalRegistrationNetwork.from_base(_base(), "film")
    torch.save(network.state_dict(), tmp_path / "bare.pt")  # no conditioning in the file
    with pytest.raises(WeightsError, match=r"bare state dict of a conditional network.*"
                                           r"save_weights"):
        network_from_file(tmp_path / "bare.pt")


# ----------------------------------------------------------------------------- training


class _LabelledPairs:
    """Pairs whose region and type cycle through a fixed list."""

    name, region = "cycle", "mixed"
    kinds = (("brain", "inter"), ("knee", "intra"), ("thorax", "inter"))

    def __init__(self):
        self.count = 0
        self.shapes = RandomShapesSource()

    def draw(self, shape, generator):
        pair = self.shapes.draw(shape, generator)
        region, pair_type = self.kinds[self.count % len(self.kinds)]
        self.count += 1
        return TrainingPair(pair.moving, pair.fixed, pair_type, region)


def _logged_lams(path) -> list[float]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [float(row["lam"]) for row in csv.DictReader(handle)]


def test_training_sets_each_pairs_condition_and_the_drawn_lam(tmp_path):
    torch.manual_seed(0)
    network = ConditionalRegistrationNetwork(TINY, ConditioningConfig("film", hidden=8))
    seen: list[tuple[Condition, ...]] = []
    network.controller.register_forward_hook(lambda *_: seen.append(network.condition))
    options = TrainingOptions(steps=2, batch_size=2, lam_range=(0.5, 4.0), progress=False)
    train(network, _LabelledPairs(), tmp_path, options)
    # two objective maps per step (A->B and B->A), each with one condition per pair
    assert len(seen) == 4
    first, second = seen[0], seen[2]
    assert [(c.region, c.pair_type) for c in first + second] == [
        ("brain", "inter"), ("knee", "intra"), ("thorax", "inter"), ("brain", "inter")]
    lams = _logged_lams(tmp_path / "log.csv")
    assert [c.lam for c in first] == pytest.approx([lams[0]] * 2, rel=1e-3)
    assert all(0.5 <= c.lam <= 4.0 for c in first + second)
    assert network.controller.heads[0].weight.abs().sum() > 0  # the controller was trained


def test_controller_only_training_leaves_the_base_network_as_it_was(tmp_path):
    torch.manual_seed(0)
    network = ConditionalRegistrationNetwork.from_base(_base(),
                                                       ConditioningConfig("film", hidden=8))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    options = TrainingOptions(steps=2, lam_range=(0.5, 4.0), progress=False, lr=1e-2,
                              trainable="controller")
    train(network, _LabelledPairs(), tmp_path, options)
    after = network.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("controller.") for k in changed)  # BN statistics too
    assert all(p.requires_grad for p in network.parameters())  # unfrozen afterwards
    with pytest.raises(InputError, match="conditional"):
        train(_base(), _LabelledPairs(), tmp_path / "plain", options)


def test_conditional_run_resumes_with_its_controller(tmp_path):
    def run(folder, steps):
        torch.manual_seed(0)
        network = ConditionalRegistrationNetwork(TINY, ConditioningConfig("dynamic", hidden=8))
        options = TrainingOptions(steps=steps, lam_range=(0.5, 4.0), progress=False,
                                  checkpoint_every=1)
        train(network, RandomShapesSource(), folder, options)
        return network

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 3)
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                           strict=True):
        assert torch.allclose(a, b, atol=1e-6), key
    assert isinstance(network_from_file(tmp_path / "split" / "weights.pt"),
                      ConditionalRegistrationNetwork)


def test_cli_trains_a_conditional_network_from_plain_weights(tmp_path, capsys):
    from regpipe.cli.train import main

    assert main([str(tmp_path / "plain"), "--steps", "1", *TINY_ARGS]) == 0
    args = [str(tmp_path / "cond"), "--init", str(tmp_path / "plain" / "weights.pt"),
            "--conditional", "dynamic", "--lam-range", "0.5", "2", "--steps", "2",
            "--no-progress"]
    assert main(args) == 0
    network = network_from_file(tmp_path / "cond" / "weights.pt")
    assert isinstance(network, ConditionalRegistrationNetwork)
    assert network.conditioning.mode == "dynamic"
    assert network.conditioning.lam_range == (0.5, 2.0)
    assert network.metadata["conditioning"]["mode"] == "dynamic"
    lams = _logged_lams(tmp_path / "cond" / "log.csv")
    assert len(lams) == 2 and all(0.5 <= v <= 2.0 for v in lams)


def test_cli_refuses_a_mode_change_of_conditional_init(tmp_path, capsys):
    from regpipe.cli.train import main

    assert main([str(tmp_path / "a"), "--steps", "1", "--conditional", "film", *TINY_ARGS]) == 0
    code = main([str(tmp_path / "b"), "--init", str(tmp_path / "a" / "weights.pt"),
                 "--conditional", "dynamic", "--steps", "1", "--no-progress"])
    assert code == 1 and "film conditional network, not dynamic" in capsys.readouterr().err


def test_cli_continues_a_conditional_file_with_its_range_and_controller(tmp_path):
    from regpipe.cli.train import main

    network = ConditionalRegistrationNetwork.from_base(
        build_network(NetworkConfig((33, 33, 33), 1, (4, 8, 8), (4, 8, 8))),
        ConditioningConfig("film", hidden=16, lam_range=(0.1, 20.0)))
    start = save_weights(network, tmp_path / "start.pt", {"name": "start"})
    assert main([str(tmp_path / "run"), "--init", str(start), "--steps", "1",
                 "--no-progress"]) == 0
    continued = network_from_file(tmp_path / "run" / "weights.pt")
    assert continued.conditioning.hidden == 16
    assert continued.conditioning.lam_range == (0.1, 20.0)


@pytest.mark.parametrize("options, message", [
    (["--conditional", "film", "--lam", "4"], "draws it from --lam-range"),
    (["--lam-range", "0.3", "6"], "--lam-range draws lam for a conditional network"),
    (["--trainable", "controller"], "needs a conditional network"),
    (["--conditional", "film", "--lam-range", "0.3", "inf"], "finite"),
    (["--region", "liver"], "unknown region"),
])
def test_cli_refuses_conflicting_condition_options_before_training(tmp_path, capsys, options,
                                                                   message):
    from regpipe.cli.train import main

    assert main([str(tmp_path / "run"), "--steps", "1", "--no-progress", *TINY_ARGS,
                 "--label-maps", str(tmp_path), *options]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.csv").exists()


def test_conditional_recipe_is_valid_json_with_a_warm_start():
    from pathlib import Path

    recipe = json.loads((Path(__file__).parents[1] / "training" / "conditional.json").read_text())
    assert recipe["conditional"] in MODES and recipe["init"].endswith("regpipe-compact.pt")
    assert 0 < recipe["lam_range"][0] < recipe["lam_range"][1]
    assert {s.get("region", "other") for s in recipe["sources"]} <= set(TRAINING_REGIONS)


# ----------------------------------------------------------------------------- registration


@pytest.fixture(scope="module")
def images():
    geometry = Geometry((30, 28, 26), make_affine("RAS", (30, 28, 26)))
    fixed = Image(blob_image(geometry, 0), geometry)
    moving = Image(np.roll(blob_image(geometry, 1), 2, axis=0), geometry)
    return fixed, moving


@pytest.fixture(scope="module")
def conditional_file(tmp_path_factory):
    network = _perturb(ConditionalRegistrationNetwork.from_base(
        _base(), ConditioningConfig("film", hidden=8, lam_range=(0.3, 6.0))))
    return save_weights(network, tmp_path_factory.mktemp("w") / "cond.pt", {"name": "cond"})


def test_register_records_the_condition(images, conditional_file):
    fixed, moving = images
    result = regpipe.register(fixed, moving, weights=str(conditional_file), affine="none",
                              region="lung", pair_type="intra", smoothness=3.0, evaluate=False)
    assert result.settings["condition"] == {"region": "thorax", "pair_type": "intra", "lam": 3.0}
    default = regpipe.register(fixed, moving, weights=str(conditional_file), affine="none",
                               evaluate=False)
    assert default.settings["condition"] == {"region": "other", "pair_type": "inter", "lam": 1.5}
    field = result.forward_field().field
    assert not np.allclose(field, default.forward_field().field)


def test_smoothness_outside_the_trained_range_is_clamped_and_recorded(images, conditional_file,
                                                                     caplog):
    fixed, moving = images
    edge = regpipe.register(fixed, moving, weights=str(conditional_file), affine="none",
                            smoothness=6.0, evaluate=False)
    with caplog.at_level("WARNING", logger="regpipe"):
        beyond = regpipe.register(fixed, moving, weights=str(conditional_file), affine="none",
                                  smoothness=1e6, evaluate=False)
    assert "outside the range the network was trained on (0.3 to 6): using 6" in caplog.text
    assert beyond.settings["condition"] == {"region": "other", "pair_type": "inter",
                                            "lam": 6.0, "lam_requested": 1e6}
    assert np.array_equal(beyond.forward_field().field, edge.forward_field().field)
    low = regpipe.register(fixed, moving, weights=str(conditional_file), affine="none",
                           smoothness=0.01, evaluate=False)
    assert low.settings["condition"]["lam"] == 0.3
    with pytest.raises(InputError, match="unknown region"):
        regpipe.register(fixed, moving, weights=str(conditional_file), affine="none", region="")


def test_network_instance_optimisation_uses_the_conditions_lam(images, conditional_file,
                                                              monkeypatch):
    from regpipe import instance_opt

    seen = []
    original = instance_opt.optimise_network_weights

    def spy(*args, **kwargs):
        seen.append(kwargs["lam"])
        return original(*args, **kwargs)

    monkeypatch.setattr(instance_opt, "optimise_network_weights", spy)
    fixed, moving = images
    for smoothness in (0.5, 4.0):
        regpipe.register(fixed, moving, weights=str(conditional_file), affine="none",
                         smoothness=smoothness, io_method="network", io_iterations=1,
                         evaluate=False, progress=False)
    regpipe.register(fixed, moving, weights=_base(), affine="none", io_method="network",
                     io_iterations=1, evaluate=False, progress=False)
    assert seen == [0.5, 4.0, 1.5]


def test_register_refuses_a_condition_for_an_unconditional_network(images):
    fixed, moving = images
    with pytest.raises(InputError, match="these options steer a conditional network"):
        regpipe.register(fixed, moving, weights=_base(), affine="none", smoothness=2.0)
    plain = regpipe.register(fixed, moving, weights=_base(), affine="none", evaluate=False)
    assert plain.settings["condition"] is None


def test_register_cli_passes_the_condition(images, conditional_file, tmp_path, capsys):
    from regpipe.cli.register import main

    fixed, moving = images
    save_image(fixed, tmp_path / "f.nii.gz")
    save_image(moving, tmp_path / "m.nii.gz")
    code = main(["--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                 "--fixed_modality", "mri", "--moving_modality", "mri",
                 "--transform_out", str(tmp_path / "t.h5"), "--io_iterations", "None",
                 "--affine", "none", "--network_weights", str(conditional_file),
                 "--region", "brain", "--pair-type", "intra", "--smoothness", "0.5",
                 "--metrics_out", str(tmp_path / "m.json"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["condition"] == {"region": "brain", "pair_type": "intra", "lam": 0.5}


def test_register_cli_pair_type_ignores_case():
    from regpipe.cli.register import build_parser

    args = build_parser().parse_args(["--fixed", "f", "--moving", "m", "--fixed_modality",
                                      "mri", "--moving_modality", "mri", "--transform_out",
                                      "t.h5", "--pair-type", "Intra"])
    assert args.pair_type == "intra"


@pytest.mark.parametrize("option", [["--region", "liver"], ["--smoothness", "-1"],
                                    ["--pair-type", "both"]])
def test_register_cli_rejects_a_bad_condition(option, capsys):
    from regpipe.cli.register import build_parser

    base = ["--fixed", "f", "--moving", "m", "--fixed_modality", "mri", "--moving_modality",
            "mri", "--transform_out", "t.h5"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + option)


# ----------------------------------------------------------------------------- BIDS App


def test_sidecars_record_the_condition(images, conditional_file, tmp_path):
    from regpipe.workflows.steps import network_registration, write_derivative

    fixed, moving = images
    save_image(fixed, tmp_path / "f.nii.gz")
    save_image(moving, tmp_path / "m.nii.gz")
    out = tmp_path / "node"
    out.mkdir()
    paths = network_registration(
        str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), str(out),
        weights=str(conditional_file), affine_init="none", region="brain", pair_type="intra",
        smoothness=6.0, smoothness_requested=50.0, network_passes=2)
    written = write_derivative(paths["forward_xfm"], str(tmp_path / "sub-01_xfm.h5"), {},
                               paths["reg_metrics"])
    sidecar = json.loads((tmp_path / "sub-01_xfm.json").read_text())
    assert sidecar["GeneratedBy"][0]["Condition"] == {
        "region": "brain", "pair_type": "intra", "lam": 6.0, "lam_requested": 50.0}
    assert sidecar["GeneratedBy"][0]["NetworkPasses"] == 2
    assert written


def test_job_condition_derives_region_and_type():
    from regpipe.workflows.jobs import RegistrationOptions, job_condition

    options = RegistrationOptions(conditional=True)
    assert job_condition({"modality": "mri", "pair_type": "inter"}, options) == {
        "region": "brain", "pair_type": "inter", "smoothness": None}
    ct_condition = job_condition({"modality": "ct", "pair_type": "intra"}, options)
    assert ct_condition["region"] == "head_neck"
    chosen = RegistrationOptions(conditional=True, region="knee", smoothness=3.0)
    assert job_condition({"modality": "mri", "pair_type": "intra"}, chosen) == {
        "region": "knee", "pair_type": "intra", "smoothness": 3.0}


def test_network_workflow_carries_the_condition():
    from regpipe.workflows.registration import init_network_reg_wf

    workflow = init_network_reg_wf(weights=None, condition={
        "region": "brain", "pair_type": "intra", "smoothness": None})
    inputs = workflow.get_node("network_reg").inputs
    assert inputs.region == "brain" and inputs.pair_type == "intra"


def test_bids_app_parses_region_and_smoothness():
    from regpipe.bids_app.exit_codes import UsageError
    from regpipe.bids_app.parser import parse_args

    args = parse_args(["/d", "/o", "participant", "--region", "lung", "--smoothness", "3"])
    assert args.region == "thorax" and args.smoothness == 3.0
    assert parse_args(["/d", "/o", "participant"]).region == "auto"
    with pytest.raises(UsageError):
        parse_args(["/d", "/o", "participant", "--smoothness", "0"])
    with pytest.raises(UsageError):
        parse_args(["/d", "/o", "participant", "--region", "liver"])


def test_bids_app_refuses_a_condition_for_unconditional_weights(conditional_file, tmp_path,
                                                               caplog):
    from regpipe.bids_app.exit_codes import UsageError
    from regpipe.bids_app.run import _check_condition_options

    plain = save_weights(_base(), tmp_path / "plain.pt")
    args = argparse.Namespace(region="auto", smoothness=2.0, weights="plain.pt",
                              mode="template", suffix="T1w", network_passes=1)
    with pytest.raises(UsageError, match="not conditional"):
        _check_condition_options(args, str(plain))
    with pytest.raises(UsageError):
        _check_condition_options(args, None)
    with caplog.at_level("INFO", logger="regpipe"):
        _check_condition_options(args, str(conditional_file))  # accepted
    assert "region auto: brain, pair type inter" in caplog.text
    assert "outside the range" not in caplog.text
    args.smoothness = 50.0
    with caplog.at_level("WARNING", logger="regpipe"):
        _check_condition_options(args, str(conditional_file))
    assert "(0.3 to 6): every registration will use 6" in caplog.text
    _check_condition_options(argparse.Namespace(region="auto", smoothness=None,
                                                weights="plain.pt", mode="template",
                                                suffix="T1w", network_passes=2), str(plain))


def _job(tmp_path, pair_type: str, modality: str = "mri") -> dict:
    moving = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    fixed = tmp_path / "tpl" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
    for path in (moving, fixed):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return {
        "subject": "01", "session": None, "moving": str(moving),
        "entities": {"subject": "01", "suffix": "T1w", "datatype": "anat",
                     "extension": ".nii.gz"},
        "suffix": "T1w", "modality": modality, "fixed": str(fixed),
        "fixed_space": "MNI152NLin2009cAsym", "pair_type": pair_type, "fixed_mask": None,
        "moving_mask": None, "fixed_labels": None, "moving_labels": None,
        "source_uri": "bids:raw:sub-01/anat/sub-01_T1w.nii.gz", "weights_sha256": None,
    }


def _network_nodes(workflow) -> list:
    return [node for node in workflow._get_all_nodes() if node.name == "network_reg"]


def test_participant_workflow_gives_the_network_each_jobs_condition(tmp_path, conditional_file):
    from regpipe.workflows.base import init_regpipe_wf

    common = {"output_dir": tmp_path / "out", "work_dir": tmp_path / "work",
              "methods": ["network"], "io_iterations": 0, "affine_init": "none",
              "device": "cpu", "omp_nthreads": 1, "seed": 0, "reports": False}
    workflow = init_regpipe_wf(jobs=[_job(tmp_path, "intra", "ct")],
                               weights=str(conditional_file), smoothness=2.5, **common)
    (node,) = _network_nodes(workflow)
    assert (node.inputs.region, node.inputs.pair_type, node.inputs.smoothness) == (
        "head_neck", "intra", 2.5)
    assert not isdefined(node.inputs.smoothness_requested)
    # outside the trained range (0.3 to 6): clamped once, here, not warned about per job
    workflow = init_regpipe_wf(jobs=[_job(tmp_path, "intra", "ct")],
                               weights=str(conditional_file), smoothness=50.0, **common)
    (node,) = _network_nodes(workflow)
    assert (node.inputs.smoothness, node.inputs.smoothness_requested) == (6.0, 50.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):  # refused, not clamped
        with pytest.raises(InputError, match="positive and finite"):
            init_regpipe_wf(jobs=[_job(tmp_path, "intra")], weights=str(conditional_file),
                            smoothness=bad, **common)
    plain = save_weights(_base(), tmp_path / "plain.pt")
    workflow = init_regpipe_wf(jobs=[_job(tmp_path, "inter")], weights=str(plain), **common)
    (node,) = _network_nodes(workflow)
    assert not isdefined(node.inputs.region)
    assert node.inputs.mixed_precision is False
    workflow = init_regpipe_wf(jobs=[_job(tmp_path, "inter")], weights=str(plain),
                               mixed_precision=True, **common)
    (node,) = _network_nodes(workflow)
    assert node.inputs.mixed_precision is True and node.inputs.network_passes == 1
    workflow = init_regpipe_wf(jobs=[_job(tmp_path, "inter")], weights=str(plain),
                               network_passes=2, **common)
    (node,) = _network_nodes(workflow)
    assert node.inputs.network_passes == 2
    with pytest.raises(InputError, match="not conditional"):
        init_regpipe_wf(jobs=[_job(tmp_path, "inter")], weights=str(plain), region="knee",
                        **common)


def test_clamp_lam_is_the_one_rule_for_the_trained_range():
    """register(), the App's up-front warning and the workflows all clamp with it."""
    from regpipe.networks.condition import ConditioningConfig

    trained = ConditioningConfig("film", lam_range=(0.3, 6.0))
    assert [trained.clamp_lam(v) for v in (0.1, 2.0, 50.0)] == [0.3, 2.0, 6.0]
    assert ConditioningConfig("film").clamp_lam(50.0) == 50.0  # range unknown: as given
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="positive and finite"):
            trained.clamp_lam(bad)
