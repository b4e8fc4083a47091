"""MultiProc runs survive a worker process that the system kills (out of memory, kill -9).

Nipype's own MultiProc waits forever for a node whose worker died; regpipe's runs the nodes of
the broken pool again, each on its own, fails the one whose worker dies again, names its
subject, and runs the rest. Each run is a subprocess with a time limit, so a
regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("nipype")

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from regpipe.workflows.base import run_workflow

    def die(x):
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does

    def fine(x):
        import time
        time.sleep(3)  # still running when the other worker dies (with two workers)
        return x + 1

    root = Path(sys.argv[1])
    workflow = pe.Workflow("wf", base_dir=str(root / "work"))
    for subject, function in (("01", die), ("02", fine)):
        node = pe.Node(niu.Function(input_names=["x"], output_names=["y"], function=function),
                       name=f"sub_{subject}_step")
        node.inputs.x = 1
        node.config = {"execution": {"crashdump_dir": str(root / f"sub-{subject}" / "log"),
                                     "crashfile_format": "txt"}}
        workflow.add_nodes([node])
    summary = run_workflow(workflow, n_procs=int(sys.argv[2]), poll_sleep_duration=0.1)
    print(json.dumps({"succeeded": summary.succeeded, "failed": summary.failed_subjects,
                      "crash_files": [str(p) for p in summary.crash_files]}))
''')


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_worker_fails_its_node_and_the_run_goes_on(tmp_path: Path, workers) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(workers)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert not summary["succeeded"] and summary["failed"] == ["01"]
    assert len(summary["crash_files"]) == 1 and "sub-01" in summary["crash_files"][0]
    crash = Path(summary["crash_files"][0]).read_text()
    assert "worker process running this node died, twice" in crash and "memory" in crash
    # the other subject's node ran to its end (with two workers: again, on its own, after the
    # pool it shared with the killed one broke)
    results = list((tmp_path / "work" / "wf" / "sub_02_step").glob("result_*.pklz"))
    assert results


SLEEPER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from regpipe.bids_app.run import Terminated, _stop_on_sigterm
    from regpipe.workflows.base import run_workflow

    def sleep(folder):
        import os, subprocess, time
        from pathlib import Path
        child = subprocess.Popen(["sleep", "120"])  # as the ANTs methods start a process
        (Path(folder) / "child.pid").write_text(str(child.pid))
        (Path(folder) / "worker.pid").write_text(str(os.getpid()))
        time.sleep(120)

    root = Path(sys.argv[1])
    workflow = pe.Workflow("wf", base_dir=str(root / "work"))
    node = pe.Node(niu.Function(input_names=["folder"], function=sleep), name="sub_01_sleep")
    node.inputs.folder = str(root)
    workflow.add_nodes([node])
    _stop_on_sigterm()
    try:
        run_workflow(workflow, n_procs=1, poll_sleep_duration=0.1)
    except Terminated:
        print("terminated")
''')


def test_sigterm_stops_the_run_and_its_workers(tmp_path: Path) -> None:
    import os
    import signal
    import time

    script = tmp_path / "run.py"
    script.write_text(SLEEPER)
    run = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "worker.pid"
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), "the node never started"
        time.sleep(0.5)
        run.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` does
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert "terminated" in out, err[-2000:]
    for name in ("worker.pid", "child.pid"):  # stopped, not left running as orphans
        pid = int((tmp_path / name).read_text())
        for _ in range(50):
            if not _running(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{name[:-4]} process outlived the interrupted run")


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
