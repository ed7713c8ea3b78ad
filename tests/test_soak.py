"""The soak's arithmetic (RSS fitted against requests served, so that a leak is found and a flat line is
not) and which processes it counts as workers."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from loadtest.soak import (
    MIB,
    WORKER_SCRIPT,
    RssSample,
    analyse,
    model_workers,
    worker_processes,
)


def history(seconds: int, per_second: int) -> list[dict[str, float]]:
    return [{"t": 1000.0 + s, "count": float(s * per_second)} for s in range(seconds + 1)]


def samples(seconds: int, rss: Callable[[int], float], pids: tuple[int, ...] = (7,)) -> list[RssSample]:
    return [RssSample(1000.0 + s, int(rss(s)), int(rss(s)), pids) for s in range(0, seconds + 1, 5)]


def test_a_leak_per_request_is_reported_per_100k_requests_and_a_jittery_flat_line_is_flat() -> None:
    leak_per_request = 2048  # bytes
    counts = history(600, 100)
    leaking = analyse(samples(600, lambda s: 200 * MIB + leak_per_request * 100 * s), counts, warm_up_until=1120.0)
    expected = leak_per_request * 100_000 / MIB
    assert np.isclose(leaking["workers"]["mib_per_100k_requests"], expected, rtol=1e-3)
    start, end = 200 * MIB + leak_per_request * 100 * 120, 200 * MIB + leak_per_request * 100 * 600
    assert np.isclose(leaking["frontend"]["growth_percent"], (end - start) / start * 100, atol=0.01)
    assert leaking["requests_after_warm_up"] == 100 * (600 - 120)

    rng = np.random.default_rng(0)
    flat = analyse(samples(600, lambda s: 200 * MIB + rng.integers(-MIB, MIB)), counts, warm_up_until=1120.0)
    assert abs(flat["workers"]["growth_percent"]) < 1.0 and flat["worker_restarts"] == 0


def test_a_new_worker_pid_counts_as_a_restart() -> None:
    counts = history(60, 10)
    restarted = samples(30, lambda s: MIB, (7,)) + [RssSample(1000.0 + s, MIB, MIB, (8,)) for s in range(35, 61, 5)]
    assert analyse(restarted, counts, warm_up_until=1000.0)["worker_restarts"] == 1


def test_a_workers_forked_decoder_is_not_counted_as_a_worker(tmp_path: Path) -> None:
    """The decoder shares its worker's command line; only the worker's memory and pid are the worker's."""
    script = tmp_path / WORKER_SCRIPT
    script.write_text("import os, sys, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                      "print('forked', flush=True)\ntime.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "forked"
        family = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children()]
        assert len(family) == 2 and len(worker_processes(family)) == 2
        assert [process.pid for process in model_workers(family)] == [worker.pid]
    finally:
        for process in psutil.Process(worker.pid).children():
            process.kill()
        worker.kill()
        worker.wait()
