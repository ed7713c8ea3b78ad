"""CPU latency at batch 1 and throughput at batch 64, measured the same way for every variant."""
from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from export.runtime import Runner

THROUGHPUT_BATCH = 64
WARMUP_RUNS = 3


def benchmark(runner: Runner, images: np.ndarray, latency_runs: int, throughput_runs: int) -> dict[str, Any]:
    """Median batch-1 latency in ms and batch-64 images/s, on real images, after a short warm-up."""
    one = images[:1]
    batch = np.ascontiguousarray(images[np.arange(THROUGHPUT_BATCH) % len(images)])
    for _ in range(WARMUP_RUNS):
        runner(one)
        runner(batch)
    latencies = []
    for _ in range(latency_runs):
        start = time.perf_counter()
        runner(one)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(throughput_runs):
        runner(batch)
    elapsed = time.perf_counter() - start
    return {
        "latency_b1_ms": 1e3 * statistics.median(latencies),
        "images_per_s_b64": THROUGHPUT_BATCH * throughput_runs / elapsed,
        "latency_runs": latency_runs,
        "throughput_runs": throughput_runs,
    }
