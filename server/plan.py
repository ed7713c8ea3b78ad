"""How many worker processes and threads the served models get, from the cores the server is given.

Decided when the server starts, not when the archives are packed: the same archive runs on a
2-core laptop and on a 16-core node. "The cores it is given" is the smaller of the CPU affinity
mask (taskset, cpusets) and the CFS quota of its cgroup (``docker --cpus``, a Kubernetes CPU
limit), because a container sees every core of the host in its affinity mask while its quota
throttles it to a few. Without a CPU limit a container sees every core of a large host, so the
default model's workers are also capped by the cgroup's memory limit, if there is one. The rule and
the measurements behind it are in docs/SERVING.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "cifar10"  # the archive `python -m export` packs as the default variant: the one clients call
WORKERS_ENV = "CIFAR10_WORKERS"  # worker processes of the default model
THREADS_ENV = "CIFAR10_WORKER_THREADS"  # intra-op threads of every worker; the handler reads it
CGROUP_ROOT = Path("/sys/fs/cgroup")
GIB = 1 << 30
# Memory of the JVM with one worker for each archive, and of each further cifar10 worker, rounded up
# for traffic from what docs/DEPLOY.md measured in the image.
BASE_MEMORY = int(2.5 * GIB)
WORKER_MEMORY = GIB // 2


def cgroup_quota_cores(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup and its ancestors in cores (cgroup v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), the tightest one found; None when unlimited or unreadable."""
    quotas = [_read_quota((directory / "cpu.max", None) if version == 2 else
                          (directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us"))
              for directory, version in _limit_dirs("cpu", ("cpu", "cpu,cpuacct"), proc_cgroup, root)]
    return min((quota for quota in quotas if quota is not None), default=None)


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """The memory limit in bytes of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), the tightest one found; None when unlimited or unreadable."""
    limits = [_read_bytes(directory / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
              for directory, version in _limit_dirs("memory", ("memory",), proc_cgroup, root)]
    return min((limit for limit in limits if limit is not None), default=None)


def _limit_dirs(controller: str, v1_mounts: tuple[str, ...], proc_cgroup: Path, root: Path) -> list[tuple[Path, int]]:
    """Every cgroup directory whose ``controller`` limits apply to this process, with its cgroup version."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    directories = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            directories += [(directory, 2) for directory in _ancestors(root, path)]
        elif controller in controllers.split(","):
            directories += [(directory, 1) for mount in v1_mounts for directory in _ancestors(root / mount, path)]
    return directories


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= 1 << 60:  # "max" (v2), or v1's page-rounded 2^63 for no limit
        return None
    return int(text)


def workers_that_fit(memory_limit: int) -> int:
    """How many default-model workers fit a memory limit beside everything else (at least 1)."""
    return max(1, 1 + (memory_limit - BASE_MEMORY) // WORKER_MEMORY)


def _ancestors(base: Path, path: str) -> list[Path]:
    """``base/a/b``, ``base/a``, ``base``: a limit on any enclosing cgroup applies too."""
    parts = [part for part in path.strip("/").split("/") if part]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_quota(files: tuple[Path, Path | None]) -> float | None:
    quota_file, period_file = files
    try:
        if period_file is None:
            quota, period = quota_file.read_text().split()
        else:
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
    except (OSError, ValueError):
        return None
    if quota == "max" or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by its cgroup quota (rounded down, at least 1)."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota_cores()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return cores


@dataclass(frozen=True)
class ServingPlan:
    """Workers of the default (hot) model, workers of every other model, and threads per worker."""

    cores: int
    default_workers: int
    other_workers: int
    threads: int
    memory_limit: int | None = None

    def workers_of(self, model: str) -> int:
        return self.default_workers if model == DEFAULT_MODEL else self.other_workers

    def describe(self) -> str:
        memory = f", {self.memory_limit / GIB:.1f} GiB memory limit" if self.memory_limit is not None else ""
        return (f"{self.cores} core(s){memory}: default model {self.default_workers} worker(s) x {self.threads} thread(s), "
                f"other models {self.other_workers} worker(s) x {self.threads} thread(s)")


def plan(cores: int, workers: int | None = None, threads: int | None = None,
         memory_limit: int | None = None) -> ServingPlan:
    """One single-threaded worker per core for the default model; workers x threads = cores when one is given.

    Processes rather than threads, because the per-request work around the model (TorchServe's
    Python worker loop, PNG decode, JSON) runs under one GIL per process: a second process fills
    the gaps of the first while it waits on the frontend, a second intra-op thread does not. The
    other models keep one worker each: idle, they sleep on their socket and cost memory, not CPU.
    Under a memory limit the derived worker count is capped to what fits it: a container with no CPU
    limit sees every core of a large host and would otherwise start more workers than its memory holds.
    """
    if workers is not None and workers < 1 or threads is not None and threads < 1:
        raise ValueError(f"workers and threads must be at least 1, got {workers} and {threads}")
    if workers is None:
        workers = max(1, cores // (threads or 1))
        if memory_limit is not None:  # a chosen count is the operator's call; a derived one must fit
            workers = min(workers, workers_that_fit(memory_limit))
    if threads is None:
        threads = max(1, cores // workers)
    return ServingPlan(cores=cores, default_workers=workers, other_workers=1, threads=threads,
                       memory_limit=memory_limit)


def _positive_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def plan_from_environment(workers: int | None = None, threads: int | None = None) -> ServingPlan:
    """The plan for this process's cores; explicit arguments win over CIFAR10_WORKERS / CIFAR10_WORKER_THREADS."""
    return plan(available_cores(), workers or _positive_env(WORKERS_ENV), threads or _positive_env(THREADS_ENV),
                cgroup_memory_limit())


def main(argv: list[str] | None = None) -> int:
    """Print the plan as shell exports, so that an entrypoint hands the threads to TorchServe's workers
    and the same numbers to server.scaler: ``plan="$(python -m server.plan)"; eval "$plan"``."""
    argparse.ArgumentParser(prog="python -m server.plan",
                            description="The serve-time plan for this process's cores, as shell exports.").parse_args(argv)
    try:
        chosen = plan_from_environment()
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"Workers: {chosen.describe()}.", file=sys.stderr)
    print(f"export {WORKERS_ENV}={chosen.default_workers} {THREADS_ENV}={chosen.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
