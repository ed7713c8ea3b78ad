"""Numbers from Locust's own CSV files (``--csv PREFIX``): the load test never re-times what Locust timed."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from loadtest.entries import CORRECT, EXAMPLES

PERCENTILES = ("50%", "90%", "99%")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(value: str) -> float | None:
    """Locust writes "N/A" for percentiles of an entry without requests."""
    try:
        return float(value)
    except ValueError:
        return None


def find_entry(rows: list[dict[str, str]], request_type: str, name: str) -> dict[str, str] | None:
    return next((row for row in rows if row["Type"] == request_type and row["Name"] == name), None)


def entry_stats(row: dict[str, str] | None) -> dict[str, Any]:
    """Count, failures, rate and latency (ms) of one stats row; zeros when Locust never recorded it."""
    if row is None:
        return {"count": 0, "failures": 0, "per_s": 0.0,
                "latency_ms": dict.fromkeys(("p50", "p90", "p99", "avg", "max"))}
    latency = {f"p{p[:-1]}": _number(row[p]) for p in PERCENTILES}
    latency |= {"avg": _number(row["Average Response Time"]), "max": _number(row["Max Response Time"])}
    return {"count": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "per_s": float(row["Requests/s"]), "latency_ms": latency}


def run_stats(prefix: Path, request_type: str, request_name: str, model: str) -> dict[str, Any]:
    """The prediction requests and their EXAMPLES and CORRECT mirrors (see locustfile) from ``PREFIX_stats.csv``.

    ``examples_per_s`` counts attempts: every image sent, failed or not. Answered images are those
    whose request succeeded; goodput counts only the answers with the image's true label. All three
    rates share the EXAMPLES entry's time window, so that they can be compared and divided.
    """
    rows = read_rows(Path(f"{prefix}_stats.csv"))
    requests = entry_stats(find_entry(rows, request_type, request_name))
    examples = entry_stats(find_entry(rows, EXAMPLES, model))
    correct = entry_stats(find_entry(rows, CORRECT, model))["count"]
    answered = examples["count"] - examples["failures"]
    per_example_s = examples["per_s"] / examples["count"] if examples["count"] else 0.0
    failures = read_rows(Path(f"{prefix}_failures.csv"))
    return {
        "requests": requests["count"], "failures": requests["failures"], "requests_per_s": requests["per_s"],
        "examples": examples["count"], "example_failures": examples["failures"], "examples_per_s": examples["per_s"],
        "answered": answered, "answered_per_s": answered * per_example_s,
        "correct": correct, "goodput_per_s": correct * per_example_s,
        "served_accuracy": correct / answered if answered else None,
        "latency_ms": requests["latency_ms"],
        "failure_messages": [f"{row['Occurrences']}x {row['Method']} {row['Name']}: {row['Error']}" for row in failures
                             if row["Method"] not in (EXAMPLES, CORRECT)],
    }


def history(prefix: Path, request_type: str, name: str) -> list[dict[str, float | None]]:
    """One entry's rows of ``PREFIX_stats_history.csv`` (needs ``--csv-full-history``): time, cumulative count,
    and Locust's percentiles over its recent window."""
    return [{"t": float(row["Timestamp"]), "users": float(row["User Count"]),
             "count": float(row["Total Request Count"]),
             **{f"p{p[:-1]}": _number(row[p]) for p in PERCENTILES}}
            for row in read_rows(Path(f"{prefix}_stats_history.csv"))
            if row["Type"] == request_type and row["Name"] == name]


def rates(rows: list[dict[str, float | None]]) -> list[tuple[float, float]]:
    """(time, count per second) between consecutive seconds of the history.

    Derived from Locust's cumulative counts rather than its ``Requests/s`` column, which averages
    over a trailing window that lags the first seconds of a short run.
    """
    latest = sorted({row["t"]: row for row in rows}.values(), key=lambda row: row["t"])  # last row of each second
    return [(b["t"], (b["count"] - a["count"]) / (b["t"] - a["t"])) for a, b in zip(latest, latest[1:])]
