"""One bounded, headless Locust run against a TorchServe on 127.0.0.1, and its summary.

    python -m loadtest --users 16 --run-time 30 --images-per-request 1
    python -m loadtest --workers 2 ...      # distributed: a Locust master and 2 workers on 127.0.0.1

Defaults point at the running production server (config.properties' addresses, ./key_file.json).
Writes into --output-dir Locust's CSV (``locust_stats.csv`` ... ), ``summary.json``, ``summary.md``
and ``throughput.png``. Exits non-zero if any request failed or the served accuracy is below what the
served archive was verified at (see loadtest.check.accuracy_floor).
"""
from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from clients.tokens import KeyRing
from loadtest.affinity import format_cpus, parse_cpus, preexec
from loadtest.archive import read_archive
from loadtest.check import accuracy_floor
from loadtest.entries import USER_CLASSES, request_entry
from loadtest.images import test_images
from loadtest.locust_csv import run_stats
from loadtest.plot import plot_history
from loadtest.report import machine, run_markdown, write_json
from server.config import REPO_ROOT, SHIPPED_CONFIG, parse_properties
from server.launcher import TorchServe
from server.processes import family, stop_processes
from training.data import default_data_dir

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MAX_USERS = 1000
MAX_RUN_TIME_S = 3600
WARMUP_ROUNDS = 4  # warm-up requests per concurrent sender


@dataclass
class LoadSpec:
    """Everything a run needs; the CLI and the sweep build one each."""

    host: str
    management: str
    grpc_target: str
    key_file: Path
    model: str
    protocol: str = "rest"
    images_per_request: int = 1
    users: int = 8
    spawn_rate: float | None = None  # None: all users at once
    run_time_s: int = 20
    workers: int = 0  # Locust worker processes; 0 runs Locust in one process
    locust_cpus: set[int] | None = None
    data_dir: str = default_data_dir()
    image_pool: int = 256

    @classmethod
    def against(cls, server: TorchServe, model: str, **load: Any) -> LoadSpec:
        """Load on a TorchServe this process started: its addresses and its key file."""
        return cls(host=server.inference_url, management=server.management_url,
                   grpc_target=server.grpc_inference_target, key_file=server.key_file, model=model, **load)

    def __post_init__(self) -> None:
        if not 1 <= self.users <= MAX_USERS:
            raise ValueError(f"users must be 1..{MAX_USERS}, got {self.users}")
        if not 1 <= self.run_time_s <= MAX_RUN_TIME_S:
            raise ValueError(f"run time must be 1..{MAX_RUN_TIME_S} s, got {self.run_time_s}")
        if self.protocol == "grpc" and self.images_per_request != 1:
            raise ValueError("gRPC requests carry one image: --images-per-request 1")


def add_own_server_options(parser: argparse.ArgumentParser, port_base: int, report_name: str) -> None:
    """The options of a run that starts a TorchServe of its own (faults, soak): what it serves, on which
    ports, under how many Locust users, and where its report goes."""
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--model", default="cifar10")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--port-base", type=int, default=port_base, help=f"ports PORT_BASE..+4 (default: {port_base})")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--report-dir", type=Path, default=REPO_ROOT / "build" / report_name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def locust_commands(spec: LoadSpec, csv_prefix: Path) -> list[list[str]]:
    """The Locust command lines: one local process, or a master followed by its workers."""
    options = ["--model", spec.model, "--images-per-request", str(spec.images_per_request),
               "--key-file", str(spec.key_file), "--management-url", spec.management, "--grpc-target", spec.grpc_target,
               "--data-dir", str(spec.data_dir), "--image-pool", str(spec.image_pool)]
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *options]
    run = ["--headless", "-u", str(spec.users), "-r", str(spec.spawn_rate or spec.users), "-t", f"{spec.run_time_s}s",
           "--host", spec.host, "--csv", str(csv_prefix), "--csv-full-history", "--only-summary",
           "--stop-timeout", "10", USER_CLASSES[spec.protocol]]
    if not spec.workers:
        return [base + run]
    port = str(free_port())
    master = base + ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
                     "--expect-workers", str(spec.workers), "--expect-workers-max-wait", "120"] + run
    worker = base + ["--worker", "--master-host", "127.0.0.1", "--master-port", port, USER_CLASSES[spec.protocol]]
    return [master] + [worker] * spec.workers


def run_locust(spec: LoadSpec, output_dir: Path) -> Path:
    """Run Locust (pinned to ``spec.locust_cpus``), logs beside its CSV; returns the CSV prefix."""
    csv_prefix = output_dir / "locust"
    commands = locust_commands(spec, csv_prefix)
    names = ["locust"] if len(commands) == 1 else ["locust-master",
                                                   *(f"locust-worker-{i}" for i in range(spec.workers))]
    processes = []
    for name, command in zip(names, commands):
        with open(output_dir / f"{name}.log", "w") as log:
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                              preexec_fn=preexec(spec.locust_cpus)))
    deadline = spec.run_time_s + 180  # spawning, waiting for workers, stop timeout, writing CSV
    try:
        code = processes[0].wait(timeout=deadline)
        for worker in processes[1:]:
            worker.wait(timeout=30)  # workers quit when their master does
    finally:
        stop_processes(process for popen in processes for process in family(popen.pid))
    # Locust exits 1 when a request failed; that is a result, reported in the summary, not a crash.
    if code not in (0, 1) or not Path(f"{csv_prefix}_stats.csv").is_file():
        log = (output_dir / f"{names[0]}.log").read_text()[-3000:]
        raise RuntimeError(f"locust exited with {code}; last log lines:\n{log}")
    return csv_prefix


def warm_up(spec: LoadSpec, keys: KeyRing) -> None:
    """Concurrent requests before the timed window, so that it never includes first-call costs
    (torch.jit profiling runs, ONNX Runtime arena growth). Over REST whatever the protocol: the same
    worker serves both."""
    pool, _ = test_images(spec.data_dir, spec.image_pool)
    url = f"{spec.host}/predictions/{spec.model}"
    senders = min(spec.users, 32)

    def send(index: int) -> None:
        for round_ in range(WARMUP_ROUNDS):
            image = pool[(index * WARMUP_ROUNDS + round_) % len(pool)]
            keys.request("inference", "POST", url, data=image, headers={"Content-Type": "image/png"},
                         timeout=120).raise_for_status()

    with ThreadPoolExecutor(senders) as executor:
        list(executor.map(send, range(senders)))


def server_info(management: str, keys: KeyRing, model: str, model_store: Path) -> dict[str, Any]:
    """Batch settings and workers from the management API; variant and threads from the archive it serves."""
    response = keys.request("management", "GET", f"{management}/models/{model}", timeout=30)
    response.raise_for_status()
    described = response.json()[0]
    archive_path = model_store / described["modelUrl"]
    archive = read_archive(archive_path) if archive_path.is_file() else None
    return {
        "model": described["modelName"], "archive": str(archive_path) if archive else described["modelUrl"],
        "variant": archive.variant if archive else "unknown (archive not in --model-store)",
        "threads": archive.threads if archive else "unknown",
        "verified_accuracy": archive.metadata.get("verification", {}).get("accuracy") if archive else None,
        "batch_size": described["batchSize"], "max_batch_delay": described["maxBatchDelay"],
        "min_workers": described["minWorkers"], "max_workers": described["maxWorkers"],
        "workers": [{"pid": w.get("pid"), "status": w["status"]} for w in described["workers"]],
    }


def load_test(spec: LoadSpec, output_dir: Path, model_store: Path, command: str,
              pinning: dict[str, str] | None = None, warm: bool = True) -> dict[str, Any]:
    """Warm up (unless the caller did), run Locust, and write summary.json, summary.md and throughput.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    keys = KeyRing(spec.key_file, spec.management)
    server = server_info(spec.management, keys, spec.model, model_store)
    host_machine = machine()
    if warm:
        warm_up(spec, keys)
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    csv_prefix = run_locust(spec, output_dir)
    entry = request_entry(spec.protocol, spec.model)
    summary = {
        "date": date, "command": command, "model": spec.model, "variant": server["variant"], "server": server,
        **{key: value for key, value in asdict(spec).items() if key not in ("key_file", "locust_cpus", "workers")},
        "spawn_rate": spec.spawn_rate or spec.users, "locust_workers": spec.workers, "pinning": pinning,
        **run_stats(csv_prefix, *entry, spec.model), "csv_prefix": str(csv_prefix), "machine": host_machine,
    }
    summary["accuracy_check"] = accuracy_check(summary, spec.image_pool)
    write_json(output_dir / "summary.json", summary)
    (output_dir / "summary.md").write_text(run_markdown(summary))
    plot_history(csv_prefix, entry, spec.model, output_dir / "throughput.png",
                 f"{spec.model} ({server['variant']}), batch {server['batch_size']}, {spec.users} users")
    return summary


def accuracy_check(stats: dict[str, Any], image_pool: int) -> dict[str, Any] | None:
    """Served accuracy against the archive's verified test accuracy; None when either is unknown."""
    expected, served = stats["server"].get("verified_accuracy"), stats["served_accuracy"]
    if expected is None or served is None:
        return None
    floor = accuracy_floor(expected, min(image_pool, stats["answered"]))
    return {"verified_accuracy": expected, "floor": floor, "passed": served >= floor}


def passed(summary: dict[str, Any]) -> bool:
    """No failed request, something answered, and the answers as accurate as the served archive was verified."""
    check = summary["accuracy_check"]
    return not summary["failures"] and summary["answered"] > 0 and (check is None or check["passed"])


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high]: every run stays bounded in users and time."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {value}")
        return value
    return parse


def add_load_arguments(parser: argparse.ArgumentParser, several_image_counts: bool = False) -> None:
    """Load options shared with the sweep, which may take several images-per-request values (one row each)."""
    load = parser.add_argument_group("load")
    load.add_argument("--users", type=bounded(1, MAX_USERS), default=16,
                      help=f"concurrent closed-loop users, 1..{MAX_USERS} (default: 16)")
    load.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    load.add_argument("--run-time", type=bounded(1, MAX_RUN_TIME_S), default=30,
                      help=f"seconds, 1..{MAX_RUN_TIME_S} (default: 30)")
    load.add_argument("--images-per-request", type=bounded(1, 64), default=[1] if several_image_counts else 1,
                      nargs="+" if several_image_counts else None,
                      help="images per request, sent as multipart fields when more than one (default: 1)")
    load.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py "
                      "(default: $CIFAR10_ROOT or ./data)")
    load.add_argument("--image-pool", type=int, default=256, help="distinct test images cycled (default: 256)")


def check_data_dir(parser: argparse.ArgumentParser, data_dir: str) -> None:
    if not (Path(data_dir) / "cifar-10-batches-py" / "test_batch").is_file():
        parser.error(f"CIFAR-10 test batch not found under {data_dir}: pass --data-dir or set $CIFAR10_ROOT "
                     "to the directory holding cifar-10-batches-py")


def get_args_parser() -> argparse.ArgumentParser:
    config = parse_properties(SHIPPED_CONFIG.read_text())
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="python -m loadtest sweep --help: the benchmark sweep (docs/BENCHMARKS.md)")
    target = parser.add_argument_group("server (defaults: config.properties)")
    target.add_argument("--host", default=config["inference_address"], help="inference URL (default: %(default)s)")
    target.add_argument("--management", default=config["management_address"],
                        help="management URL (default: %(default)s)")
    target.add_argument("--grpc-target", default=f"{config['grpc_inference_address']}:{config['grpc_inference_port']}",
                        help="gRPC inference host:port (default: %(default)s)")
    target.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                        help="key_file.json of the running server (default: %(default)s)")
    target.add_argument("--model-store", type=Path, default=REPO_ROOT / config["model_store"],
                        help="where the served archive is, to report its variant (default: the repository's)")
    target.add_argument("--model", default="cifar10", help="model name (default: %(default)s)")
    target.add_argument("--protocol", choices=sorted(USER_CLASSES), default="rest", help="default: %(default)s")
    add_load_arguments(parser)
    parser.add_argument("--locust-cpus", type=parse_cpus, help="pin Locust to these cores, e.g. 0 or 0-1")
    parser.add_argument("--workers", type=bounded(0, 64), default=0,
                        help="distributed Locust: a master plus this many worker processes on 127.0.0.1 (default: 0)")
    parser.add_argument("--output-dir", type=Path,
                        help="default: build/loadtest/<model>-<protocol>-<timestamp>")
    return parser


def main(argv: list[str]) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.protocol == "grpc" and args.images_per_request != 1:
        parser.error("gRPC requests carry one image: --images-per-request 1")
    if not args.key_file.is_file():
        parser.error(f"{args.key_file} not found: pass the key_file.json of the running server (--key-file); "
                     "TorchServe writes it into the directory it was started from")
    check_data_dir(parser, args.data_dir)
    spec = LoadSpec(host=args.host, management=args.management, grpc_target=args.grpc_target, key_file=args.key_file,
                    model=args.model, protocol=args.protocol, images_per_request=args.images_per_request,
                    users=args.users, spawn_rate=args.spawn_rate, run_time_s=args.run_time, workers=args.workers,
                    locust_cpus=args.locust_cpus, data_dir=args.data_dir, image_pool=args.image_pool)
    run_name = f"{args.model}-{args.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = args.output_dir or REPO_ROOT / "build" / "loadtest" / run_name
    pinning = {"locust": format_cpus(args.locust_cpus)} if args.locust_cpus else None
    try:
        summary = load_test(spec, output_dir, args.model_store, shlex.join(["python", "-m", "loadtest", *argv]),
                            pinning)
    except requests.ConnectionError as err:
        parser.exit(2, f"error: cannot reach TorchServe ({err.request.url if err.request else args.host}): "
                       "is it running, and are --host/--management right?\n")
    print((output_dir / "summary.md").read_text())
    print(f"written to {output_dir}")
    return 0 if passed(summary) else 1
