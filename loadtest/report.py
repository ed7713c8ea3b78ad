"""Human-readable reports: one load-test run (summary.md) and a sweep (docs/BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from loadtest.affinity import PINNING_MODES

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
        ("examples/s", f"{summary['examples_per_s']:.1f} ({summary['examples']} examples)"),
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
              f"Locust's own CSV: `{summary['csv_prefix']}_stats.csv` (the `EXAMPLES` row counts images), "
              "`_stats_history.csv`, `_failures.csv`.", ""]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


BENCHMARK_COLUMNS = ("pinning", "variant", "batch", "images/request", "delay ms", "users", "examples/s", "p50 ms",
                     "p90 ms", "p99 ms", "failures", "mean batch", "cores busy F/W/O", "model ceiling/s", "served/model",
                     "pipeline ceiling/s", "served/pipeline")


def cores_busy(cores: dict[str, float] | None) -> str:
    """frontend/workers/other cores busy, e.g. ``0.31/0.98/0.62``."""
    return "n/a" if not cores else "/".join(f"{cores[key]:.2f}" for key in ("frontend", "workers", "other"))


def benchmark_row(row: dict[str, Any]) -> list[str]:
    run, ceiling, latency = row["run"], row["ceiling"], row["run"]["latency_ms"]
    return [row["pinning_mode"], run["variant"], str(run["server"]["batch_size"]), str(run["images_per_request"]),
            str(run["server"]["max_batch_delay"]), str(run["users"]), f"{run['examples_per_s']:.1f}",
            *(_ms(latency[p]) for p in ("p50", "p90", "p99")), f"{run['failures']}/{run['requests']}",
            "n/a" if row["mean_batch_images"] is None else f"{row['mean_batch_images']:.1f}",
            cores_busy(row.get("cpu_cores")),
            f"{ceiling['model_images_per_s']:.1f}", _ratio(row["served_over_model"]),
            f"{ceiling['pipeline_images_per_s']:.1f}", _ratio(row["served_over_pipeline"])]


def busy_sentence(row: dict[str, Any]) -> str:
    """Where the worker's core went: CPU per served image against the in-process pipeline's, and idling."""
    cores, served = row.get("cpu_cores"), row["run"]["examples_per_s"]
    if not cores or not served:
        return ""
    worker_ms = 1e3 * cores["workers"] / served
    pipeline_ms = 1e3 / row["ceiling"]["pipeline_images_per_s"]
    if row["pinning_mode"] == "worker":  # the worker had its core to itself: not busy means waiting
        waiting = f"With its core to itself, the worker sat idle {max(0.0, 1 - cores['workers']):.0%} of the time."
    else:
        waiting = "The worker shared its core(s) with the frontend" + (" and Locust." if row["pinning_mode"] == "none"
                                                                        else ".")
    return (f" Cores busy: frontend {cores['frontend']:.2f}, worker {cores['workers']:.2f}, everything else "
            f"{cores['other']:.2f}. The worker spent {worker_ms:.2f} ms of CPU per served image against "
            f"{pipeline_ms:.2f} ms for the same handler in process: {worker_ms - pipeline_ms:+.2f} ms per image "
            "went to TorchServe's Python worker loop (reading the batch from the frontend, metrics, writing "
            f"the answers). {waiting}")


def target_lines(rows: list[dict[str, Any]], target_variant: str) -> list[str]:
    """Whether the served static-INT8 deployment keeps TARGET_RATIO of its pipeline ceiling with zero failures."""
    lines = []
    for row in rows:
        run = row["run"]
        if run["variant"] != target_variant:
            continue
        met = row["served_over_pipeline"] >= TARGET_RATIO and run["failures"] == 0
        model_ms = 1e3 / row["ceiling"]["model_images_per_s"]
        handler_ms = 1e3 / row["ceiling"]["pipeline_images_per_s"] - model_ms
        lines.append(f"- {target_variant}, batch {run['server']['batch_size']}, {run['images_per_request']} image(s) "
                     f"per request, pinning {row['pinning_mode']}: "
                     f"served/pipeline {_ratio(row['served_over_pipeline'])} (served/model "
                     f"{_ratio(row['served_over_model'])}), p99 {_ms(run['latency_ms']['p99'])} ms, "
                     f"{run['failures']} failed requests: **{'met' if met else 'not met'}**. In process the "
                     f"handler's own work (decode, transforms, softmax, JSON) costs {handler_ms:.2f} ms per image "
                     f"beside the model's {model_ms:.2f} ms.{busy_sentence(row)}")
    return lines


def benchmarks_markdown(sweep: dict[str, Any], data_file: str = "benchmarks.json") -> str:
    """docs/BENCHMARKS.md: the table, how it was measured, and the commands that reproduce it."""
    rows = sweep["rows"]
    header = "| " + " | ".join(BENCHMARK_COLUMNS) + " |"
    table = [header, "|" + "---|" * len(BENCHMARK_COLUMNS), *("| " + " | ".join(benchmark_row(r)) + " |" for r in rows)]
    cores = sweep["cores"]
    return "\n".join([
        "# Serving benchmarks",
        "",
        f"Generated by `python -m loadtest sweep` on {sweep['date']}; the raw data is in "
        f"[{data_file}]({data_file}). Do not edit by hand: rerun the sweep.",
        "",
        f"**Machine:** {machine_line(sweep['machine'])}.",
        "",
        "## Results",
        "",
        *table,
        "",
        f"**Target** (served static INT8 >= {TARGET_RATIO:.0%} of its in-process pipeline ceiling, zero failures):",
        "",
        *(target_lines(rows, sweep["target_variant"]) or ["- no static-INT8 row in this sweep"]),
        "",
        "## How it was measured",
        "",
        f"- One TorchServe (the shipped config.properties: token auth on, {sweep['server_note']}) started empty; "
        "for each row the variant's archive from the model store is registered through the management API "
        f"with the row's batch size and max batch delay ({sweep['model_workers']} worker(s), the archive's "
        "`handler.threads` intra-op threads), warmed up, load-tested, then unregistered. The frontend logs "
        "through the shipped `log4j2.xml` (one access-log line per request; TorchServe's built-in config "
        "writes ~10 DEBUG/INFO lines per prediction on the thread that feeds the worker).",
        f"- Frontend warm-up: before the first row the fresh server is loaded for {sweep['frontend_warm_up_s']} s "
        "(split over the images-per-request values), because the JVM's JIT compiler keeps a core ~15% busy for "
        "about the first 40 s under load; a row measured during it loses up to ~10% of its throughput.",
        f"- Load: Locust (`loadtest/locustfile.py`, `RestUser`), {sweep['users']} closed-loop users, "
        f"{' or '.join(map(str, sweep['images_per_request']))} real CIFAR-10 test PNG(s) per request (the images/request column; "
        "several are sent as multipart fields, one model row each) cycled from a pool of "
        f"{sweep['image_pool']}, {sweep['run_time_s']} s per row after a concurrent warm-up. Every answer is "
        "checked (label, 10 probabilities summing to 1); a wrong answer is a failure. Throughput is "
        "examples (images) per second from Locust's own CSV (`EXAMPLES` row); latency percentiles are "
        "per request, from the same CSV (Locust rounds them to 2 significant digits).",
        "- **mean batch**: images per model call on the worker during the run, from the handler's "
        "\"batch of N request(s), M image(s)\" log lines: shows whether the batch setting was actually used.",
        "- **model ceiling**: the serialized model from the same archive (unzipped), run in-process by ONNX "
        "Runtime or torch.jit at the row's model batch (batch x images/request) and the worker's thread count "
        "on already decoded, "
        "normalised images: no decode, no HTTP, no IPC. **served/model** is the share of the model's own "
        "speed the deployment delivers; everything else is counted as serving cost.",
        "- **pipeline ceiling**: the archive's own handler called in-process on the same PNGs at the same model "
        "batch and threads (decode, resize, normalise, model, softmax, JSON), without the TorchServe frontend. "
        "**served/pipeline** isolates the cost of the server itself (HTTP, batching, frontend-worker IPC).",
        "- Each ceiling is the fastest of 5 equal windows of its timed seconds, not their mean: a disturbance on "
        "this shared machine only ever slows a window down, and a lowered ceiling would flatter the ratios.",
        "- **cores busy F/W/O**: average cores kept busy during the steady part of the run (Locust's history "
        "minus a second at each end) by the TorchServe frontend (JVM), the model worker, and everything else "
        "on the machine (Locust, mostly), from the processes' CPU times sampled every 0.5 s. A worker near "
        "1.00 on its own core means the model's core was saturated; what it spent beyond the ceiling's "
        "share went to TorchServe's Python worker loop and IPC.",
        f"- **pinning** (sched_setaffinity on every thread; workers forked later inherit the frontend's mask, "
        "so the masks are re-applied after each registration; the ceilings are measured on the workers' "
        f"cores, unpinned for `none`): **`split`**: {PINNING_MODES['split']} (server cores {cores['server']}, "
        f"Locust cores {cores['locust']}). **`worker`**: {PINNING_MODES['worker']}. **`none`**: "
        f"{PINNING_MODES['none']}. On a machine this small the load generator competes with the server "
        "unless pinned.",
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
