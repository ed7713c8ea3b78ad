"""CPU pinning of the server and the load generator.

On a small machine Locust and TorchServe compete for the same cores, and the served throughput then
measures the load generator as much as the server. Pinning each side to its own cores makes the
comparison with the in-process ceiling (measured on the server's cores) fair.

A process's affinity is per thread on Linux: the JVM frontend already runs dozens of threads, so
every thread is pinned. New threads and the worker processes the frontend forks later inherit the
mask, which is why pinning the frontend once also covers workers restarted afterwards.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

PINNING_MODES = {
    "split": "the server (frontend and workers) on the server cores, Locust on the others",
    "worker": "the model workers alone on the server cores; the frontend and Locust share the others",
    "none": "everything shares every core",
}


@dataclass(frozen=True)
class Placement:
    """The cores of each side of a load test; ``locust`` None leaves Locust unpinned."""

    frontend: set[int]
    workers: set[int]
    locust: set[int] | None

    def report(self) -> dict[str, str] | None:
        """What the run summary records (None when nothing is pinned apart)."""
        if self.locust is None:
            return None
        return {"frontend": format_cpus(self.frontend), "workers": format_cpus(self.workers),
                "locust": format_cpus(self.locust)}


def placement(mode: str, server_cpus: set[int], locust_cpus: set[int]) -> Placement:
    """The cores of each side under a pinning mode of PINNING_MODES."""
    if mode == "split":
        return Placement(frontend=server_cpus, workers=server_cpus, locust=locust_cpus)
    if mode == "worker":
        return Placement(frontend=locust_cpus, workers=server_cpus, locust=locust_cpus)
    if mode == "none":
        everything = os.sched_getaffinity(0)
        return Placement(frontend=everything, workers=everything, locust=None)
    raise ValueError(f"unknown pinning mode {mode!r}, expected one of {', '.join(PINNING_MODES)}")


def parse_cpus(text: str) -> set[int]:
    """``"1"``, ``"0,2"`` or ``"2-3"`` (Linux cpulist syntax) to a set of core ids."""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def format_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def default_split() -> tuple[set[int], set[int]]:
    """(server cores, load-generator cores): a quarter (at least one) for Locust, the rest for the server."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise ValueError("pinning needs at least two cores")
    locust = max(1, len(cpus) // 4)
    return set(cpus[locust:]), set(cpus[:locust])


def pin(processes: Iterable[psutil.Process], cpus: set[int]) -> None:
    """Pin every thread of every process; threads that exit meanwhile are skipped."""
    for process in processes:
        try:
            threads = process.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            try:
                os.sched_setaffinity(thread.id, cpus)
            except ProcessLookupError:
                pass


def affinities(processes: Iterable[psutil.Process]) -> dict[str, str]:
    """``{"<name> <pid>": "<cores>"}`` for the report, read back from the kernel."""
    result = {}
    for process in processes:
        try:
            result[f"{process.name()} {process.pid}"] = format_cpus(process.cpu_affinity())
        except psutil.NoSuchProcess:
            continue
    return result


def preexec(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins a child before it execs, so that all of its threads start pinned."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)
