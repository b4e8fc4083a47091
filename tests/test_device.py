"""Device selection, CPU threads and the mixed-precision context."""

from __future__ import annotations

import pytest
import torch

from regpipe.device import autocast, available_cpus, select_device, set_threads
from regpipe.errors import InputError, ResourceError


def test_cpu_and_auto() -> None:
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_gpu_raises_resource_error(spec: str) -> None:
    with pytest.raises(ResourceError, match="CUDA is not available"):
        select_device(spec)


def test_missing_gpu_index_raises_resource_error() -> None:
    with pytest.raises(ResourceError):
        select_device(f"cuda:{torch.cuda.device_count() + 3}")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_name_raises_input_error(spec: str) -> None:
    with pytest.raises(InputError):
        select_device(spec)


def test_set_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert set_threads(None) == 1
    finally:
        torch.set_num_threads(before)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InputError):
            set_threads(bad)  # type: ignore[arg-type]


def test_available_cpus_follow_the_affinity_mask(monkeypatch) -> None:
    import os

    assert 1 <= available_cpus() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):  # a SLURM allocation of 3 CPUs on a bigger node
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9})
        assert available_cpus() == 3


def test_autocast_is_a_no_op_on_cpu() -> None:
    a = torch.rand(8, 8)
    with autocast("cpu", enabled=True):
        product = a @ a
    assert product.dtype == torch.float32
    torch.testing.assert_close(product, a @ a, rtol=0, atol=0)


def test_autocast_rejects_unknown_types() -> None:
    with pytest.raises(InputError), autocast("cpu", enabled=True, dtype="int8"):
        pass
    with pytest.raises(InputError), autocast("cpu", enabled=True, dtype=torch.float32):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_autocast_uses_bfloat16_on_gpu() -> None:
    a = torch.rand(8, 8, device="cuda")
    with autocast("cuda", enabled=True):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cuda", enabled=False):
        assert (a @ a).dtype == torch.float32


def test_available_cpus_honour_a_cpu_quota_and_sge_slots(monkeypatch, tmp_path) -> None:
    from regpipe import device

    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # docker run --cpus 1.5
    monkeypatch.setattr(device, "CGROUP_CPU_MAX", str(quota))
    monkeypatch.setattr(device, "PROC_CGROUP", str(tmp_path / "none"))  # not this machine's
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert available_cpus() == 2
    quota.write_text("max 100000\n")
    assert available_cpus() == 8
    monkeypatch.setenv("NSLOTS", "3")
    assert available_cpus() == 3


def test_memory_limit_from_the_cgroup(monkeypatch, tmp_path) -> None:
    from regpipe import device

    limit = tmp_path / "memory.max"
    monkeypatch.setattr(device, "CGROUP_MEMORY_MAX", str(limit))
    monkeypatch.setattr(device, "PROC_CGROUP", str(tmp_path / "none"))  # not this machine's
    assert device.memory_limit_gb() is None  # no file
    limit.write_text("max\n")
    assert device.memory_limit_gb() is None
    limit.write_text(f"{8 * 1024**3}\n")
    assert device.memory_limit_gb() == 8.0


@pytest.mark.parametrize("version", ["2", "1"])
def test_limits_of_a_slurm_jobs_own_cgroup(monkeypatch, tmp_path, version) -> None:
    """A SLURM job's limits sit in its own cgroup, not at the root of the file system; on a
    cgroup v1 host in the memory and cpu controller trees."""
    from regpipe import device

    job = "system.slice/slurmstepd.scope/job_42/step_0"
    proc = tmp_path / "cgroup"
    root = tmp_path / "sys"
    if version == "2":
        proc.write_text(f"0::/{job}\n")
        (root / job).mkdir(parents=True)
        (root / "system.slice/slurmstepd.scope/job_42/memory.max").write_text(
            f"{6 * 1024**3}\n")  # the job's limit, one level up from the step
        (root / job / "memory.max").write_text("max\n")
        (root / "system.slice/slurmstepd.scope/job_42/cpu.max").write_text("300000 100000\n")
    else:
        proc.write_text(f"4:memory:/{job}\n3:cpu,cpuacct:/{job}\n1:name=systemd:/{job}\n")
        (root / "memory" / job).mkdir(parents=True)
        (root / "memory" / job / "memory.limit_in_bytes").write_text(f"{6 * 1024**3}\n")
        (root / "memory/system.slice/memory.limit_in_bytes").write_text(
            "9223372036854771712\n")  # v1's "no limit"
        (root / "cpu,cpuacct" / job).mkdir(parents=True)
        (root / "cpu,cpuacct" / job / "cpu.cfs_quota_us").write_text("300000\n")
        (root / "cpu,cpuacct" / job / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(device, "PROC_CGROUP", str(proc))
    monkeypatch.setattr(device, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(device, "CGROUP_MEMORY_MAX", str(root / "memory.max"))  # absent
    monkeypatch.setattr(device, "CGROUP_CPU_MAX", str(root / "cpu.max"))
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("NSLOTS", raising=False)
    assert device.memory_limit_gb() == 6.0
    assert available_cpus() == 3


def test_limits_of_a_docker_container_on_a_cgroup_v1_host(monkeypatch, tmp_path) -> None:
    """The container's own cgroup is mounted at the root of each v1 tree; the path that
    /proc/self/cgroup names does not exist inside it."""
    from regpipe import device

    proc, root = tmp_path / "cgroup", tmp_path / "sys"
    proc.write_text("4:memory:/docker/abc123\n3:cpu,cpuacct:/docker/abc123\n")
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{8 * 1024**3}\n")  # docker -m 8g
    (root / "cpu,cpuacct").mkdir()
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("200000\n")  # docker --cpus 2
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(device, "PROC_CGROUP", str(proc))
    monkeypatch.setattr(device, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(device, "CGROUP_MEMORY_MAX", str(root / "memory.max"))
    monkeypatch.setattr(device, "CGROUP_CPU_MAX", str(root / "cpu.max"))
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("NSLOTS", raising=False)
    assert device.memory_limit_gb() == 8.0
    assert available_cpus() == 2
