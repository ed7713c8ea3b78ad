"""Benchmark sweep: every variant x batch setting x images per request (x pinning mode) on one TorchServe,
with its ceilings.

    python -m loadtest sweep                                   # docs/BENCHMARKS.md + docs/benchmarks.json
    python -m loadtest sweep --variants onnx_int8_static --batch-sizes 8 --pinning split --run-time 20
    python -m loadtest sweep --batch-sizes 4 --images-per-request 8 --report-name benchmarks_multi_image

Starts its own TorchServe (the shipped config, token auth on, model API enabled, nothing loaded at
start, its own ports) so that it never disturbs a running server. For each row it registers the
variant's archive from --model-store with the row's batch size and delay, pins the server, measures
the in-process ceilings on the server's cores, warms up, runs Locust, reads the achieved batch sizes
from the worker log and unregisters.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from export.variants import VARIANTS, model_name
from loadtest.affinity import (
    PINNING_MODES,
    Placement,
    affinities,
    default_split,
    format_cpus,
    parse_cpus,
    pin,
    placement,
)
from loadtest.archive import read_archive
from loadtest.cpu_usage import CpuMeter
from loadtest.entries import EXAMPLES
from loadtest.locust_csv import history, rates
from loadtest.report import benchmarks_markdown, machine, write_json
from loadtest.run import LoadSpec, add_load_arguments, check_data_dir, load_test, passed, warm_up
from server.config import REPO_ROOT, free_port_overrides
from server.launcher import TorchServe

TARGET_VARIANT = "onnx_int8_static"
BATCH_LINE = re.compile(r"batch of (\d+) request\(s\), (\d+) image\(s\)")
REGISTER_TIMEOUT_S = 300


def register(server: TorchServe, name: str, batch_size: int, max_batch_delay: int, workers: int) -> None:
    """Register ``name``.mar with these batch settings and workers (they override its model-config.yaml)."""
    params = {"url": f"{name}.mar", "model_name": name, "batch_size": batch_size, "max_batch_delay": max_batch_delay,
              "initial_workers": workers, "synchronous": "true"}
    response = server.call("management", "POST", f"{server.management_url}/models", params=params,
                           timeout=REGISTER_TIMEOUT_S)
    if not response.ok:
        raise RuntimeError(f"registering {name}.mar failed: HTTP {response.status_code} {response.text}")


def unregister(server: TorchServe, name: str) -> None:
    response = server.call("management", "DELETE", f"{server.management_url}/models/{name}",
                           timeout=REGISTER_TIMEOUT_S)
    response.raise_for_status()


def ceiling(archive: Path, batch_size: int, threads: int, cpus: set[int] | None, seconds: float, data_dir: str,
            image_pool: int, processes: int = 1) -> dict[str, Any]:
    """loadtest.ceiling in fresh processes (as many as the server's workers), pinned like the server, so no
    thread pool of this one interferes."""
    command = [sys.executable, "-m", "loadtest.ceiling", str(archive), "--batch-size", str(batch_size),
               "--threads", str(threads), "--seconds", str(seconds), "--data-dir", data_dir,
               "--image-pool", str(image_pool), "--processes", str(processes)]
    if cpus:
        command += ["--cpus", format_cpus(cpus)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"ceiling of {archive} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mean_batch(log_text: str) -> tuple[float | None, float | None]:
    """(requests, images) per model call, from the handler's "batch of N request(s), M image(s)" lines."""
    batches = [(int(n), int(m)) for n, m in BATCH_LINE.findall(log_text)]
    if not batches:
        return None, None
    return sum(n for n, _ in batches) / len(batches), sum(m for _, m in batches) / len(batches)


def load_window(csv_prefix: Path, model: str) -> tuple[float, float]:
    """Unix times of the seconds in which Locust sent load, trimmed by a second at each end (ramp, stop)."""
    busy = [t for t, rate in rates(history(csv_prefix, EXAMPLES, model)) if rate > 0]
    return (busy[0] + 1, busy[-1] - 1) if busy else (0.0, 0.0)


def load_spec(server: TorchServe, args: argparse.Namespace, name: str, images_per_request: int, seconds: int,
              locust_cpus: set[int] | None) -> LoadSpec:
    return LoadSpec.against(server, name, images_per_request=images_per_request, users=args.users,
                            spawn_rate=args.spawn_rate, run_time_s=seconds, locust_cpus=locust_cpus,
                            data_dir=args.data_dir, image_pool=args.image_pool)


def warm_frontend(server: TorchServe, args: argparse.Namespace) -> None:
    """Load the fresh server for --frontend-warm-up seconds before the first row, unpinned.

    The frontend is a JVM: under load its JIT compiler keeps a core ~15% busy for the first ~40 s
    (measured per thread from /proc), on the cores the rows measure. The JIT's work is per
    server, not per model, so one warm-up serves every row.
    """
    variant = TARGET_VARIANT if TARGET_VARIANT in args.variants else args.variants[0]
    name = model_name(variant)
    seconds = max(1, args.frontend_warm_up // len(args.images_per_request))  # raw bodies and multipart: both paths
    register(server, name, max(args.batch_sizes), args.max_batch_delay, 1)
    try:
        for images in args.images_per_request:
            print(f"[frontend warm-up] {seconds} s of load on {name}, {images} image(s) per request", flush=True)
            load_test(load_spec(server, args, name, images, seconds, None), args.output_dir / f"frontend-warm-up-i{images}",
                      args.model_store, "python -m loadtest sweep (frontend warm-up)")
    finally:
        unregister(server, name)


def measure_row(server: TorchServe, args: argparse.Namespace, mode: str, cores: Placement,
                variant: str, batch_size: int, images_per_request: int) -> dict[str, Any]:
    """One table row; the model is unregistered again whatever happens, so the next row starts clean."""
    name = model_name(variant)
    archive_path = args.model_store / f"{name}.mar"
    label = f"{mode}-{variant}-b{batch_size}" + (f"-i{images_per_request}" if images_per_request > 1 else "")
    print(f"[{label}] registering {archive_path.name}", flush=True)
    register(server, name, batch_size, args.max_batch_delay, args.model_workers)
    try:
        frontend, *workers = server.processes()
        pin([frontend], cores.frontend)  # workers forked since inherited the frontend's mask: pin them after it
        pin(workers, cores.workers)
        affinity = affinities(server.processes())
        ceiling_cpus = cores.workers if cores.locust is not None else None
        print(f"[{label}] ceilings on cores {format_cpus(ceiling_cpus or cores.workers)}", flush=True)
        # the model sees batch size x images per request images per call: the ceilings run at that batch
        limits = ceiling(archive_path, batch_size * images_per_request, read_archive(archive_path).threads,
                         ceiling_cpus, args.ceiling_seconds, args.data_dir, args.image_pool, args.model_workers)
        spec = load_spec(server, args, name, images_per_request, args.run_time, cores.locust)
        warm_up(spec, server.key_ring)
        log_start = len(server.log_text())
        print(f"[{label}] load test: {args.users} users, {args.run_time} s", flush=True)
        with CpuMeter(frontend, workers) as meter:
            run = load_test(spec, args.output_dir / label, args.model_store, f"python -m loadtest sweep ({label})",
                            cores.report(), warm=False)
        batch_requests, batch_images = mean_batch(server.log_text()[log_start:])
    finally:
        unregister(server, name)
    row = {"pinning_mode": mode, "affinity": affinity, "run": run, "ceiling": limits,
           "mean_batch_requests": batch_requests, "mean_batch_images": batch_images,
           "cpu_cores": meter.cores(*load_window(Path(run["csv_prefix"]), name)),
           # answered images against the ceilings' answered images; goodput and served accuracy stand beside
           "served_over_model": run["answered_per_s"] / limits["model_images_per_s"],
           "served_over_pipeline": run["answered_per_s"] / limits["pipeline_images_per_s"]}
    print(f"[{label}] {run['answered_per_s']:.1f} answered images/s, goodput {run['goodput_per_s']:.1f}/s "
          f"(served accuracy {run['served_accuracy']}), p99 {run['latency_ms']['p99']} ms, "
          f"{run['failures']} failures, served/pipeline {row['served_over_pipeline']:.0%}, "
          f"served/model {row['served_over_model']:.0%}, cores busy {row['cpu_cores']}", flush=True)
    return row


def shown_path(path: Path) -> Path:
    """Relative to the repository when inside it, so that the committed report names no home directory."""
    path = path.resolve()
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store",
                        help="archives cifar10_<variant>.mar from `python -m export` (default: model_store)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="default: 1 8")
    parser.add_argument("--max-batch-delay", type=int, default=10, help="ms (default: 10)")
    parser.add_argument("--model-workers", type=int, default=1,
                        help="worker processes per model, all on the workers' cores (default: 1)")
    parser.add_argument("--pinning", nargs="+", choices=PINNING_MODES, default=list(PINNING_MODES),
                        help="; ".join(f"{mode}: {text}" for mode, text in PINNING_MODES.items())
                             + " (default: all three)")
    server_default, locust_default = default_split() if (os.cpu_count() or 1) > 1 else (set(), set())
    parser.add_argument("--server-cpus", type=parse_cpus, default=server_default,
                        help="cores of the workers and of the ceilings when pinned "
                             f"(default: {format_cpus(server_default)})")
    parser.add_argument("--locust-cpus", type=parse_cpus, default=locust_default,
                        help=f"cores of Locust when pinned (default: {format_cpus(locust_default)})")
    parser.add_argument("--ceiling-seconds", type=float, default=10.0, help="timed seconds per ceiling (default: 10)")
    parser.add_argument("--frontend-warm-up", type=int, default=45,
                        help="seconds of load on the fresh server before the first row, so that the frontend JVM's "
                             "JIT compilation is over before anything is measured; 0 skips it (default: 45)")
    parser.add_argument("--port-base", type=int, default=18200,
                        help="the sweep's TorchServe listens on this port and the next four (default: 18200)")
    add_load_arguments(parser, several_image_counts=True)
    parser.set_defaults(run_time=30)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "build" / "loadtest" / "sweep",
                        help="per-row Locust CSV, summaries and plots (default: build/loadtest/sweep)")
    parser.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs",
                        help="the report and its data go here (default: docs)")
    parser.add_argument("--report-name", default="benchmarks",
                        help="writes <DOCS_DIR>/<NAME>.json and <NAME in capitals>.md (default: benchmarks)")
    return parser


def main(argv: list[str]) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    missing = [f"{model_name(variant)}.mar" for variant in args.variants
               if not (args.model_store / f"{model_name(variant)}.mar").is_file()]
    if missing:
        parser.error(f"{', '.join(missing)} not in {args.model_store}: run `python -m export` first")
    check_data_dir(parser, args.data_dir)
    if set(args.pinning) - {"none"} and (not args.server_cpus or not args.locust_cpus):
        parser.error("pinning needs at least two cores (--server-cpus and --locust-cpus)")
    host_machine, started = machine(), datetime.now().astimezone().isoformat(timespec="seconds")
    server = TorchServe(workdir=args.output_dir / "torchserve", model_store=args.model_store,
                        overrides=free_port_overrides(args.port_base) | {"load_models": ""}, enable_model_api=True)
    server.start()
    rows = []
    try:
        if args.frontend_warm_up:
            warm_frontend(server, args)
        for mode in args.pinning:
            cores = placement(mode, args.server_cpus, args.locust_cpus)
            for variant in args.variants:
                for batch_size in args.batch_sizes:
                    for images in args.images_per_request:
                        rows.append(measure_row(server, args, mode, cores, variant, batch_size, images))
    finally:
        server.stop()
    command = shlex.join(["python", "-m", "loadtest", "sweep", *argv])
    sweep = {
        "date": started, "machine": host_machine, "command": command,
        "reproduce": ["python -m export    # model_store/cifar10_<variant>.mar, see docs/EXPORT.md", command],
        "cores": {"server": format_cpus(args.server_cpus), "locust": format_cpus(args.locust_cpus)},
        "server_note": f"model API enabled, ports {args.port_base}-{args.port_base + 4}",
        "frontend_warm_up_s": args.frontend_warm_up, "model_workers": args.model_workers, "users": args.users,
        "images_per_request": args.images_per_request, "run_time_s": args.run_time,
        "image_pool": args.image_pool, "target_variant": TARGET_VARIANT,
        "output_dir": str(shown_path(args.output_dir)), "rows": rows,
    }
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    data, report = args.docs_dir / f"{args.report_name}.json", args.docs_dir / f"{args.report_name.upper()}.md"
    write_json(data, sweep)
    report.write_text(benchmarks_markdown(sweep, data.name))
    print(f"written {report} and {data}")
    return 0 if all(passed(row["run"]) for row in rows) else 1
