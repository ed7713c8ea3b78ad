"""Throughput and latency over time of one run, from Locust's stats history (``--csv-full-history``).

A single average hides warm-up, stalls and drift; the plot shows whether the run was steady.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.entries import CORRECT, EXAMPLES  # noqa: E402
from loadtest.locust_csv import history, rates  # noqa: E402


def plot_history(prefix: Path, request_entry: tuple[str, str], model: str, path: Path, title: str) -> Path:
    """Images sent/s, goodput and requests/s (top) and the request p50/p90/p99 in ms (bottom) against seconds."""
    requests = history(prefix, *request_entry)
    examples = history(prefix, EXAMPLES, model)
    correct = history(prefix, CORRECT, model)
    start = min((row["t"] for row in requests + examples), default=0.0)
    figure, (rate, latency) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), constrained_layout=True)
    for rows, label in ((examples, "images sent/s"), (correct, "goodput (correct images/s)"),
                        (requests, "requests/s")):
        points = rates(rows)
        rate.plot([t - start for t, _ in points], [v for _, v in points], label=label)
    rate.set_ylabel("per second")
    rate.legend(loc="lower right")
    rate.grid(alpha=0.3)
    for percentile in ("p50", "p90", "p99"):
        points = [(r["t"] - start, r[percentile]) for r in requests if r[percentile]]
        latency.plot([t for t, _ in points], [v for _, v in points], label=percentile)
    latency.set_ylabel("request latency (ms), last 10 s")
    latency.set_xlabel("seconds since start")
    latency.legend(loc="upper right")
    latency.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
