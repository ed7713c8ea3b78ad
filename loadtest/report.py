"""Human-readable reports: one load-test run (summary.md) and a sweep (docs/BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

# Served static-INT8 throughput must reach this share of its in-process ceiling. Judged against the
# pipeline ceiling: a server cannot skip decoding the PNGs it is sent, so the fair in-process
# equivalent does that work too; the model-only ratio is reported beside it.
TARGET_RATIO = 0.85


def machine() -> dict[str, Any]:
    """What the numbers were measured on: they mean little without it."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    versions = {name: metadata.version(name) for name in ("torch", "onnxruntime", "torchserve", "locust")}
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "versions": versions,
            "load_average": [round(load, 2) for load in os.getloadavg()]}


def machine_line(info: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {info['os']}; Python {info['python']}, "
            f"{versions}; load average before the run {info['load_average']}")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def server_line(server: dict[str, Any]) -> str:
    workers = server["workers"]
    return (f"batch size {server['batch_size']}, max batch delay {server['max_batch_delay']} ms, "
            f"{len(workers)} worker(s) ({', '.join(w['status'] for w in workers)}), "
            f"{server['threads']} intra-op thread(s) per worker")


def pinning_line(pinning: dict[str, str] | None) -> str:
    """``pinning`` maps "frontend", "workers" and "locust" to the cores each was pinned to (any may be absent)."""
    if not pinning:
        return "none: server and Locust share every core"
    if "frontend" in pinning and pinning["frontend"] == pinning.get("workers"):
        parts = [f"server (frontend and workers) on cores {pinning['frontend']}"]
    else:
        parts = [f"{label} on cores {pinning[key]}" if key in pinning else f"{label} not pinned by the load tester"
                 for key, label in (("frontend", "frontend"), ("workers", "model workers"))]
    return ", ".join([*parts, f"Locust on cores {pinning['locust']}"])


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def accuracy_cell(summary: dict[str, Any]) -> str:
    """Served accuracy, and how it compares with what the archive was verified at."""
    if summary.get("served_accuracy") is None:
        return "n/a"
    text = f"{_percent(summary['served_accuracy'])} of {summary['answered']} answered images"
    check = summary.get("accuracy_check")
    if check:
        verdict = "consistent" if check["passed"] else "**too low: a wrong model or wrong preprocessing**"
        text += (f" (archive verified at {_percent(check['verified_accuracy'])}, floor for this image pool "
                 f"{_percent(check['floor'])}: {verdict})")
    return text


def run_markdown(summary: dict[str, Any]) -> str:
    latency = summary["latency_ms"]
    rows = [
        ("date", summary["date"]),
        ("command", f"`{summary['command']}`"),
        ("model / variant", f"{summary['model']} / {summary['variant']}"),
        ("server", server_line(summary["server"])),
        ("load", f"{summary['users']} closed-loop users (spawn rate {summary['spawn_rate']}/s), "
                 f"{summary['images_per_request']} image(s) per request over {summary['protocol']}, "
                 f"{summary['run_time_s']} s, {summary['locust_workers'] or 'no'} Locust worker processes"),
        ("pinning", pinning_line(summary["pinning"])),
        ("goodput (images/s answered with their true label)",
         f"{summary['goodput_per_s']:.1f} ({summary['correct']} correct answers)"),
        ("served accuracy", accuracy_cell(summary)),
        ("answered images/s", f"{summary['answered_per_s']:.1f} ({summary['answered']} images)"),
        ("attempted images/s", f"{summary['examples_per_s']:.1f} ({summary['examples']} images sent, "
                               f"{summary['example_failures']} in failed requests)"),
        ("requests/s", f"{summary['requests_per_s']:.1f} ({summary['requests']} requests)"),
        ("latency p50 / p90 / p99 (ms)", " / ".join(_ms(latency[p]) for p in ("p50", "p90", "p99"))),
        ("failures", f"{summary['failures']} of {summary['requests']} requests"),
        ("machine", machine_line(summary["machine"])),
    ]
    lines = [f"# Load test: {summary['model']} ({summary['variant']}) over {summary['protocol']}", "",
             "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    if summary["failure_messages"]:
        lines += ["## Failures", "", *(f"- {message}" for message in summary["failure_messages"]), ""]
    lines += ["![throughput and latency over time](throughput.png)", "",
              f"Locust's own CSV: `{summary['csv_prefix']}_stats.csv` (`EXAMPLES`: images sent, `CORRECT`: images "
              "answered with their true label), `_stats_history.csv`, `_failures.csv`. What each number means: "
              "docs/LOADTEST.md.", ""]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


BENCHMARK_COLUMNS = ("pinning", "variant", "batch", "images/request", "delay ms", "users", "sent/s", "goodput/s",
                     "served accuracy", "p50 ms", "p90 ms", "p99 ms", "failures", "mean batch", "cores busy F/W/O",
                     "model ceiling/s", "served/model", "pipeline ceiling/s", "served/pipeline")
TARGET_COLUMNS = ("variant", "batch", "images/request", "pinning", "served/pipeline", "served/model", "p99 ms",
                  "failures", "served accuracy", "target", "model ms/image", "handler ms/image",
                  "worker CPU ms/served image", "worker loop ms/image", "worker idle")


def cores_busy(cores: dict[str, float] | None) -> str:
    """frontend/workers/other cores busy, e.g. ``0.31/0.98/0.62``."""
    return "n/a" if not cores else "/".join(f"{cores[key]:.2f}" for key in ("frontend", "workers", "other"))


def goodput_cells(run: dict[str, Any]) -> list[str]:
    """Goodput and served accuracy; n/a for runs recorded before the load test checked labels."""
    if run.get("goodput_per_s") is None:
        return ["n/a", "n/a"]
    return [f"{run['goodput_per_s']:.1f}", _percent(run["served_accuracy"])]


def benchmark_row(row: dict[str, Any]) -> list[str]:
    run, ceiling, latency = row["run"], row["ceiling"], row["run"]["latency_ms"]
    return [row["pinning_mode"], run["variant"], str(run["server"]["batch_size"]), str(run["images_per_request"]),
            str(run["server"]["max_batch_delay"]), str(run["users"]), f"{run['examples_per_s']:.1f}",
            *goodput_cells(run), *(_ms(latency[p]) for p in ("p50", "p90", "p99")),
            f"{run['failures']}/{run['requests']}",
            "n/a" if row["mean_batch_images"] is None else f"{row['mean_batch_images']:.1f}",
            cores_busy(row.get("cpu_cores")),
            f"{ceiling['model_images_per_s']:.1f}", _ratio(row["served_over_model"]),
            f"{ceiling['pipeline_images_per_s']:.1f}", _ratio(row["served_over_pipeline"])]


def target_met(row: dict[str, Any]) -> bool:
    """The served/pipeline target, with no failed request and (where checked) accurate answers."""
    check = row["run"].get("accuracy_check")
    return (row["served_over_pipeline"] >= TARGET_RATIO and row["run"]["failures"] == 0
            and (check is None or check["passed"]))


def target_cell(row: dict[str, Any]) -> str:
    if not target_met(row):
        return "**not met**"
    return "**met**" if row["run"].get("accuracy_check") else "**met** (labels not checked)"


def target_row(row: dict[str, Any]) -> list[str]:
    """Whether the row meets the target, and where the worker's core went: CPU per served image against
    the in-process pipeline's, and idling (meaningful only when the worker had its core to itself)."""
    run, cores = row["run"], row.get("cpu_cores")
    model_ms = 1e3 / row["ceiling"]["model_images_per_s"]
    pipeline_ms = 1e3 / row["ceiling"]["pipeline_images_per_s"]
    served = run.get("answered_per_s", run["examples_per_s"])
    worker_ms = 1e3 * cores["workers"] / served if cores and served else None
    idle = f"{max(0.0, 1 - cores['workers']):.0%}" if cores and row["pinning_mode"] == "worker" else "shared core"
    return [run["variant"], str(run["server"]["batch_size"]), str(run["images_per_request"]), row["pinning_mode"],
            _ratio(row["served_over_pipeline"]), _ratio(row["served_over_model"]), _ms(run["latency_ms"]["p99"]),
            str(run["failures"]), goodput_cells(run)[1], target_cell(row),
            f"{model_ms:.2f}", f"{pipeline_ms - model_ms:.2f}", "n/a" if worker_ms is None else f"{worker_ms:.2f}",
            "n/a" if worker_ms is None else f"{worker_ms - pipeline_ms:+.2f}", idle]


def table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *("| " + " | ".join(r) + " |" for r in rows)]


def benchmarks_markdown(sweep: dict[str, Any], data_file: str = "benchmarks.json") -> str:
    """docs/BENCHMARKS.md: the tables, the settings and the commands that reproduce them; the method is
    described once in docs/LOADTEST.md."""
    rows, cores = sweep["rows"], sweep["cores"]
    targets = [target_row(row) for row in rows if row["run"]["variant"] == sweep["target_variant"]]
    settings = [
        ("server", f"the shipped config.properties (token auth on, {sweep['server_note']}), "
                   f"{sweep['model_workers']} worker(s) per model"),
        ("frontend warm-up", f"{sweep['frontend_warm_up_s']} s of load before the first row"),
        ("load", f"Locust `RestUser`, {sweep['users']} closed-loop users, "
                 f"{' or '.join(map(str, sweep['images_per_request']))} image(s) per request from a pool of "
                 f"{sweep['image_pool']} CIFAR-10 test PNGs, {sweep['run_time_s']} s per row"),
        ("cores when pinned", f"server {cores['server']}, Locust {cores['locust']}"),
    ]
    return "\n".join([
        "# Serving benchmarks",
        "",
        f"Generated by `python -m loadtest sweep` on {sweep['date']}; the raw data is in "
        f"[{data_file}]({data_file}). Do not edit by hand: rerun the sweep. How it is measured and what "
        "each column means: [LOADTEST.md](LOADTEST.md).",
        "",
        f"**Machine:** {machine_line(sweep['machine'])}.",
        "",
        "## Results",
        "",
        *table(BENCHMARK_COLUMNS, [benchmark_row(row) for row in rows]),
        "",
        f"## Target: served {sweep['target_variant']} >= {TARGET_RATIO:.0%} of its pipeline ceiling, "
        "no failed request",
        "",
        *(table(TARGET_COLUMNS, targets) if targets else ["No row of the target variant in this sweep."]),
        "",
        "## Settings",
        "",
        *table(("", ""), [[key, value] for key, value in settings]),
        "",
        "## Reproduce",
        "",
        "```bash",
        *sweep["reproduce"],
        "```",
        "",
        "Per-row Locust CSV, summary and throughput plot: `" + sweep["output_dir"]
        + "/<pinning>-<variant>-b<batch>[-i<images per request>]/`.",
        "",
    ])


def main(argv: list[str]) -> int:
    """Render docs/<NAME>.md again from the committed docs/<name>.json, so that report and code agree."""
    for name in argv:
        data = Path(name)
        data.with_name(f"{data.stem.upper()}.md").write_text(benchmarks_markdown(json.loads(data.read_text()),
                                                                                 data.name))
    return 0
