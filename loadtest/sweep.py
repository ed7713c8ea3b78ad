"""Benchmark sweep: every variant x batch setting (x pinning mode) on one TorchServe, with its ceilings.

    python -m loadtest sweep                                   # docs/BENCHMARKS.md + docs/benchmarks.json
    python -m loadtest sweep --variants onnx_int8_static --batch-sizes 8 --pinning split --run-time 20

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

import requests

from export.variants import VARIANTS, model_name
from handlers.server import REPO_ROOT, TorchServe, bearer, free_port_overrides
from loadtest.affinity import PINNING_MODES, Placement, affinities, default_split, format_cpus, parse_cpus, pin, placement
from loadtest.archive import read_archive
from loadtest.cpu_usage import CpuMeter
from loadtest.entries import EXAMPLES
from loadtest.locust_csv import history, rates
from loadtest.report import benchmarks_markdown, machine, write_json
from loadtest.run import LoadSpec, add_load_arguments, check_data_dir, load_test, warm_up

TARGET_VARIANT = "onnx_int8_static"
BATCH_LINE = re.compile(r"batch of (\d+) request\(s\), (\d+) image\(s\)")
REGISTER_TIMEOUT_S = 300


def register(server: TorchServe, name: str, batch_size: int, max_batch_delay: int, workers: int) -> None:
    """Register ``name``.mar with these batch settings and workers (they override its model-config.yaml)."""
    params = {"url": f"{name}.mar", "model_name": name, "batch_size": batch_size, "max_batch_delay": max_batch_delay,
              "initial_workers": workers, "synchronous": "true"}
    response = requests.post(f"{server.management_url}/models", params=params,
                             headers=bearer(server.keys["management"]), timeout=REGISTER_TIMEOUT_S)
    if not response.ok:
        raise RuntimeError(f"registering {name}.mar failed: HTTP {response.status_code} {response.text}")


def unregister(server: TorchServe, name: str) -> None:
    response = requests.delete(f"{server.management_url}/models/{name}", headers=bearer(server.keys["management"]),
                               timeout=REGISTER_TIMEOUT_S)
    response.raise_for_status()


def ceiling(archive: Path, batch_size: int, threads: int, cpus: set[int] | None, seconds: float, data_dir: str,
            image_pool: int) -> dict[str, Any]:
    """loadtest.ceiling in a fresh process, pinned like the server, so no thread pool of this one interferes."""
    command = [sys.executable, "-m", "loadtest.ceiling", str(archive), "--batch-size", str(batch_size),
               "--threads", str(threads), "--seconds", str(seconds), "--data-dir", data_dir,
               "--image-pool", str(image_pool)]
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


def measure_row(server: TorchServe, args: argparse.Namespace, mode: str, cores: Placement,
                variant: str, batch_size: int) -> dict[str, Any]:
    """One table row; the model is unregistered again whatever happens, so the next row starts clean."""
    name = model_name(variant)
    archive_path = args.model_store / f"{name}.mar"
    label = f"{mode}-{variant}-b{batch_size}"
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
        limits = ceiling(archive_path, batch_size * args.images_per_request, read_archive(archive_path).threads,
                         ceiling_cpus, args.ceiling_seconds, args.data_dir, args.image_pool)
        spec = LoadSpec(host=server.inference_url, management=server.management_url,
                        grpc_target=server.grpc_inference_target, key_file=server.workdir / "key_file.json",
                        model=name, images_per_request=args.images_per_request, users=args.users,
                        spawn_rate=args.spawn_rate, run_time_s=args.run_time, locust_cpus=cores.locust,
                        data_dir=args.data_dir, image_pool=args.image_pool)
        warm_up(spec, server.keys["inference"])
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
           "served_over_model": run["examples_per_s"] / limits["model_images_per_s"],
           "served_over_pipeline": run["examples_per_s"] / limits["pipeline_images_per_s"]}
    print(f"[{label}] {run['examples_per_s']:.1f} examples/s, p99 {run['latency_ms']['p99']} ms, "
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
    parser.add_argument("--port-base", type=int, default=18200,
                        help="the sweep's TorchServe listens on this port and the next four (default: 18200)")
    add_load_arguments(parser)
    parser.set_defaults(run_time=30)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "build" / "loadtest" / "sweep",
                        help="per-row Locust CSV, summaries and plots (default: build/loadtest/sweep)")
    parser.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs",
                        help="BENCHMARKS.md and benchmarks.json go here (default: docs)")
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
        for mode in args.pinning:
            for variant in args.variants:
                for batch_size in args.batch_sizes:
                    rows.append(measure_row(server, args, mode, placement(mode, args.server_cpus, args.locust_cpus),
                                            variant, batch_size))
    finally:
        server.stop()
    command = shlex.join(["python", "-m", "loadtest", "sweep", *argv])
    sweep = {
        "date": started, "machine": host_machine, "command": command,
        "reproduce": ["python -m export    # model_store/cifar10_<variant>.mar, see docs/EXPORT.md", command],
        "cores": {"server": format_cpus(args.server_cpus), "locust": format_cpus(args.locust_cpus)},
        "server_note": f"model API enabled, ports {args.port_base}-{args.port_base + 4}",
        "users": args.users, "images_per_request": args.images_per_request, "run_time_s": args.run_time,
        "image_pool": args.image_pool, "target_variant": TARGET_VARIANT,
        "output_dir": str(shown_path(args.output_dir)), "rows": rows,
    }
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.docs_dir / "benchmarks.json", sweep)
    (args.docs_dir / "BENCHMARKS.md").write_text(benchmarks_markdown(sweep))
    print(f"written {args.docs_dir / 'BENCHMARKS.md'} and {args.docs_dir / 'benchmarks.json'}")
    return 1 if any(row["run"]["failures"] for row in rows) else 0
