"""``python -m loadtest.experiments.client_cost``: TorchServe's CPU per answer under Locust and under wrk,
alternating on one warm server, by process group and by kind of frontend thread (docs/SERVING.md,
"Against the peers").

    python -m loadtest.experiments.client_cost --pairs 3 --seconds 30

The peers benchmark measured more CPU per answer under Locust than under wrk minutes later on the same
server. Here the two clients take turns on one server (the peers' Locust user and wrk script, the same
16 users or connections), so that a difference that persists is the client's and not the machine's or
the round's; each window prints answers/s, the frontend's and the workers' CPU per answer, and the
frontend's busiest kinds of thread, read from /proc.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

from clients.tokens import bearer, read_key_file
from loadtest.cpu_profile import measure_window, thread_cpu, thread_groups
from loadtest.cpu_usage import GroupMeter
from loadtest.images import test_images
from loadtest.locust_csv import entry_stats, find_entry, read_rows
from loadtest.peers import wrk
from loadtest.peers.bench import locust, wait_locust
from loadtest.peers.common import ROUTE
from loadtest.peers.contenders import RunningTorchServe, parse_contender
from loadtest.run import bounded, check_data_dir
from server.config import REPO_ROOT
from training.data import default_data_dir

TOP = 3


def locust_window(server: RunningTorchServe, args: argparse.Namespace, frontend: psutil.Process,
                  workers: list[psutil.Process], prefix: Path) -> dict[str, object]:
    """One Locust window, measured as ``cpu_profile.measure_window`` measures a wrk window."""
    process = locust(server.url, server.key_file, args, args.seconds, prefix, prefix.with_suffix(".log"))
    start = time.time()
    threads_before = thread_cpu(frontend.pid)
    with GroupMeter({"frontend": [frontend], "workers": workers, "locust": [psutil.Process(process.pid)]}) as meter:
        wait_locust(process, args.seconds, prefix.with_suffix(".log"))
    threads = thread_groups(threads_before, thread_cpu(frontend.pid))
    answers = entry_stats(find_entry(read_rows(Path(f"{prefix}_stats.csv")), "POST", ROUTE))
    cores = meter.cores(start + 2, start + args.seconds - 1) or {}
    return {"answers_per_s": answers["per_s"], "p99": answers["latency_ms"]["p99"],
            "cpu_ms_per_answer": {group: round(1000 * busy / answers["per_s"], 2) for group, busy in cores.items()},
            "frontend_threads_ms_per_answer": {name: round(1000 * seconds / max(answers["count"], 1), 3)
                                               for name, seconds in threads.most_common(TOP) if seconds > 0}}


def line(client: str, window: int, result: dict) -> str:
    cpu = result["cpu_ms_per_answer"]
    top = ", ".join(f"{name} {ms:.3f}" for name, ms in result["frontend_threads_ms_per_answer"].items())
    p99 = result.get("p99", result.get("latency_ms", {}).get("p99"))
    return (f"[{client} {window}] {result['answers_per_s']:.1f} answers/s, p99 {p99} ms; CPU ms per answer: "
            f"frontend {cpu.get('frontend', float('nan')):.2f}, workers {cpu.get('workers', float('nan')):.2f}, "
            f"other {cpu.get('other', float('nan')):.2f} ({top})")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.experiments.client_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=bounded(1, 100), default=3, help="Locust-then-wrk pairs (default: 3)")
    parser.add_argument("--seconds", type=bounded(5, 600), default=30, help="seconds per window (default: 30)")
    parser.add_argument("--warm-up", type=bounded(1, 3600), default=60, help="seconds of wrk first (default: 60)")
    parser.add_argument("--users", type=bounded(1, 1000), default=16, help="Locust users = wrk connections (default: 16)")
    parser.add_argument("--image-pool", type=bounded(1, 10000), default=256)
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--port-base", type=int, default=18460)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "build" / "loadtest" / "client_cost")
    return parser


def main(argv: list[str]) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_data_dir(parser, args.data_dir)
    if not wrk.available():
        parser.error("wrk not found: install it (apt-get install wrk)")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    args.connections = args.users
    server = RunningTorchServe(parse_contender("torchserve"), args.model_store, args.output_dir / "torchserve",
                               args.port_base)
    try:
        headers = {"Content-Type": "image/png"} | bearer(read_key_file(server.key_file)["inference"])
        script = wrk.write_script(list(test_images(args.data_dir, args.image_pool)[0]), headers, args.output_dir / "wrk")
        wrk.start(server.url, script, args.users, 1, args.warm_up, args.output_dir / "warm-up.log").wait()
        processes = server.processes()  # after the first requests, which fork the workers' decoders
        (frontend,) = [process for process in processes if process.name() == "java"]
        workers = [process for process in processes if process is not frontend]
        for pair in range(1, args.pairs + 1):
            print(line("locust", pair, locust_window(server, args, frontend, workers, args.output_dir / f"locust{pair}")),
                  flush=True)
            print(line("wrk", pair, measure_window(server.url, script, args, frontend, workers,
                                                     args.output_dir / f"wrk{pair}.log")), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
