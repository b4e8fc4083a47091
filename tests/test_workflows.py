"""Graph construction, job contract and output scheme of the workflows (seconds, no data).

The BIDS skeleton holds empty files: building a workflow reads no image.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import sys
import types
from pathlib import Path

import pytest
from regpipe.workflows import derivatives, jobs, steps
from regpipe.workflows.base import init_regpipe_wf
from regpipe.workflows.jobs import (
    JOB_KEYS,
    check_methods,
    reference_space_label,
    validate_job,
    validate_jobs,
)

from regpipe.errors import InputError, WeightsError

pe = pytest.importorskip("nipype.pipeline.engine")
from nipype.pipeline.engine.utils import generate_expanded_graph  # noqa: E402

SPACE = "MNI152NLin2009cAsym"


@pytest.fixture
def skeleton(tmp_path: Path) -> dict[str, Path]:
    """An empty-file BIDS dataset: sub-01 (three sessions), sub-02 (run-1), a template."""
    bids = tmp_path / "bids"
    files = {
        "01_1": bids / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "01_2": bids / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
        "01_3": bids / "sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz",
        "02": bids / "sub-02/anat/sub-02_run-1_T1w.nii.gz",
        "template": tmp_path / "tpl" / f"tpl-{SPACE}_res-01_T1w.nii.gz",
        "mask": tmp_path / "derivatives/masks/sub-02/anat/sub-02_run-1_desc-brain_mask.nii.gz",
        "labels": tmp_path / "derivatives/masks/sub-02/anat/sub-02_run-1_dseg.nii.gz",
        "tpl_mask": tmp_path / "tpl" / f"tpl-{SPACE}_res-01_desc-brain_mask.nii.gz",
        "tpl_labels": tmp_path / "tpl" / f"tpl-{SPACE}_res-01_dseg.nii.gz",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    (bids / "dataset_description.json").write_text('{"Name": "skeleton", "BIDSVersion": "1.10.0"}')
    files["bids"] = bids
    files["weights"] = tmp_path / "weights.pt"
    files["weights"].write_bytes(b"\0" * 2048)  # resolve_weights only checks the file
    return files


def make_job(files: dict[str, Path], key: str, **changes) -> dict:
    subject, _, session = key.partition("_")
    entities = {"subject": subject, "suffix": "T1w", "datatype": "anat", "extension": ".nii.gz"}
    if session:
        entities["session"] = session
    if key == "02":
        entities["run"] = 1
    job = {
        "subject": subject,
        "session": session or None,
        "moving": str(files[key]),
        "entities": entities,
        "suffix": "T1w",
        "modality": "mri",
        "fixed": str(files["template"]),
        "fixed_space": SPACE,
        "pair_type": "inter",
        "fixed_mask": None,
        "moving_mask": None,
        "fixed_labels": None,
        "moving_labels": None,
        "source_uri": "bids:raw:" + files[key].relative_to(files["bids"]).as_posix(),
        "weights_sha256": None,
    }
    job.update(changes)
    return job


def build(files, jobs, tmp_path, methods=("network", "ants-affine"), **kwargs):
    options = {
        "weights": str(files["weights"]),
        "io_iterations": 0,
        "affine_init": "ours",
        "device": "cpu",
        "omp_nthreads": 2,
        "seed": None,
    }
    options.update(kwargs)
    return init_regpipe_wf(
        jobs=jobs,
        output_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        methods=list(methods),
        **options,
    )


def expanded(workflow):
    return generate_expanded_graph(workflow._create_flat_graph())


def nodes_named(graph, name: str) -> list:
    return [node for node in graph.nodes() if node.name == name]


# --------------------------------------------------------------------------- job contract


def test_job_keys_are_documented():
    for key in (*JOB_KEYS, "fixed_uri"):
        assert f"``{key}``" in jobs.__doc__


def test_validate_job_fills_optional_keys(skeleton):
    job = validate_job(make_job(skeleton, "02"))
    assert job["fixed_uri"] == Path(skeleton["template"]).as_uri()
    assert job["entities"]["run"] == "1"  # pybids' PaddedInt/int kept as a label
    intra = validate_job(
        make_job(
            skeleton,
            "01_2",
            fixed=str(skeleton["01_1"]),
            fixed_space="sub01ses1",
            pair_type="intra",
        )
    )
    assert intra["fixed_uri"] == "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"modality": "pet"}, "modality"),
        ({"pair_type": "cross"}, "pair_type"),
        ({"subject": "sub-02"}, "alphanumeric"),
        ({"moving": "relative/sub-02_T1w.nii.gz"}, "absolute path"),
        ({"fixed_labels": "/abs/labels.nii.gz"}, "both fixed_labels and moving_labels"),
        ({"fixed_space": "MNI_152"}, "fixed_space"),
        ({"source_uri": "sub-02/anat/x.nii.gz"}, "BIDS URI"),
        ({"weights_sha256": "abc"}, "64 lower-case hex"),
        ({"colour": "blue"}, "unknown keys"),
        ({"session": "1"}, "is not session"),
    ],
)
def test_validate_job_rejects_bad_jobs(skeleton, changes, message):
    with pytest.raises(InputError, match=message):
        validate_job(make_job(skeleton, "02", **changes))


def test_validate_job_requires_keys(skeleton):
    job = make_job(skeleton, "02")
    del job["fixed"]
    with pytest.raises(InputError, match="missing keys"):
        validate_job(job)


def test_validate_jobs_rejects_duplicates_and_nothing(skeleton):
    job = make_job(skeleton, "02")
    with pytest.raises(InputError, match="same outputs"):
        validate_jobs([job, dict(job)])
    with pytest.raises(InputError, match="no job"):
        validate_jobs([])


def test_reference_space_label():
    assert reference_space_label({"subject": "01", "session": "1"}) == "sub01ses1"
    assert (
        reference_space_label({"subject": "01", "session": "pre", "run": 2}) == "sub01sesprerun2"
    )


def test_check_methods_orders_and_rejects():
    assert check_methods(["ants-affine", "network", "network"]) == ["network", "ants-affine"]
    with pytest.raises(InputError, match="subset"):
        check_methods(["ants-bspline"])


# --------------------------------------------------------------------------- graph


def test_one_workflow_per_subject_and_job(skeleton, tmp_path):
    jobs = [make_job(skeleton, "01_1"), make_job(skeleton, "01_2"), make_job(skeleton, "02")]
    workflow = build(skeleton, jobs, tmp_path)
    names = set(workflow.list_node_names())
    assert "ds_dataset_files" in names
    prefixes = {name.split(".")[0] for name in names}
    assert {"sub_01_wf", "sub_02_wf"} <= prefixes
    sub01 = workflow.get_node("sub_01_wf")
    images = {name.split(".")[0] for name in sub01.list_node_names()}
    assert {"ses_1_T1w_to_MNI152NLin2009cAsym_wf", "ses_2_T1w_to_MNI152NLin2009cAsym_wf"} <= images
    assert "run_1_T1w_to_MNI152NLin2009cAsym_wf" in {
        n.split(".")[0] for n in workflow.get_node("sub_02_wf").list_node_names()
    }


def test_every_method_gets_the_same_preprocessed_images(skeleton, tmp_path):
    methods = ("network", "ants-syn", "ants-synquick", "ants-affine")
    graph = expanded(build(skeleton, [make_job(skeleton, "02")], tmp_path, methods=methods))
    registrations = nodes_named(graph, "network_reg") + nodes_named(graph, "ants_reg")
    assert len(registrations) == 4
    sources = set()
    for node in registrations:
        feeds = {
            (str(src.fullname), tuple(sorted(c[1] for c in data["connect"])))
            for src, _, data in graph.in_edges(node, data=True)
        }
        sources.add(frozenset(feeds))
    assert len(sources) == 1  # the very same nodes and fields feed every method
    (feeds,) = sources
    names = {src.rsplit(".", 2)[-2] for src, _ in feeds}
    assert len(names) == 2 and "moving_preproc_wf" in names
    # the subject's one preprocessing of this fixed image, named after it (cached per image)
    (fixed,) = names - {"moving_preproc_wf"}
    stem = Path(make_job(skeleton, "02")["fixed"]).name.split(".")[0].replace("-", "_")
    assert fixed.startswith(f"fixed_preproc_{stem}_")


def test_template_is_not_bias_corrected_but_reference_images_are(skeleton, tmp_path):
    inter = expanded(build(skeleton, [make_job(skeleton, "02")], tmp_path))
    assert [n.fullname.split(".")[-2] for n in nodes_named(inter, "n4")] == ["moving_preproc_wf"]
    intra = expanded(
        build(
            skeleton,
            [
                make_job(
                    skeleton,
                    "01_2",
                    fixed=str(skeleton["01_1"]),
                    fixed_space="sub01ses1",
                    pair_type="intra",
                )
            ],
            tmp_path,
        )
    )
    assert len(nodes_named(intra, "n4")) == 2


def test_a_reference_is_preprocessed_once_for_all_its_sessions(skeleton, tmp_path):
    """Longitudinal: the reference's N4 runs once, not once per registered session."""
    jobs = [make_job(skeleton, key, fixed=str(skeleton["01_1"]), fixed_space="sub01ses1",
                     pair_type="intra") for key in ("01_2", "01_3")]
    graph = expanded(build(skeleton, jobs, tmp_path))
    fixed_n4 = [n for n in nodes_named(graph, "n4") if "fixed_preproc" in n.fullname]
    assert len(fixed_n4) == 1 and len(nodes_named(graph, "n4")) == 3
    registrations = nodes_named(graph, "network_reg")
    assert len(registrations) == 2
    for node in registrations:  # both registrations read that one preprocessed reference
        sources = {src.fullname for src, _ in graph.in_edges(node)}
        assert any("fixed_preproc_" in name for name in sources), sources


def test_fixed_preprocessing_is_named_after_its_image():
    """Cache folders follow the fixed image, not its position among a run's references."""
    from regpipe.workflows.base import fixed_preproc_name

    one = ("/d/sub-01_ses-1_T1w.nii.gz", None, None, "mri", "intra")
    two = ("/d/sub-01_ses-2_T1w.nii.gz", None, None, "mri", "intra")
    assert fixed_preproc_name(one) == fixed_preproc_name(tuple(one))
    assert fixed_preproc_name(one) != fixed_preproc_name(two)
    assert fixed_preproc_name(one).startswith("fixed_preproc_sub_01_ses_1_T1w_")


def test_ct_is_never_bias_corrected(skeleton, tmp_path):
    graph = expanded(build(skeleton, [make_job(skeleton, "02", modality="ct")], tmp_path))
    assert not nodes_named(graph, "n4")


def test_masks_and_labels_reach_preprocessing_and_evaluation(skeleton, tmp_path):
    job = make_job(
        skeleton,
        "02",
        moving_mask=str(skeleton["mask"]),
        fixed_mask=str(skeleton["tpl_mask"]),
        moving_labels=str(skeleton["labels"]),
        fixed_labels=str(skeleton["tpl_labels"]),
    )
    graph = expanded(build(skeleton, [job], tmp_path))
    assert len(nodes_named(graph, "conform_mask")) == 2
    assert len(nodes_named(graph, "conform_labels")) == 2
    for evaluate in nodes_named(graph, "evaluate"):
        fields = {c[1] for _, _, d in graph.in_edges(evaluate, data=True) for c in d["connect"]}
        assert {"fixed_mask", "fixed_labels", "moving_labels", "forward_xfm"} <= fields
    for normalize in nodes_named(graph, "normalize"):
        fields = {c[1] for _, _, d in graph.in_edges(normalize, data=True) for c in d["connect"]}
        assert "mask" in fields  # skull-stripping applied to both images


def test_nodes_declare_threads_and_pickle(skeleton, tmp_path):
    graph = expanded(
        build(
            skeleton, [make_job(skeleton, "02")], tmp_path, seed=7, methods=("network", "ants-syn")
        )
    )
    (network,) = nodes_named(graph, "network_reg")
    (ants,) = nodes_named(graph, "ants_reg")
    assert network.n_procs == 2 and network.inputs.seed == 7
    assert ants.n_procs == 1  # deterministic ANTs is single-threaded
    for node in graph.nodes():
        pickle.dumps(node)  # MultiProc, SLURM... ship nodes to other processes


def test_crash_files_go_to_the_subject_log(skeleton, tmp_path):
    workflow = build(skeleton, [make_job(skeleton, "02")], tmp_path, run_uuid="run1")
    subject_wf = workflow.get_node("sub_02_wf")
    folders = {node.config["execution"]["crashdump_dir"] for node in subject_wf._get_all_nodes()}
    assert folders == {str(tmp_path / "out" / "sub-02" / "log" / "run1")}


def test_reports_can_be_switched_off(skeleton, tmp_path):
    job = make_job(skeleton, "02")
    assert "sub_02_wf.subject_report" in build(skeleton, [job], tmp_path).list_node_names()
    names = build(skeleton, [job], tmp_path, reports=False).list_node_names()
    assert not any(name.endswith("subject_report") for name in names)


def test_missing_weights_fail_before_any_work(skeleton, tmp_path):
    with pytest.raises(WeightsError):
        build(skeleton, [make_job(skeleton, "02")], tmp_path, weights=str(tmp_path / "none.pt"))
    workflow = build(
        skeleton,
        [make_job(skeleton, "02")],
        tmp_path,
        methods=["ants-affine"],
        weights=str(tmp_path / "none.pt"),
    )  # no network: weights unused
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    assert workflow.name == "regpipe_wf"


# --------------------------------------------------------------------------- outputs


def test_output_paths_follow_the_scheme(skeleton, tmp_path):
    job = validate_job(make_job(skeleton, "01_1"))
    out = tmp_path / "out"
    names = {
        k: p.relative_to(out).as_posix()
        for k, p in derivatives.output_paths(out, job, "network").items()
    }
    anat = "sub-01/ses-1/anat/sub-01_ses-1"
    assert names == {
        "preproc": f"{anat}_desc-preproc_T1w.nii.gz",
        "forward_xfm": f"{anat}_from-T1w_to-{SPACE}_mode-image_xfm.h5",
        "inverse_xfm": f"{anat}_from-{SPACE}_to-T1w_mode-image_xfm.h5",
        "warped": f"{anat}_space-{SPACE}_desc-preproc_T1w.nii.gz",
        "jacobian": f"{anat}_space-{SPACE}_desc-T1w_jacobian.nii.gz",
        "metrics_tsv": f"{anat}_space-{SPACE}_desc-T1w_metrics.tsv",
        "metrics_json": f"{anat}_space-{SPACE}_desc-T1w_metrics.json",
    }
    ants = derivatives.output_paths(out, job, "ants-syn")
    assert ants["warped"].is_relative_to(out / "derivatives" / "regpipe-ants-syn" / "sub-01")
    assert ants["preproc"] == derivatives.output_paths(out, job, "network")["preproc"]
    # a template at another resolution or cohort: images and metrics apart, fMRIPrep-style
    other = validate_job({**job, "fixed_entities": {"cohort": "1", "res": "2"}})
    paths = derivatives.output_paths(out, other, "network")
    assert paths["warped"].name == \
        f"sub-01_ses-1_space-{SPACE}_cohort-1_res-2_desc-preproc_T1w.nii.gz"
    assert paths["metrics_tsv"].name == \
        f"sub-01_ses-1_space-{SPACE}_cohort-1_res-2_desc-T1w_metrics.tsv"
    assert paths["forward_xfm"].name == names["forward_xfm"].split("/")[-1]
    with pytest.raises(InputError, match="fixed_entities"):
        validate_job({**job, "fixed_entities": {"den": "32k"}})
    assert derivatives.section_label(other, "network") == \
        f"T1w ses-1 -> {SPACE} cohort-1 res-2 (network)"


def _write_dataset_files(args):
    output_dir, methods = args
    return derivatives.write_dataset_files(output_dir, methods, "/data/bids")


def test_dataset_files_are_safe_under_concurrent_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("REGPIPE_CONTAINER", "docker:regpipe/regpipe:0.1.0")
    methods = ["network", "ants-syn"]
    with multiprocessing.get_context("fork").Pool(3) as pool:  # no torch in the workers
        pool.map(_write_dataset_files, [(str(tmp_path), methods)] * 6)
    top = json.loads((tmp_path / "dataset_description.json").read_text())
    assert top["DatasetType"] == "derivative"
    assert top["GeneratedBy"][0]["Name"] == "regpipe"
    assert top["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "regpipe/regpipe:0.1.0"}
    assert top["DatasetLinks"]["raw"] == "file:///data/bids"
    nested = json.loads(
        (tmp_path / "derivatives/regpipe-ants-syn/dataset_description.json").read_text()
    )
    assert nested["GeneratedBy"][1]["Name"] == "ANTs"
    assert nested["GeneratedBy"][1]["Version"].startswith("antspyx 0.")
    ignore = (tmp_path / ".bidsignore").read_text().splitlines()
    assert ignore.count("*_xfm.*") == 1
    assert not list(tmp_path.rglob(".*.tmp"))
    # an existing, different description is kept
    (tmp_path / "dataset_description.json").write_text('{"Name": "mine"}')
    described = tmp_path / "dataset_description.json"
    assert derivatives.write_json_once(described, top, tmp_path) == "kept"
    # kept, but a run from another raw dataset is told where its bids:raw: URIs now point
    described.write_text(json.dumps({**top, "DatasetLinks": {"raw": "file:///old/bids"}}))
    with caplog.at_level("WARNING"):
        assert derivatives.write_json_once(described, top, tmp_path) == "kept"
    assert "links bids:raw: to file:///old/bids, not to this run's file:///data/bids" in \
        caplog.text


def test_pybids_queries_the_output_scheme(skeleton, tmp_path):
    bids_layout = pytest.importorskip("bids").BIDSLayout
    out = tmp_path / "out"
    methods = ["network", "ants-affine"]
    derivatives.write_dataset_files(out, methods, skeleton["bids"])
    jobs = [validate_job(make_job(skeleton, "01_1")), validate_job(make_job(skeleton, "02"))]
    for job in jobs:
        for method in methods:
            for path in derivatives.output_paths(out, job, method).values():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}" if path.suffix == ".json" else "")
    layout = bids_layout(out, validate=False, derivatives=True)
    top = layout.get(scope="self", suffix="xfm", extension=".h5", subject="01")
    assert {f.entities["from"] for f in top} == {"T1w", SPACE}
    forward = layout.get(scope="self", suffix="xfm", extension=".h5", to=SPACE, mode="image")
    assert len(forward) == 2
    nested = [d for d in layout.derivatives.values() if d.root.endswith("regpipe-ants-affine")]
    assert len(nested) == 1
    warped = nested[0].get(space=SPACE, desc="preproc", suffix="T1w", extension=".nii.gz")
    assert {f.entities["subject"] for f in warped} == {"01", "02"}
    metrics = layout.get(suffix="metrics", extension=".tsv", space=SPACE)
    assert len(metrics) == 4  # both methods, both images
    assert len(layout.get(scope="self", suffix="jacobian", desc="T1w")) == 2


# --------------------------------------------------------------------------- interfaces


def test_write_metrics_table(tmp_path, skeleton):
    job = validate_job(make_job(skeleton, "02"))
    evaluation = tmp_path / "metrics.json"
    evaluation.write_text(
        json.dumps(
            {
                "metrics": {"runtime_s": 1.5, "ncc_after": 0.9, "dice_mean": float("nan")},
                "dice": {"2": 0.5, "10": 0.7},
                "settings": {"seed": 1},
            }
        ).replace("NaN", "null")
    )
    tsv, sidecar = steps.write_metrics(str(evaluation), str(tmp_path / "m.tsv"), job, "network")
    header, row = Path(tsv).read_text().splitlines()
    values = dict(zip(header.split("\t"), row.split("\t"), strict=True))
    assert values["method"] == "network" and values["runtime_s"] == "1.5"
    assert values["peak_memory_mb"] == "n/a" and values["dice_mean"] == "n/a"
    assert header.split("\t")[-2:] == ["dice_2", "dice_10"]
    described = json.loads(Path(sidecar).read_text())
    assert described["runtime_s"]["Units"] == "s" and described["Dice"] == {"2": 0.5, "10": 0.7}
    assert (values["target_cohort"], values["target_res"]) == ("n/a", "n/a")
    job["fixed_entities"] = {"cohort": "1", "res": "2"}  # a res-2 run's rows say so
    header, row = Path(steps.write_metrics(str(evaluation), str(tmp_path / "r.tsv"), job,
                                           "network")[0]).read_text().splitlines()
    values = dict(zip(header.split("\t"), row.split("\t"), strict=True))
    assert (values["target_cohort"], values["target_res"]) == ("1", "2")
    assert "target_res" in json.loads(Path(tmp_path / "r.json").read_text())
    assert values["condition_region"] == values["condition_lam"] == "n/a"  # unconditional
    data = json.loads(evaluation.read_text())
    data["settings"]["condition"] = {"region": "thorax", "pair_type": "intra", "lam": 20.0,
                                     "lam_requested": 50.0}
    evaluation.write_text(json.dumps(data))
    for method, expected in (("network", ["thorax", "intra", "20"]), ("ants-syn", ["n/a"] * 3)):
        header, row = Path(steps.write_metrics(str(evaluation), str(tmp_path / "c.tsv"), job,
                                               method)[0]).read_text().splitlines()
        values = dict(zip(header.split("\t"), row.split("\t"), strict=True))
        assert [values[f"condition_{k}"] for k in ("region", "pair_type", "lam")] == expected
    assert "condition_lam" in json.loads(Path(tmp_path / "c.json").read_text())


def test_subject_report_calls_the_reports_module(monkeypatch, tmp_path):
    calls = []

    def write_subject_report(**kwargs):
        calls.append(kwargs)
        return kwargs["out_html"]

    fake = types.ModuleType("regpipe.reports")
    fake.write_subject_report = write_subject_report  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "regpipe.reports", fake)
    section = {"method": "network", "label": "T1w"}
    inputs = steps.collect_report_inputs("01", None, str(tmp_path), [[section], section])
    assert steps.subject_report(inputs) == str(tmp_path / "sub-01.html")
    assert calls[0]["sections"] == [section, section]
    assert isinstance(calls[0]["output_dir"], Path)


def test_single_cpu_nodes_run_torch_on_one_thread(tmp_path, monkeypatch):
    """MultiProc runs up to n_procs one-CPU nodes side by side: each must use one thread."""
    import nibabel as nib
    import numpy as np
    import torch
    from regpipe.workflows import interfaces

    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), np.float32),
                             np.eye(4)), path)
    threads = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(interfaces, "normalize_file",
                        lambda *args: seen.append(torch.get_num_threads()) or str(path))
    monkeypatch.chdir(tmp_path)
    try:
        torch.set_num_threads(2)
        interfaces.NormalizeImage(in_file=str(path), modality="mri").run()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]


def test_outputs_in_a_fixed_space_take_the_fixed_images_voxel_order(tmp_path, monkeypatch):
    """Preprocessing registers on the RAS-reoriented fixed image; an output "in the space
    of" an LPS reference is stored on that reference's own grid (voxels permuted, not
    resampled), and anything else is left as it is."""
    import nibabel as nib
    import numpy as np
    from regpipe.workflows.steps import in_voxel_order_of

    monkeypatch.chdir(tmp_path)
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    lps[:3, 3] = [10.0, 12.0, -9.0]
    nib.save(nib.Nifti1Image(data, lps), tmp_path / "reference.nii.gz")
    ras = nib.as_closest_canonical(nib.load(tmp_path / "reference.nii.gz"))
    nib.save(ras, tmp_path / "warped_ras.nii.gz")
    out = nib.load(in_voxel_order_of(str(tmp_path / "warped_ras.nii.gz"),
                                     str(tmp_path / "reference.nii.gz")))
    np.testing.assert_allclose(out.affine, lps)
    np.testing.assert_array_equal(np.asarray(out.dataobj), data)
    import SimpleITK as sitk  # a reference in another format (a .mha template, say)

    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "reference.nii.gz")),
                    str(tmp_path / "reference.mha"))
    out = nib.load(in_voxel_order_of(str(tmp_path / "warped_ras.nii.gz"),
                                     str(tmp_path / "reference.mha")))
    np.testing.assert_allclose(out.affine, lps, atol=1e-4)
    other = tmp_path / "other.nii.gz"  # another grid: not a reorientation of the reference
    nib.save(nib.Nifti1Image(data[:4], np.eye(4)), other)
    assert in_voxel_order_of(str(other), str(tmp_path / "reference.nii.gz")) == str(other)


def test_inverse_consistency_is_measured_where_the_inverse_is_defined():
    """Points whose forward image leaves the inverse field's grid are not counted: beyond it
    a field displaces nothing, which measured the field of view (1,000 mm in a CT review)."""
    import numpy as np

    from regpipe.imageio import Image
    from regpipe.spaces import Geometry
    from regpipe.transforms import AffineTransform, DisplacementField

    fixed = Image(np.ones((20, 20, 20), np.float32), Geometry((20, 20, 20), np.eye(4)))
    shift = np.eye(4)
    shift[0, 3] = 5.0
    forward = AffineTransform(shift)  # fixed x -> moving x + 5
    half = Geometry((12, 20, 20), np.eye(4))  # the inverse is defined on x in 0..11 only
    field = np.zeros((12, 20, 20, 3), np.float32)
    field[..., 0] = -5.0
    inverse = DisplacementField(half, field)
    result = steps._inverse_consistency(forward, inverse, fixed, np.ones((20, 20, 20), bool))
    assert result["inverse_consistency_mm_mean"] < 1e-6
    assert 0.3 < result["inverse_consistency_coverage"] < 0.45  # x + 5 <= 11.5: 7 of 20
