"""End-to-end participant runs on a tiny synthetic dataset (3 subjects at ~32^3).

One module-scoped fixture runs the workflow twice with the same work directory: sub-01 (with
session, masks and label maps) and sub-02 succeed, sub-03's image is corrupt. The network is a
tiny random uniGradICON-style model written with ``save_weights``; methods are the network and
ANTs' affine.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from regpipe.networks import NetworkConfig, build_network, save_weights
from regpipe.spaces import Geometry
from regpipe.transforms import AffineTransform
from regpipe.warp import warp_array
from regpipe.weights import sha256sum

ants = pytest.importorskip("ants")
bids = pytest.importorskip("bids")
pytest.importorskip("nipype")

from regpipe.workflows.base import init_regpipe_wf, run_workflow  # noqa: E402
from regpipe.workflows.derivatives import output_paths, sidecar_of  # noqa: E402
from regpipe.workflows.jobs import validate_job  # noqa: E402

METHODS = ["network", "ants-affine"]
SPACE = "Tiny"


def _affine(shape, flip=False, origin=(0.0, 0.0, 0.0)):
    matrix = np.diag([-2.0, -2.0, 2.0, 1.0] if flip else [2.0, 2.0, 2.0, 1.0])
    matrix[:3, 3] = np.asarray(origin) - matrix[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return matrix


def _save(data, affine, path: Path, dtype) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.set_sform(affine, 1)
    image.set_qform(affine, 1)
    nib.save(image, str(path))
    return str(path)


def _phantom_labels(geometry: Geometry) -> np.ndarray:
    """Three sharp "tissues" (labels 1-3) in world space."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), -1)
    xyz = geometry.voxel_to_world(index.astype(float))
    labels = np.zeros(geometry.shape, np.int16)
    labels[np.linalg.norm(xyz / [24.0, 20.0, 18.0], axis=-1) < 1] = 1
    labels[np.linalg.norm((xyz - [6, -4, 2]) / [9.0, 7.0, 6.0], axis=-1) < 1] = 2
    labels[np.linalg.norm((xyz + np.array([8, 2, 0])) / [5.0, 5.0, 8.0], axis=-1) < 1] = 3
    return labels


def _dataset(root: Path) -> dict:
    bids_dir = root / "bids"
    bids_dir.mkdir(parents=True)
    (bids_dir / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.10.0"}')
    template_geom = Geometry((32, 32, 32), _affine((32, 32, 32)))
    template_labels = _phantom_labels(template_geom)
    intensity = np.array([0.0, 1.0, 1.8, 0.5], np.float32)
    template = ndimage.gaussian_filter(intensity[template_labels], 0.6)
    files = {
        "template": _save(
            template * 100, template_geom.affine, root / "tpl/tpl-Tiny_T1w.nii.gz", np.float32
        ),
        "template_labels": _save(
            template_labels, template_geom.affine, root / "tpl/tpl-Tiny_dseg.nii.gz", np.int16
        ),
        "template_mask": _save(
            template_labels > 0, template_geom.affine, root / "tpl/tpl-Tiny_mask.nii.gz", np.uint8
        ),
    }
    moving_geom = Geometry((30, 34, 28), _affine((30, 34, 28), flip=True, origin=(1.0, -2.0, 1.0)))
    for index, (subject, session) in enumerate([("01", "1"), ("02", None), ("03", None)]):
        shift = np.eye(4)
        shift[:3, 3] = [2.0 + index, -2.0, 1.5]
        to_template = AffineTransform(np.linalg.inv(shift))
        labels = warp_array(
            template_labels, template_geom, to_template, moving_geom, interpolation="nearest"
        )
        bias = np.linspace(0.85, 1.15, moving_geom.shape[0])[:, None, None]
        noise = np.random.default_rng(index).random(moving_geom.shape)
        image = (ndimage.gaussian_filter(intensity[labels], 0.6) * bias + 0.02 * noise) * 300
        anat = bids_dir / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
        stem = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_T1w"
        files[subject] = {
            "moving": _save(image, moving_geom.affine, anat / f"{stem}.nii.gz", np.int16),
            "labels": _save(
                labels, moving_geom.affine, root / f"labels/{stem}_dseg.nii.gz", np.int16
            ),
            "mask": _save(
                labels > 0, moving_geom.affine, root / f"labels/{stem}_mask.nii.gz", np.uint8
            ),
            "session": session,
        }
    Path(files["03"]["moving"]).write_bytes(b"\x1f\x8b\x08 not really a NIfTI")
    torch.manual_seed(0)
    network = build_network(
        NetworkConfig(
            grid_shape=(32, 32, 32), n_steps=1, down_channels=(4, 4, 4), up_channels=(4, 4, 4)
        )
    )
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.02)
    files["weights"] = str(
        save_weights(network, root / "weights/tiny.pt", {"grid_mode": "squash"})
    )
    files["bids"] = bids_dir
    return files


def _job(files: dict, subject: str, extras: bool) -> dict:
    own = files[subject]
    entities = {"subject": subject, "suffix": "T1w", "datatype": "anat", "extension": ".nii.gz"}
    if own["session"]:
        entities["session"] = own["session"]
    return {
        "subject": subject, "session": own["session"], "moving": own["moving"],
        "entities": entities, "suffix": "T1w", "modality": "mri", "fixed": files["template"],
        "fixed_space": SPACE, "pair_type": "inter",
        "fixed_mask": files["template_mask"] if extras else None,
        "moving_mask": own["mask"] if extras else None,
        "fixed_labels": files["template_labels"] if extras else None,
        "moving_labels": own["labels"] if extras else None,
        "source_uri": "bids:raw:" + Path(own["moving"]).relative_to(files["bids"]).as_posix(),
        "weights_sha256": None,
    }  # fmt: skip


def _snapshot(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    files = _dataset(root)
    jobs = [_job(files, "01", True), _job(files, "02", False), _job(files, "03", False)]
    out, work = root / "out", root / "work"

    def run_once():
        workflow = init_regpipe_wf(
            jobs=jobs, output_dir=out, work_dir=work, methods=METHODS, weights=files["weights"],
            io_iterations=0, affine_init="ours", device="cpu", omp_nthreads=1, seed=0,
            reports=False,
        )  # fmt: skip
        return run_workflow(workflow, n_procs=2, poll_sleep_duration=0.2)

    first = run_once()
    good = {f"sub_{s}_wf": _snapshot(work / "regpipe_wf" / f"sub_{s}_wf") for s in ("01", "02")}
    outputs_before = _snapshot(out)
    second = run_once()
    return {
        "files": files, "jobs": [validate_job(j) for j in jobs], "out": out, "work": work,
        "first": first, "second": second, "work_before": good, "out_before": outputs_before,
        "run_once": run_once,
    }  # fmt: skip


def test_corrupt_image_fails_its_subject_only(runs):
    first = runs["first"]
    assert not first.succeeded
    assert first.failed_subjects == ["03"]
    (crash,) = first.crash_files
    assert crash.is_relative_to(runs["out"] / "sub-03" / "log")
    assert "cannot be read as an image" in crash.read_text()


#: Files of one image and one method, relative to the method's dataset (``{p}``: entities).
PER_METHOD = [
    "{p}_from-T1w_to-Tiny_mode-image_xfm.h5",
    "{p}_from-T1w_to-Tiny_mode-image_xfm.json",
    "{p}_from-Tiny_to-T1w_mode-image_xfm.h5",
    "{p}_from-Tiny_to-T1w_mode-image_xfm.json",
    "{p}_space-Tiny_desc-preproc_T1w.nii.gz",
    "{p}_space-Tiny_desc-preproc_T1w.json",
    "{p}_space-Tiny_desc-T1w_jacobian.nii.gz",
    "{p}_space-Tiny_desc-T1w_jacobian.json",
    "{p}_space-Tiny_desc-T1w_metrics.tsv",
    "{p}_space-Tiny_desc-T1w_metrics.json",
]


def test_produced_files_match_the_expected_list(runs):
    out = runs["out"]
    ants = "derivatives/regpipe-ants-affine/"
    expected = {".regpipe.lock", "dataset_description.json", ".bidsignore",
                f"{ants}dataset_description.json", f"{ants}.bidsignore"}  # fmt: skip
    for prefix in ("sub-01/ses-1/anat/sub-01_ses-1", "sub-02/anat/sub-02"):
        expected |= {f"{prefix}_desc-preproc_T1w.nii.gz", f"{prefix}_desc-preproc_T1w.json"}
        for root in ("", ants):
            expected |= {root + name.format(p=prefix) for name in PER_METHOD}
    produced = {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and "/log/" not in p.as_posix()
    }
    assert produced == expected


def test_written_forward_transforms_reproduce_the_warped_images_in_ants(runs):
    for job in runs["jobs"][:2]:
        for method in METHODS:
            paths = output_paths(runs["out"], job, method)
            warped = ants.image_read(str(paths["warped"]))
            moving = ants.image_read(str(paths["preproc"]))
            resampled = ants.apply_transforms(
                warped, moving, [str(paths["forward_xfm"])], whichtoinvert=[False]
            )
            inner = (slice(2, -2),) * 3
            difference = np.abs(resampled.numpy()[inner] - warped.numpy()[inner])
            assert difference.max() < 1e-3, (job["subject"], method)


def test_metrics_tables_and_sidecars(runs):
    sha = sha256sum(runs["files"]["weights"])
    for job in runs["jobs"][:2]:
        for method in METHODS:
            paths = output_paths(runs["out"], job, method)
            header, row = paths["metrics_tsv"].read_text().splitlines()
            values = dict(zip(header.split("\t"), row.split("\t"), strict=True))
            assert (
                values["method"] == method and values["participant_id"] == f"sub-{job['subject']}"
            )
            for key in (
                "runtime_s",
                "peak_memory_mb",
                "ncc_before",
                "ncc_after",
                "folding_percent",
                "sd_log_jacobian",
                "inverse_consistency_mm_mean",
                "inverse_consistency_coverage",
            ):
                assert values[key] != "n/a", key
            assert float(values["ncc_after"]) > float(values["ncc_before"])
            assert (values["dice_mean"] != "n/a") == (job["subject"] == "01")
            warped_meta = json.loads(sidecar_of(paths["warped"]).read_text())
            assert warped_meta["SkullStripped"] is (job["subject"] == "01")
            assert warped_meta["SpatialReference"] == job["fixed_uri"]
            xfm_meta = json.loads(sidecar_of(paths["forward_xfm"]).read_text())
            tools = {entry["Name"]: entry for entry in xfm_meta["GeneratedBy"]}
            if method == "network":
                assert tools["regpipe"]["Weights"]["SHA256"] == sha
                assert tools["regpipe"]["Seed"] == 0
                assert tools["regpipe"]["MixedPrecision"] is False  # float32 on the CPU
                assert tools["regpipe"]["NetworkPasses"] == 1 == int(values["network_passes"])
                assert tools["regpipe"]["TorchVersion"] == torch.__version__
            else:
                assert tools["ANTs"]["TypeOfTransform"] == "Affine"


def test_pybids_reads_every_method(runs):
    layout = bids.BIDSLayout(runs["out"], validate=False, derivatives=True)
    forward = layout.get(suffix="xfm", extension=".h5", to=SPACE)
    assert len(forward) == 4  # 2 images x 2 methods
    assert {Path(f.path).is_relative_to(runs["out"] / "derivatives") for f in forward} == {
        True,
        False,
    }
    assert len(layout.get(suffix="metrics", extension=".tsv")) == 4
    # one method by its sidecars' Method (docs/outputs.md)
    network = layout.get(suffix="xfm", extension=".h5", to=SPACE, Method="network")
    assert len(network) == 2 and not any(
        Path(f.path).is_relative_to(runs["out"] / "derivatives") for f in network)


def test_second_run_recomputes_nothing(runs):
    second = runs["second"]
    assert second.failed_subjects == ["03"]  # the corrupt subject is tried again
    for name, before in runs["work_before"].items():
        after = _snapshot(runs["work"] / "regpipe_wf" / name)
        results = {k: v for k, v in after.items() if Path(k).name.startswith("result_")}
        changed = {Path(k).parent.name for k, v in results.items() if before.get(k) != v}
        # only the derivative writers run again (they always do; see the last test)
        assert results and all(node.startswith("ds_") for node in changed), (name, changed)
    after = _snapshot(runs["out"])
    assert {k: v for k, v in after.items() if "/log/" not in k} == {
        k: v for k, v in runs["out_before"].items() if "/log/" not in k
    }


def test_outputs_deleted_after_a_run_are_written_again_from_the_cache(runs):
    """Keep last: it deletes and rewrites the output folder the other tests read."""
    import shutil

    out = runs["out"]
    before = {k for k in _snapshot(out) if "/log/" not in k}
    shutil.rmtree(out)
    again = runs["run_once"]()
    assert again.failed_subjects == ["03"]
    assert {k for k in _snapshot(out) if "/log/" not in k} == before
