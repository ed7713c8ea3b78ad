"""Memory soak: ``python -m loadtest soak`` (``make soak``: 10 minutes, docs/SOAK.md and docs/soak.json).

A TorchServe of its own (shipped config, its own ports, the default model only) under steady Locust
load for ``--minutes``; the resident memory (RSS) of the Java frontend and of every model worker is
sampled every ``--interval`` seconds beside Locust's cumulative request count. After ``--warm-up``
seconds (JIT and heap sizing, allocator arenas, ONNX Runtime's buffers), RSS is fitted against requests served:
the slope is the growth per 100k requests, and growth over the rest of the run is reported as a
percentage of the RSS at the end of the warm-up. A leak shows as a slope that does not go away; the
target is under 5% growth after warm-up (a shrinking RSS meets it).
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtest.cpu_usage import CpuMeter
from loadtest.entries import request_entry
from loadtest.locust_csv import history, run_stats
from loadtest.report import machine, machine_line, write_json
from loadtest.run import LoadSpec, add_own_server_options, run_locust, warm_up
from server.config import free_port_overrides
from server.launcher import TorchServe

MIB = 2**20
TARGET_GROWTH = 0.05
WORKER_SCRIPT = "model_service_worker.py"


@dataclass
class RssSample:
    t: float  # unix time, like Locust's history timestamps
    frontend: int  # bytes
    workers: int  # bytes, summed over the model workers
    worker_pids: tuple[int, ...]


def worker_processes(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The model workers and their decoder children among the frontend's descendants (it also runs a
    metrics collector once a minute): the decoders are forked, so they share the worker's command line."""
    workers = []
    for process in processes:
        try:
            if any(WORKER_SCRIPT in part for part in process.cmdline()):
                workers.append(process)
        except psutil.NoSuchProcess:
            continue
    return workers


def model_workers(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The model workers alone: a decoder (whose parent is a worker) is neither a worker restart when it
    is replaced nor memory of its own, since it shares its worker's pages copy-on-write."""
    found = worker_processes(processes)
    pids = {process.pid for process in found}
    workers = []
    for process in found:
        try:
            if process.ppid() not in pids:
                workers.append(process)
        except psutil.NoSuchProcess:
            continue
    return workers


def rss_sample(server: TorchServe) -> RssSample:
    frontend, *children = server.processes()
    sizes, pids = [], []
    for process in model_workers(children):
        try:
            sizes.append(process.memory_info().rss)
            pids.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return RssSample(time.time(), frontend.memory_info().rss, sum(sizes), tuple(pids))


def sample_until(server: TorchServe, interval: float, stop: threading.Event, samples: list[RssSample]) -> None:
    while not stop.is_set():
        samples.append(rss_sample(server))
        stop.wait(interval)


def growth(times: np.ndarray, rss: np.ndarray, served: np.ndarray) -> dict[str, float]:
    """RSS after warm-up against requests served: least-squares slope per 100k requests, and the fitted
    change over the window relative to the first sample (so one noisy sample cannot decide it)."""
    slope, intercept = np.polyfit(served, rss, 1)
    start, end = intercept + slope * served[0], intercept + slope * served[-1]
    return {"rss_start_mib": round(float(rss[0]) / MIB, 1), "rss_end_mib": round(float(rss[-1]) / MIB, 1),
            "rss_max_mib": round(float(rss.max()) / MIB, 1),
            "mib_per_100k_requests": round(float(slope) * 100_000 / MIB, 2),
            "growth_percent": round(float((end - start) / start) * 100, 2), "seconds": round(float(times[-1] - times[0]), 1)}


def analyse(samples: list[RssSample], counts: list[dict[str, Any]], warm_up_until: float) -> dict[str, Any]:
    """Growth of frontend and workers between the end of the warm-up and the end of the load."""
    ts = np.array([row["t"] for row in counts])
    totals = np.array([row["count"] for row in counts])
    window = [s for s in samples if warm_up_until <= s.t <= ts[-1]]
    if len(window) < 3:
        raise RuntimeError("too few samples after the warm-up: run longer or sample more often")
    times = np.array([s.t for s in window])
    served = np.interp(times, ts, totals)
    result = {name: growth(times, np.array([getattr(s, name) for s in window], dtype=float), served)
              for name in ("frontend", "workers")}
    result["requests_after_warm_up"] = int(served[-1] - served[0])
    result["worker_restarts"] = len({s.worker_pids for s in samples}) - 1
    return result


def markdown(report: dict[str, Any]) -> str:
    g = report["growth"]
    rows = ["| process | RSS after warm-up | RSS at the end | max | growth (fitted) | per 100k requests | target < 5% |",
            "|---|---|---|---|---|---|---|"]
    for name in ("frontend", "workers"):
        r = g[name]
        rows.append(f"| {name} | {r['rss_start_mib']} MiB | {r['rss_end_mib']} MiB | {r['rss_max_mib']} MiB "
                    f"| {r['growth_percent']:+.2f}% | {r['mib_per_100k_requests']:+.2f} MiB "
                    f"| {'met' if r['growth_percent'] < TARGET_GROWTH * 100 else 'NOT met'} |")
    run, cores = report["run"], report["cpu_cores"]
    return "\n".join([
        f"Run {report['date']}: `{report['command']}`", "",
        f"Machine: {machine_line(report['machine'])}.",
        (f"Other load: {report['other_cpu_percent_before']:.0f}% of the machine busy before the run; during it the "
         f"frontend kept {cores['frontend']} cores busy, the worker {cores['workers']}, everything else (Locust, "
         f"other users of the machine) {cores['other']}.") if cores else "", "",
        (f"{report['users']} Locust users for {report['minutes']} min on {report['model']}: {run['requests']} requests "
         f"({run['requests_per_s']:.0f}/s), {run['failures']} failed; {g['requests_after_warm_up']} requests after the "
         f"{report['warm_up_s']} s warm-up; worker restarts: {g['worker_restarts']}."), "",
        *rows, ""])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_own_server_options(parser, port_base=18410, report_name="soak")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of steady load (default: 10)")
    # The frontend's JVM sized its heap for ~5 minutes of the first 10-minute soak before its RSS went flat.
    parser.add_argument("--warm-up", type=float, default=300.0, help="seconds not counted in the growth (default: 300)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples (default: 5)")
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    command = "python -m loadtest soak " + " ".join(argv)
    host, other_load = machine(), psutil.cpu_percent(interval=2.0)
    samples: list[RssSample] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        server = TorchServe(workdir=Path(scratch), model_store=args.model_store,
                            overrides=free_port_overrides(args.port_base) | {"load_models": f"{args.model}.mar"})
        server.start(wait_for=[args.model])
        try:
            spec = LoadSpec.against(server, args.model, users=args.users, run_time_s=round(args.minutes * 60),
                                    data_dir=args.data_dir)
            warm_up(spec, server.key_ring)
            output = Path(scratch) / "locust"
            output.mkdir()
            stop = threading.Event()
            sampler = threading.Thread(target=sample_until, args=(server, args.interval, stop, samples), daemon=True)
            frontend, *children = server.processes()
            with CpuMeter(frontend, worker_processes(children)) as meter:
                start = time.time()
                sampler.start()
                prefix = run_locust(spec, output)
                stop.set()
                sampler.join()
        finally:
            server.stop()
        entry = request_entry("rest", args.model)
        counts = history(prefix, *entry)
        report = {
            "date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
            "machine": host, "other_cpu_percent_before": other_load,
            "cpu_cores": meter.cores(counts[0]["t"], counts[-1]["t"]),
            "model": args.model, "users": args.users, "minutes": args.minutes, "warm_up_s": args.warm_up,
            "interval_s": args.interval, "run": run_stats(prefix, *entry, args.model),
            "growth": analyse(samples, counts, start + args.warm_up),
            "samples": [{"t": round(s.t, 1), "requests": round(float(np.interp(s.t, [c["t"] for c in counts],
                                                                             [c["count"] for c in counts]))),
                         "frontend_mib": round(s.frontend / MIB, 1),
                         "workers_mib": round(s.workers / MIB, 1), "worker_pids": list(s.worker_pids)} for s in samples],
        }
    write_json(args.report_dir / "soak.json", report)
    (args.report_dir / "SOAK.md").write_text(markdown(report))
    print(markdown(report))
    met = all(report["growth"][name]["growth_percent"] < TARGET_GROWTH * 100 for name in ("frontend", "workers"))
    return 0 if met and report["run"]["failures"] == 0 else 1
