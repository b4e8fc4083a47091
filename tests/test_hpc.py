"""Spreading work over a cluster: Nipype's SLURM plugin, the array job, concurrent participants.

SLURM is replaced by the stand-ins in ``tests/fake_slurm/`` (``sbatch`` runs each job script on
this machine in the background and prints ``Submitted batch job N``; ``squeue`` lists the jobs
still running), so both ways users spread work run end to end on a tiny synthetic dataset
(two subjects at 24x20x16 voxels, a synthetic template ``tpl-Tiny`` in a TemplateFlow folder,
no network weights, no instance optimisation):

- ``regpipe ... participant --plugin SLURM --plugin-args ...``: every Nipype node is a batch job;
- ``sbatch --array=1-2 containers/slurm_array.sbatch``: one task per participant, at once
  into one ``output_dir``, each started the way ``apptainer run --cleanenv`` starts the image:
  an empty environment plus the Dockerfile's ``ENV`` (its paths moved under a temporary
  "image" folder) and an empty ``$HOME``, which must stay empty.

The dataset-level writers are also raced directly, from forked processes.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from regpipe.bids_app import group as group_module
from regpipe.workflows import derivatives

from regpipe.spaces import Geometry
from tests.conftest import blob_image, make_affine
from tests.containerfiles import ROOT, Dockerfile

SUBJECTS = ("01", "02")
ARRAY_SCRIPT = ROOT / "containers" / "slurm_array.sbatch"
#: The fastest registration the App offers: affine only, no network, one thread.
FAST = ["--template", "Tiny", "--weights", "none", "--io-iterations", "0", "--omp-nthreads", "1"]
PER_PARTICIPANT = [
    "sub-{s}/anat/sub-{s}_from-T1w_to-Tiny_mode-image_xfm.h5",
    "sub-{s}/anat/sub-{s}_from-Tiny_to-T1w_mode-image_xfm.h5",
    "sub-{s}/anat/sub-{s}_space-Tiny_desc-T1w_metrics.tsv",
    "sub-{s}.html",
]


def _save(data: np.ndarray, geometry: Geometry, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data * 100, geometry.affine), str(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """A two-subject BIDS dataset, a TemplateFlow folder holding ``tpl-Tiny``, and an
    "image" folder whose ``opt/templateflow`` holds the same template (as if pre-fetched)."""
    root = tmp_path_factory.mktemp("hpc")
    bids_dir = root / "bids"
    bids_dir.mkdir()
    (bids_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0"}))
    (bids_dir / "participants.tsv").write_text(
        "participant_id\tage\n" + "".join(f"sub-{s}\t3{i}\n" for i, s in enumerate(SUBJECTS)))
    shape = (24, 20, 16)
    for i, subject in enumerate(SUBJECTS, start=1):
        geometry = Geometry(shape, make_affine("oblique", shape))
        _save(blob_image(geometry, i), geometry,
              bids_dir / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
    template = Geometry(shape, make_affine("RAS", shape))
    templateflow = root / "templateflow"
    _save(blob_image(template, 0), template,
          templateflow / "tpl-Tiny" / "tpl-Tiny_res-01_T1w.nii.gz")
    image = root / "image"
    shutil.copytree(templateflow, image / "opt" / "templateflow")
    return {"root": root, "bids": bids_dir, "templateflow": templateflow, "image": image}


def _fake_slurm(folder: Path) -> Path:
    """Copy the SLURM stand-ins into ``folder`` (their job state goes to ``folder/state``)."""
    if shutil.which("flock") is None:
        pytest.skip("the sbatch stand-in numbers jobs under flock(1) (util-linux), not found")
    folder.mkdir(parents=True)
    for name in ("sbatch", "squeue"):
        shutil.copy(ROOT / "tests" / "fake_slurm" / name, folder / name)
        (folder / name).chmod(0o755)
    return folder


def _sbatch_calls(bin_dir: Path) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in (bin_dir / "state" / "calls.log").read_text()
            .splitlines()]


def _missing_outputs(output_dir: Path, subjects) -> list[str]:
    return [name.format(s=s) for s in subjects for name in PER_PARTICIPANT
            if not (output_dir / name.format(s=s)).is_file()]


# --------------------------------------------------------------------------- Nipype's SLURM plugin


@pytest.fixture(scope="module")
def slurm_plugin_run(dataset) -> dict:
    root = dataset["root"] / "plugin"
    bin_dir = _fake_slurm(root / "bin")
    env = {key: value for key, value in os.environ.items() if key != "LOGNAME"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(root / "home"),
               TEMPLATEFLOW_HOME=str(dataset["templateflow"]), REGPIPE_HOME=str(root / "regpipe"),
               REGPIPE_OFFLINE="1", NIPYPE_NO_ET="1", MPLCONFIGDIR=str(root / "mpl"))
    plugin_args = {"sbatch_args": "--time=00:10:00 --mem-per-cpu=3G", "retry_timeout": 0.1,
                   "poll_sleep_duration": 0.5}  # regpipe polls a scheduler every 2 s by default
    command = [sys.executable, "-m", "regpipe.bids_app.run", str(dataset["bids"]),
               str(root / "out"), "participant", "--participant-label", "01", *FAST,
               "--plugin", "SLURM", "--plugin-args", json.dumps(plugin_args),
               "-w", str(root / "work")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                            timeout=900)
    return {"result": result, "out": root / "out", "work": root / "work", "bin": bin_dir}


def test_slurm_plugin_run_succeeds_with_every_output(slurm_plugin_run):
    result = slurm_plugin_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert _missing_outputs(slurm_plugin_run["out"], ["01"]) == []
    assert not (slurm_plugin_run["out"] / "sub-02").exists()


def test_slurm_plugin_submits_each_node_with_the_plugin_args(slurm_plugin_run):
    calls = _sbatch_calls(slurm_plugin_run["bin"])
    assert len(calls) >= 5  # preprocessing, registration, evaluation, report...: one job each
    for call in calls:
        # the run's sbatch_args, then the node's own request: threads (--omp-nthreads 1), no
        # --mem of regpipe's since the run's --mem-per-cpu covers memory
        assert call[:3] == ["--time=00:10:00", "--mem-per-cpu=3G", "--cpus-per-task=1"]
        assert not any(arg.startswith("--mem=") for arg in call)
        assert "-J" in call and call[-1].endswith(".sh")
    jobs = list((slurm_plugin_run["work"] / "regpipe_wf" / "batch").glob("slurm-*.out"))
    assert len(jobs) == len(calls)  # every job ran (and wrote its log) through the stand-in


def test_slurm_jobs_ask_for_each_nodes_threads_memory_and_gpu():
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe
    from regpipe.workflows.base import slurm_node_args
    from regpipe.workflows.registration import init_network_reg_wf

    workflow = init_network_reg_wf(weights=None, io_iterations=0, affine_init="ours",
                                   device="cuda", omp_nthreads=4, seed=0)
    network = next(node for node in workflow._get_all_nodes() if node.n_procs == 4)
    # a leading space: SLURMGraph joins them to the run's sbatch_args without one
    assert slurm_node_args(network) == " --cpus-per-task=4 --mem=5120M --gpus=1"
    # what the run's own sbatch_args set stays the user's
    assert slurm_node_args(network, "--mem=16G --gres=gpu:a100:1") == " --cpus-per-task=4"
    assert slurm_node_args(network, "-c4 --mem-per-cpu 2G -G 1") == ""
    assert slurm_node_args(network, "--cpus-per-task 8 --time=1:00:00") == (
        " --mem=5120M --gpus=1")
    small = pe.Node(IdentityInterface(fields=["a"]), name="small", mem_gb=0.5)
    assert slurm_node_args(small) == " --cpus-per-task=1 --mem=1536M"
    workflow = init_network_reg_wf(weights=None, io_iterations=0, affine_init="ours",
                                   device="cuda:1", omp_nthreads=4, seed=0)
    network = next(node for node in workflow._get_all_nodes() if node.n_procs == 4)
    assert slurm_node_args(network).endswith("--gpus=1")  # cuda:N too


# --------------------------------------------------------------------------- the array job


def _array_env(dataset: dict[str, Path], root: Path, bin_dir: Path) -> dict[str, str]:
    """sbatch's environment: the script's variables, and a REGPIPE_CMD that starts regpipe as
    ``apptainer run --cleanenv`` starts the image: only the image's environment and $HOME."""
    image_env = Dockerfile.read().image_environment(dataset["image"])
    launcher = ["env", "-i", f"HOME={root / 'home'}", "PATH=/usr/bin:/bin",
                *(f"{k}={v}" for k, v in image_env.items()),
                sys.executable, "-m", "regpipe.bids_app.run"]
    assert not any(" " in word for word in launcher), "REGPIPE_CMD is split on blanks"
    return {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "BIDS_DIR": str(dataset["bids"]), "OUTPUT_DIR": str(root / "out"),
        "WORK_DIR": str(root / "work"), "REGPIPE_CMD": " ".join(launcher),
        "REGPIPE_ARGS": " ".join(FAST),
        "SLURM_MEM_PER_CPU": "2000",  # a job asked for --mem-per-cpu: no SLURM_MEM_PER_NODE
    }


@pytest.fixture(scope="module")
def array_run(dataset) -> dict:
    root = dataset["root"] / "array"
    bin_dir = _fake_slurm(root / "bin")
    (root / "home").mkdir()
    env = _array_env(dataset, root, bin_dir)
    result = subprocess.run(["sbatch", "--wait", f"--array=1-{len(SUBJECTS)}", str(ARRAY_SCRIPT)],
                            env=env, capture_output=True, text=True, check=False, timeout=900)
    logs = {path.name: path.read_text() for path in (bin_dir / "state").glob("slurm-*.out")}
    group = subprocess.run([*env["REGPIPE_CMD"].split(), env["BIDS_DIR"], env["OUTPUT_DIR"],
                            "group", "-w", env["WORK_DIR"]],
                           capture_output=True, text=True, check=False, timeout=600)
    return {"result": result, "logs": logs, "group": group, "root": root, "out": root / "out"}


def test_array_job_runs_every_participant(array_run):
    assert array_run["result"].returncode == 0, "\n".join(array_run["logs"].values())[-4000:]
    assert _missing_outputs(array_run["out"], SUBJECTS) == []
    records = [json.loads(p.read_text()) for p in (array_run["out"] / "logs").glob("*/*.json")]
    assert sorted(r["options"]["participant_label"][0] for r in records) == list(SUBJECTS)
    for record in records:  # 85 % of --mem-per-cpu x CPUs, in MB, for the workflow's nodes
        expected_mb = 2000 * record["options"]["nprocs"] * 85 // 100
        assert record["options"]["mem_gb"] == pytest.approx(expected_mb / 1024, abs=0.01)
    work = array_run["root"] / "work"
    assert sorted(p.name for p in work.iterdir()) == [f"sub-{s}" for s in SUBJECTS]


def test_concurrent_participants_leave_whole_shared_files(array_run):
    out = array_run["out"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker",
                                                           "Tag": "regpipe/regpipe:0.1.0"}
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert sorted(ignore) == sorted(set(derivatives.BIDSIGNORE_LINES) | {"group/"})
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_group_level_after_the_array_job_sees_every_participant(array_run):
    assert array_run["group"].returncode == 0, array_run["group"].stderr[-3000:]
    with open(array_run["out"] / "group" / "group_metrics.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert sorted(row["subject"] for row in rows) == list(SUBJECTS)
    assert "failure:" not in array_run["group"].stderr


def test_container_environment_writes_nothing_to_home(array_run):
    assert array_run["result"].returncode == 0
    assert list((array_run["root"] / "home").iterdir()) == []


# --------------------------------------------------------------------------- the array script


def _array_script(tmp_path: Path, task: int, **env: str) -> subprocess.CompletedProcess:
    """Run the array script as task ``task``, with a stand-in ``apptainer`` that prints its
    arguments (one per line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "apptainer").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "apptainer").chmod(0o755)
    bids_dir = tmp_path / "bids"
    for subject in ("01", "02"):
        (bids_dir / f"sub-{subject}").mkdir(parents=True, exist_ok=True)
    variables = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "BIDS_DIR": str(bids_dir),
                 "OUTPUT_DIR": str(tmp_path / "out"), "REGPIPE_SIF": "/images/regpipe.sif",
                 "SLURM_ARRAY_TASK_ID": str(task), "SLURM_CPUS_PER_TASK": "4", **env}
    return subprocess.run(["bash", str(ARRAY_SCRIPT)], env=variables, capture_output=True,
                          text=True, check=False, timeout=60)


def test_array_script_starts_the_container_with_cleanenv_and_binds(tmp_path):
    result = _array_script(tmp_path, 2, REGPIPE_ARGS="--compare ants-syn")
    assert result.returncode == 0, result.stderr
    bids_dir, out = tmp_path / "bids", tmp_path / "out"
    work = tmp_path / "out-work" / "sub-02"
    assert result.stdout.splitlines()[1:] == [
        "run", "--cleanenv", "-B", f"{bids_dir}:{bids_dir}:ro", "-B", str(out), "-B", str(work),
        "/images/regpipe.sif", str(bids_dir), str(out), "participant",
        "--participant-label", "02", "-w", str(work), "--nprocs", "4", "--compare", "ants-syn"]


def test_array_script_passes_nv_for_the_gpu(tmp_path):
    result = _array_script(tmp_path, 1, REGPIPE_GPU="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:4] == ["run", "--cleanenv", "--nv"]


def test_array_script_reads_a_plain_list_of_labels(tmp_path):
    labels = tmp_path / "subjects.txt"
    labels.write_text("sub-07\n08\n")
    result = _array_script(tmp_path, 2, PARTICIPANTS=str(labels))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[lines.index("--participant-label") + 1] == "08"


def test_array_script_reads_a_participants_file_saved_on_windows(tmp_path):
    table = tmp_path / "participants.tsv"
    # one column, CRLF line ends and a byte-order mark, as a spreadsheet saves it
    table.write_bytes(b"\xef\xbb\xbfparticipant_id\r\nsub-01\r\nsub-02\r\n")
    for task, label in ((1, "01"), (2, "02")):
        result = _array_script(tmp_path, task, PARTICIPANTS=str(table))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[lines.index("--participant-label") + 1] == label
    assert _array_script(tmp_path, 3, PARTICIPANTS=str(table)).returncode == 64


def test_array_script_refuses_a_task_without_participant(tmp_path):
    result = _array_script(tmp_path, 3)
    assert result.returncode == 64
    assert "no participant number 3" in result.stderr


# --------------------------------------------------------------------------- racing the writers


def _describe_once(output_dir: str, barrier, results) -> None:
    barrier.wait()
    content = derivatives.dataset_description(method="network", bids_dir=None,
                                              output_dir=output_dir)
    results.put(derivatives.write_json_once(Path(output_dir) / "dataset_description.json",
                                            content, Path(output_dir)))


def _merge_line(output_dir: str, line: str, barrier, results) -> None:
    barrier.wait()
    if line == "group/":
        group_module._ignore_group_folder(Path(output_dir))
    else:
        derivatives.merge_bidsignore(output_dir, [*derivatives.BIDSIGNORE_LINES, line])
    results.put(line)


def _race(target, argument_lists) -> list:
    context = multiprocessing.get_context("fork")  # the workers only write small text files
    barrier, results = context.Barrier(len(argument_lists)), context.Queue()
    workers = [context.Process(target=target, args=(*args, barrier, results))
               for args in argument_lists]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * len(workers)
    return [results.get(timeout=5) for _ in workers]


def test_concurrent_writers_write_dataset_description_once(tmp_path):
    statuses = _race(_describe_once, [(str(tmp_path),)] * 8)
    assert sorted(statuses) == ["identical"] * 7 + ["written"]
    assert json.loads((tmp_path / "dataset_description.json").read_text())["Name"]


def test_concurrent_bidsignore_merges_keep_every_line(tmp_path):
    lines = [f"extra-{i}/" for i in range(6)] + ["group/"]
    _race(_merge_line, [(str(tmp_path), line) for line in lines])
    merged = (tmp_path / ".bidsignore").read_text().splitlines()
    assert sorted(merged) == sorted({*derivatives.BIDSIGNORE_LINES, *lines})


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])  # some NFS; Lustre noflock
def test_dataset_files_are_written_where_flock_is_unsupported(tmp_path, monkeypatch, caplog,
                                                              code):
    def no_locks(fd, operation):
        raise OSError(code, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="nipype.workflow"):
        written = derivatives.write_dataset_files(tmp_path, ["network", "ants-affine"])
    assert all(json.loads(Path(path).read_text())["BIDSVersion"] for path in written)
    assert "without a lock" in caplog.text


def test_array_task_keeps_the_jobs_gpu_binding_in_the_container(tmp_path):
    """--cleanenv would drop CUDA_VISIBLE_DEVICES, and --nv alone shows every GPU."""
    (tmp_path / "bids" / "sub-07").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apptainer = bin_dir / "apptainer"
    apptainer.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    apptainer.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "BIDS_DIR": str(tmp_path / "bids"),
           "OUTPUT_DIR": str(tmp_path / "out"), "SLURM_ARRAY_TASK_ID": "1",
           "REGPIPE_SIF": "regpipe.sif", "REGPIPE_GPU": "1", "CUDA_VISIBLE_DEVICES": "3",
           "ARGS_FILE": str(tmp_path / "args")}
    result = subprocess.run(["bash", str(ARRAY_SCRIPT)], env=env, capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert "--nv" in args and "CUDA_VISIBLE_DEVICES=3" in args
    assert args[args.index("CUDA_VISIBLE_DEVICES=3") - 1] == "--env"
    assert "--participant-label" in args and "07" in args


def test_sge_pbs_and_lsf_jobs_ask_for_each_nodes_resources(tmp_path):
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe
    from regpipe.workflows.base import (
        _request_node_resources,
        lsf_node_args,
        pbs_node_args,
        sge_node_args,
    )

    big = pe.Node(IdentityInterface(fields=["a"]), name="big", mem_gb=4.0, n_procs=4)
    small = pe.Node(IdentityInterface(fields=["a"]), name="small", mem_gb=0.5)
    # Grid Engine: nothing without the site's names; h_vmem counts per slot
    assert sge_node_args(big) == ""
    assert sge_node_args(big, "", "smp", "h_vmem") == " -pe smp 4 -l h_vmem=1280M"
    assert sge_node_args(big, "", None, "h_vmem") == " -l h_vmem=5120M"
    assert sge_node_args(big, "-pe mpi 8 -l h_vmem=2G,h_rt=1:00:00", "smp", "h_vmem") == ""
    # the run's own 8 slots: h_vmem, counted per slot, is the job's memory over 8
    assert sge_node_args(big, "-pe smp 8", "smp", "h_vmem") == " -l h_vmem=640M"
    # PBS: threads and memory unless the run's qsub_args ask for them
    assert pbs_node_args(big) == " -l nodes=1:ppn=4 -l mem=5120mb"
    assert pbs_node_args(small) == " -l nodes=1:ppn=1 -l mem=1536mb"
    assert pbs_node_args(big, "-l select=1:ncpus=8:mem=16gb -l walltime=1:00:00") == ""
    assert pbs_node_args(big, "-l walltime=1:00:00,mem=8gb") == " -l nodes=1:ppn=4"
    # LSF: threads on one host; memory units are a site setting
    assert lsf_node_args(big) == ' -n 4 -R "span[hosts=1]"'
    assert lsf_node_args(small) == "" and lsf_node_args(big, "-n 2") == ""
    workflow = pe.Workflow(name="wf", base_dir=str(tmp_path))
    workflow.add_nodes([big, small])
    _request_node_resources(workflow, "PBSGraph", {"qsub_args": "-q short"})
    assert big.plugin_args == {"qsub_args": " -l nodes=1:ppn=4 -l mem=5120mb"}
    small.plugin_args = {"qsub_args": "-l mem=1gb"}  # a node's own request stays
    _request_node_resources(workflow, "PBS", {})
    assert small.plugin_args == {"qsub_args": "-l mem=1gb"}


@pytest.mark.parametrize("value", ['{"parallel_environment": 4}',
                                   '{"memory_resource": "h_vmem=4G"}'])
def test_grid_engine_names_in_plugin_args_are_checked(value):
    from regpipe.bids_app.exit_codes import UsageError
    from regpipe.bids_app.parser import parse_args

    with pytest.raises(UsageError, match="must be a name such as"):
        parse_args(["/d", "/o", "participant", "--plugin", "SGE", "--plugin-args", value])
