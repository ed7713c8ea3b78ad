"""Where the cores went during a load test: the frontend, the model workers, and everything else.

On a machine this small the served/ceiling ratio is decided by who else runs on the worker's cores;
these numbers say so instead of leaving it to guesswork. A background thread samples CPU times
every ``interval`` seconds; the caller then asks for the average over the window in which Locust
sent its load (from Locust's history CSV), so that Locust's start-up and shut-down do not count.
"""
from __future__ import annotations

import threading
import time
from typing import NamedTuple, Self

import psutil


class Sample(NamedTuple):
    t: float  # unix time, like Locust's history timestamps
    groups: dict[str, float]  # CPU seconds (user + system) of each group of processes
    machine: float  # CPU seconds the whole machine was busy, summed over cores


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class GroupMeter:
    """``with GroupMeter({"server": [...], "locust": [...]}) as meter: ...`` then ``meter.cores(start, end)``."""

    def __init__(self, groups: dict[str, list[psutil.Process]], interval: float = 0.5) -> None:
        self.groups, self.interval = groups, interval
        self.samples: list[Sample] = []
        self._last_seen: dict[int, float] = {}  # pid -> CPU seconds at its last successful read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def cpu_seconds(self, processes: list[psutil.Process]) -> float:
        """User plus system CPU time; a process that has exited keeps what it had used at the last read."""
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            self._last_seen[process.pid] = times.user + times.system
        return sum(self._last_seen.get(process.pid, 0.0) for process in processes)

    def sample(self) -> Sample:
        return Sample(time.time(), {name: self.cpu_seconds(processes) for name, processes in self.groups.items()},
                      machine_busy_seconds())

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def cores(self, start: float, end: float) -> dict[str, float] | None:
        """Average cores busy between the first and last samples inside [start, end]: each group, and
        everything else on the machine as "other". None if the window holds < 2 samples."""
        inside = [s for s in self.samples if start <= s.t <= end]
        if len(inside) < 2:
            return None
        first, last = inside[0], inside[-1]
        seconds = last.t - first.t
        used = {name: last.groups[name] - first.groups[name] for name in self.groups}
        other = max(0.0, last.machine - first.machine - sum(used.values()))
        return {**{name: round(value / seconds, 2) for name, value in used.items()},
                "other": round(other / seconds, 2), "seconds": round(seconds, 1)}


def CpuMeter(frontend: psutil.Process, workers: list[psutil.Process], interval: float = 0.5) -> GroupMeter:
    """The sweep's meter: the TorchServe frontend, its model workers, and "other" (Locust, mostly)."""
    return GroupMeter({"frontend": [frontend], "workers": workers}, interval)
