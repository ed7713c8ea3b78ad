"""Workers x threads from the cores the server is given: cgroup quotas (v1 and v2), the rule, its overrides."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from clients.tokens import bearer
from server import plan as resources
from server.config import REPO_ROOT
from server.launcher import TorchServe
from server.plan import (
    BASE_MEMORY,
    GIB,
    THREADS_ENV,
    WORKER_MEMORY,
    WORKERS_ENV,
    ServingPlan,
    available_cores,
    cgroup_memory_limit,
    cgroup_quota_cores,
    plan,
    plan_from_environment,
    workers_that_fit,
)
from tests.conftest import ports_for


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_quota_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/kubepods/pod1/container\n")
    write(tmp_path / "fs/kubepods/pod1/container/cpu.max", "max 100000\n")
    write(tmp_path / "fs/kubepods/pod1/cpu.max", "150000 100000\n")  # a pod limit of 1.5 cores
    write(tmp_path / "fs/cpu.max", "400000 100000\n")
    assert cgroup_quota_cores(tmp_path / "proc", tmp_path / "fs") == 1.5


def test_cgroup_v1_quota_and_an_unlimited_one(tmp_path: Path) -> None:
    write(tmp_path / "proc", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota_cores(tmp_path / "proc", tmp_path / "fs") == 2.0
    write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_quota_cores(tmp_path / "proc", tmp_path / "fs") is None


def test_cgroup_v1_mounted_at_the_hierarchy_root_inside_a_container(tmp_path: Path) -> None:
    """Docker on cgroup v1 mounts the container's own cgroup at the hierarchy root: /proc/self/cgroup names
    /docker/<id>, which does not exist below the mount, and the limits are in the root's files."""
    write(tmp_path / "proc", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_quota_us", "150000\n")
    write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    write(tmp_path / "fs/memory/memory.limit_in_bytes", f"{3 * GIB}\n")
    assert not (tmp_path / "fs/cpu,cpuacct/docker").exists()
    assert cgroup_quota_cores(tmp_path / "proc", tmp_path / "fs") == 1.5
    assert cgroup_memory_limit(tmp_path / "proc", tmp_path / "fs") == 3 * GIB


def test_no_cgroup_information_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota_cores(tmp_path / "missing", tmp_path) is None
    write(tmp_path / "proc", "0::/\n")
    assert cgroup_quota_cores(tmp_path / "proc", tmp_path / "empty") is None


def test_memory_limit_of_the_cgroup_v2_and_v1(tmp_path: Path) -> None:
    write(tmp_path / "proc2", "0::/kubepods/pod1/container\n")
    write(tmp_path / "v2/kubepods/pod1/container/memory.max", "max\n")
    write(tmp_path / "v2/kubepods/pod1/memory.max", f"{5 * GIB}\n")  # the pod's limit binds
    assert cgroup_memory_limit(tmp_path / "proc2", tmp_path / "v2") == 5 * GIB
    write(tmp_path / "proc1", "4:memory:/docker/abc\n3:cpu:/docker/abc\n")
    write(tmp_path / "v1/memory/docker/abc/memory.limit_in_bytes", f"{4 * GIB}\n")
    assert cgroup_memory_limit(tmp_path / "proc1", tmp_path / "v1") == 4 * GIB
    write(tmp_path / "v1/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n")  # v1: no limit
    assert cgroup_memory_limit(tmp_path / "proc1", tmp_path / "v1") is None
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path) is None


@given(cores=st.integers(1, 256), limit_gib=st.floats(0.5, 64))
def test_derived_workers_fit_the_memory_limit(cores: int, limit_gib: float) -> None:
    """A container without a CPU limit on a many-core host: one worker per core would outgrow its memory."""
    limit = int(limit_gib * GIB)
    chosen = plan(cores, memory_limit=limit)
    assert 1 <= chosen.default_workers <= cores
    assert chosen.default_workers == 1 or BASE_MEMORY + (chosen.default_workers - 1) * WORKER_MEMORY <= limit
    assert chosen.default_workers == min(cores, workers_that_fit(limit))
    assert chosen.threads == max(1, cores // chosen.default_workers)  # the cores stay in use through threads


def test_the_shipped_pod_limits_and_an_explicit_count_are_not_capped() -> None:
    assert plan(4, memory_limit=5 * GIB).default_workers == 4  # deploy/kubernetes: 4 CPU, 5 GiB
    assert plan(16, memory_limit=5 * GIB).default_workers == 6
    assert plan(16, workers=10, memory_limit=5 * GIB).default_workers == 10  # the operator's choice stands


@pytest.mark.parametrize("quota, expected", [(None, 2), (0.5, 1), (1.5, 1), (8.0, 2)])
def test_available_cores_is_the_affinity_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch, quota, expected) -> None:
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(resources, "cgroup_quota_cores", lambda: quota)
    assert available_cores() == expected


@given(cores=st.integers(1, 256))
def test_by_default_the_hot_model_gets_one_single_threaded_worker_per_core(cores: int) -> None:
    chosen = plan(cores)
    assert (chosen.default_workers, chosen.threads, chosen.other_workers) == (cores, 1, 1)


@given(cores=st.integers(1, 256), workers=st.none() | st.integers(1, 64), threads=st.none() | st.integers(1, 64))
def test_overrides_are_kept_and_the_other_value_fills_the_cores(cores: int, workers: int | None,
                                                                 threads: int | None) -> None:
    chosen = plan(cores, workers, threads)
    if workers is not None:
        assert chosen.default_workers == workers
    if threads is not None:
        assert chosen.threads == threads
    given_value = workers or threads
    if given_value is None:
        assert (chosen.default_workers, chosen.threads) == (cores, 1)
    elif workers is None or threads is None:  # the derived value fills the cores without oversubscribing them
        assert chosen.default_workers * chosen.threads <= max(cores, given_value)
        assert chosen.default_workers * chosen.threads > cores - given_value


@pytest.mark.parametrize("workers, threads", [(0, None), (None, 0), (-2, 1)])
def test_non_positive_overrides_are_refused(workers, threads) -> None:
    with pytest.raises(ValueError):
        plan(4, workers, threads)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "available_cores", lambda: 4)
    monkeypatch.setattr(resources, "cgroup_memory_limit", lambda: None)
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    monkeypatch.setenv(THREADS_ENV, "2")
    assert (plan_from_environment().default_workers, plan_from_environment().threads) == (2, 2)
    assert plan_from_environment(workers=1).threads == 2  # an explicit argument beats the environment
    monkeypatch.setenv(WORKERS_ENV, "two")
    with pytest.raises(ValueError, match=WORKERS_ENV):
        plan_from_environment()


def test_the_handler_reads_the_threads_the_server_sets(model_store: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The served archive's handler, initialised as a worker does it, takes its threads from the variable the
    plan exports (the archive cannot import server.plan), else from its model-config."""
    import torch

    from loadtest.archive import extract, read_archive
    from loadtest.ceiling import load_handler

    archive = read_archive(model_store / "cifar10.mar")
    model_dir = extract(archive.path, tmp_path)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV, "3")
        service = load_handler(model_dir, archive, batch_size=1)
        assert service.threads == 3 and service.model.get_session_options().intra_op_num_threads == 3
        monkeypatch.delenv(THREADS_ENV)
        assert load_handler(model_dir, archive, batch_size=1).threads == archive.threads != 3
    finally:
        torch.set_num_threads(before)


def run_module(command: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in (WORKERS_ENV, THREADS_ENV)} | env
    environment["PATH"] = f"{Path(sys.executable).parent}:{environment['PATH']}"
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def supervisor_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[str, str]:
    """What the container's supervisor (deploy/docker/entrypoint.sh execs it) gives every child it starts,
    TorchServe included, which hands it on to every worker."""
    from server.supervisor import Supervisor

    monkeypatch.delenv(WORKERS_ENV, raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Supervisor._environment(SimpleNamespace(logs=tmp_path))


@pytest.mark.parametrize(("env", "exported"), [({}, None), ({WORKERS_ENV: "3"}, "3 1"), ({THREADS_ENV: "2"}, None)])
def test_the_supervisor_hands_the_plan_to_torchserve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     env: dict[str, str], exported: str | None) -> None:
    chosen = plan_from_environment(int(env.get(WORKERS_ENV, 0)) or None, int(env.get(THREADS_ENV, 0)) or None)
    handed = supervisor_environment(tmp_path, monkeypatch, env)
    assert f"{handed[WORKERS_ENV]} {handed[THREADS_ENV]}" == (exported or f"{chosen.default_workers} {chosen.threads}")


def test_the_supervisor_stops_on_a_bad_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=f"{WORKERS_ENV} must be a positive integer, got 'two'"):
        supervisor_environment(tmp_path, monkeypatch, {WORKERS_ENV: "two"})


def test_the_scaler_gives_up_when_no_server_answers_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "config.properties"
    config.write_text(f"management_address=http://127.0.0.1:{ports_for(18160)['grpc_management_port']}\n")
    command = [sys.executable, "-m", "server.scaler", "--workdir", str(tmp_path), "--config", str(config),
               "--timeout", "2"]
    result = run_module(command, {})
    assert result.returncode == 1
    assert "workers not scaled to the plan" in result.stderr and "key_file.json" in result.stderr
    key = {"key": "k", "expiration time": "2099-01-01T00:00:00Z"}
    (tmp_path / "key_file.json").write_text(json.dumps({"management": key, "inference": key, "API": {"key": "a"}}))
    result = run_module(command, {})  # keys now, but nothing listening
    assert result.returncode == 1 and "ConnectionError" in result.stderr


@pytest.mark.slow
def test_a_server_started_with_a_plan_runs_its_workers_and_threads(model_store: Path, tmp_path: Path,
                                                                  test_images: list[tuple[bytes, int]]) -> None:
    """The plan reaches TorchServe (workers per model) and every worker's handler (threads), on a real server."""
    chosen = ServingPlan(cores=4, default_workers=2, other_workers=1, threads=2)  # unlike the archive's 1 x 1
    server = TorchServe(workdir=tmp_path, model_store=model_store, plan=chosen,
                        overrides=ports_for(18150) | {"load_models": "cifar10.mar"})
    with server.start(wait_for=["cifar10"]):
        workers = server.describe("cifar10")["workers"]
        assert len(workers) == 2 and all(worker["status"] == "READY" for worker in workers)
        loaded = re.findall(r"loaded \S+ \(\S+\) on cpu with (\d+) thread\(s\)", server.log_text())
        assert loaded == ["2", "2"], loaded
        image, _ = test_images[0]
        response = requests.post(f"{server.inference_url}/predictions/cifar10", data=image, timeout=60,
                                 headers=bearer(server.keys["inference"]) | {"Content-Type": "image/png"})
        assert response.status_code == 200 and response.json()["label"] == "cat"
        # The container's way: server.scaler beside a running server, with the entrypoint's exports.
        scaled = run_module([sys.executable, "-m", "server.scaler", "--workdir", str(tmp_path), "--config",
                             str(server.effective_config), "--timeout", "60"], {WORKERS_ENV: "3", THREADS_ENV: "1"})
        assert scaled.returncode == 0, scaled.stderr
        assert "cifar10 3" in scaled.stderr and server.ready_workers("cifar10") == 3
