"""``python -m loadtest peers``: TorchServe as shipped against peer servers of the same archive, side by side.

    python -m loadtest peers                                    # docs/PEERS.md + docs/peers.json (make peers)
    python -m loadtest peers --servers torchserve torchserve:workers=1,threads=1 --rounds 2 --report-name ts_options

Each server is started alone (nothing else of ours running), loaded by the same Locust user
(loadtest/peers/locustfile.py: one real CIFAR-10 test PNG per request, closed loop) for a warm-up and
a measured window, then by wrk (loadtest/peers/wrk.py: the same PNGs, as many connections as Locust
has users) alone for a second measured window, and stopped; the servers alternate, in reversed order
every other round, so that a slow drift of the machine does not favour one. Goodput (Locust) counts
correct labels only. The CPU of the server's processes, of the client and of everything else on the
machine is sampled during each measured window, and each round also measures the in-process ceiling
of the archive with the inference processes x threads that every judged server runs.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from clients.tokens import bearer, read_key_file
from loadtest.archive import read_archive
from loadtest.cpu_usage import GroupMeter
from loadtest.images import test_images
from loadtest.locust_csv import entry_stats, find_entry, history, rates, read_rows
from loadtest.peers import wrk
from loadtest.peers.common import GOODPUT, ROUTE
from loadtest.peers.contenders import (
    Contender,
    Running,
    RunningPeer,
    RunningTorchServe,
    parse_contender,
    same_inference,
)
from loadtest.peers.report import peers_markdown
from loadtest.report import machine, write_json
from loadtest.run import bounded, check_data_dir, free_port
from loadtest.sweep import ceiling, shown_path
from server.config import REPO_ROOT
from server.plan import DEFAULT_MODEL, plan_from_environment
from server.processes import family, stop_processes
from training.data import default_data_dir

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_SERVERS = ("torchserve", "fastapi", "litserve", "rayserve", "bentoml")


def locust(url: str, key_file: Path | None, args: argparse.Namespace, seconds: int, csv_prefix: Path,
           log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
               "-r", str(args.users), "-t", f"{seconds}s", "--host", url, "--csv", str(csv_prefix),
               "--csv-full-history", "--only-summary", "--stop-timeout", "10", "--data-dir", args.data_dir,
               "--image-pool", str(args.image_pool), "PeerUser"]
    if key_file is not None:
        command[command.index("PeerUser"):command.index("PeerUser")] = ["--key-file", str(key_file)]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_locust(process: subprocess.Popen, seconds: int, log: Path) -> None:
    """Wait for Locust to finish its run; it is killed if anything (a timeout, Ctrl-C) stops the wait."""
    try:
        code = process.wait(timeout=seconds + 120)
    finally:
        stop_processes(family(process.pid))
    if code not in (0, 1):  # 1: some request failed, which the stats report
        raise RuntimeError(f"locust exited with {code}: {log.read_text()[-2000:]}")


def measure(contender: Contender, args: argparse.Namespace, run_dir: Path, pool: list[bytes]) -> dict[str, Any]:
    """Start one server, warm it up, measure it under Locust's load and then wrk's, each with its CPU, stop it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if contender.kind == "torchserve":
        server: Running = RunningTorchServe(contender, args.model_store, run_dir / "torchserve", args.port_base)
    else:
        server = RunningPeer(contender, args.archive, free_port(), run_dir / "peer", pool[0])
    try:
        print(f"[{run_dir.name}] {contender.name}: {server.inference}, {server.settings}; warm-up {args.warm_up} s",
              flush=True)
        warm_log = run_dir / "locust-warm-up.log"
        wait_locust(locust(server.url, server.key_file, args, args.warm_up, run_dir / "warm-up", warm_log),
                    args.warm_up, warm_log)
        log, prefix = run_dir / "locust.log", run_dir / "locust"
        process = locust(server.url, server.key_file, args, args.run_time, prefix, log)
        with GroupMeter({"server": server.processes(), "client": [psutil.Process(process.pid)]}) as meter:
            wait_locust(process, args.run_time, log)
        wrk_result = measure_wrk(server, args, run_dir, pool) if args.wrk_time else None
    finally:
        server.stop()
    rows = read_rows(Path(f"{prefix}_stats.csv"))
    answers, good = entry_stats(find_entry(rows, "POST", ROUTE)), entry_stats(find_entry(rows, GOODPUT, ROUTE))
    busy = [t for t, rate in rates(history(prefix, "POST", ROUTE)) if rate > 0]
    window = (busy[0] + 1, busy[-1] - 1) if len(busy) > 3 else (0.0, time.time())
    result = {"server": contender.name, "kind": contender.kind, "inference": server.inference, "settings": server.settings,
              "requests": answers["count"], "failures": answers["failures"], "requests_per_s": answers["per_s"],
              "correct": good["count"], "goodput_per_s": good["per_s"], "latency_ms": answers["latency_ms"],
              "cpu_cores": meter.cores(*window), "csv_prefix": str(shown_path(prefix)), "wrk": wrk_result}
    print(f"[{run_dir.name}] {contender.name}: Locust: goodput {result['goodput_per_s']:.1f}/s "
          f"({result['requests_per_s']:.1f} answers/s), p50 {result['latency_ms']['p50']} ms, "
          f"p99 {result['latency_ms']['p99']} ms, failures {result['failures']}, cores {result['cpu_cores']}; "
          f"wrk: {json.dumps(wrk_result)}", flush=True)
    return result


def measure_wrk(server: Running, args: argparse.Namespace, run_dir: Path, pool: list[bytes]) -> dict[str, Any]:
    """wrk alone against the warm server, with the CPU of the server and of wrk in its window."""
    headers = {"Content-Type": "image/png"}
    if server.key_file is not None:
        headers |= bearer(read_key_file(server.key_file)["inference"])
    script = wrk.write_script(pool, headers, run_dir / "wrk")
    log = run_dir / "wrk.log"
    start = time.time()
    process = wrk.start(server.url, script, args.users, args.wrk_threads, args.wrk_time, log)
    with GroupMeter({"server": server.processes(), "client": [psutil.Process(process.pid)]}) as meter:
        try:
            code = process.wait(timeout=args.wrk_time + 60)
        finally:
            stop_processes(family(process.pid))
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}: {log.read_text()[-2000:]}")
    trim = 1 if args.wrk_time >= 4 else 0  # wrk's connecting and closing second, where the window allows it
    return {**wrk.parse(log.read_text()), "cpu_cores": meter.cores(start + trim, start + args.wrk_time - trim)}


def judged_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """The archive in process with the inference processes x threads of the judged servers, at its batch size."""
    processes, threads = next(contender.inference() for contender in args.servers if contender.judged)
    archive = read_archive(args.archive)
    return ceiling(args.archive, int(archive.model_config.get("batchSize", 1)), threads, None,
                   args.ceiling_seconds, args.data_dir, args.image_pool, processes)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", type=parse_contender, default=list(map(parse_contender, DEFAULT_SERVERS)),
                        help="kind[:key=value,...]: torchserve (workers, threads, batch, delay, netty, netty_client, "
                             "micro, async), fastapi (processes, threads), litserve and rayserve (processes, threads, "
                             f"batch, delay), bentoml (processes, threads, batch) (default: {' '.join(DEFAULT_SERVERS)})")
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store",
                        help="TorchServe serves every archive here, as shipped (default: model_store)")
    parser.add_argument("--archive", type=Path, help=f"what the peers serve (default: MODEL_STORE/{DEFAULT_MODEL}.mar)")
    parser.add_argument("--rounds", type=bounded(1, 20), default=3, help="default: 3")
    parser.add_argument("--users", type=bounded(1, 1000), default=16, help="closed-loop Locust users (default: 16)")
    parser.add_argument("--warm-up", type=bounded(1, 600), default=60,
                        help="seconds of load first, for every server: TorchServe's JIT compiler works through "
                             "about the first 60 s (default: 60)")
    parser.add_argument("--run-time", type=bounded(1, 3600), default=30, help="measured seconds of Locust (default: 30)")
    parser.add_argument("--wrk-time", type=bounded(0, 3600), default=30,
                        help="measured seconds of wrk after Locust's; 0 leaves wrk out (default: 30)")
    parser.add_argument("--wrk-threads", type=bounded(1, 64), default=1, help="wrk's threads (default: 1)")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0,
                        help="timed seconds of each in-process ceiling per round; 0 skips it (default: 5)")
    parser.add_argument("--port-base", type=int, default=18300,
                        help="TorchServe listens on this port and the next four (default: 18300)")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--image-pool", type=int, default=256, help="distinct test images cycled (default: 256)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "build" / "loadtest" / "peers")
    parser.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--report-name", default="peers", help="writes DOCS_DIR/NAME.json and NAME in capitals.md")
    return parser


def main(argv: list[str]) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.archive = args.archive or args.model_store / f"{DEFAULT_MODEL}.mar"
    if not args.archive.is_file():
        parser.error(f"{args.archive} not found: run `python -m export` first")
    check_data_dir(parser, args.data_dir)
    try:
        same_inference(args.servers)
    except ValueError as err:
        parser.error(str(err))
    if args.wrk_time and not wrk.available():
        parser.error("wrk not found: install it (apt-get install wrk) or leave it out with --wrk-time 0")
    host_machine, started = machine(), datetime.now().astimezone().isoformat(timespec="seconds")
    pool = list(test_images(args.data_dir, args.image_pool)[0])
    report = {"date": started, "machine": host_machine, "plan": plan_from_environment().__dict__,
              "command": shlex.join(["python", "-m", "loadtest", "peers", *argv]), "users": args.users,
              "warm_up_s": args.warm_up, "run_time_s": args.run_time, "wrk_time_s": args.wrk_time,
              "wrk_threads": args.wrk_threads, "rounds": args.rounds,
              "image_pool": args.image_pool, "archive": str(shown_path(args.archive)),
              "servers": [contender.name for contender in args.servers], "runs": [], "ceilings": []}
    for round_ in range(args.rounds):
        order = args.servers if round_ % 2 == 0 else args.servers[::-1]
        for index, contender in enumerate(order):
            safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", contender.name)  # model-archiver splits paths at commas
            run_dir = args.output_dir / f"round{round_ + 1}-{index + 1}-{safe_name}"
            try:
                result = measure(contender, args, run_dir, pool)
            except Exception as err:  # one server that cannot start must not cost the others' numbers
                print(f"[{run_dir.name}] {contender.name} failed: {err!r}", flush=True)
                result = failed_run(contender, err)
            report["runs"].append({"round": round_ + 1, **result})
            write_report(report, args)  # after every run, so that an interrupted benchmark keeps what it measured
        if args.ceiling_seconds:
            report["ceilings"].append({"round": round_ + 1, **judged_ceiling(args)})
            print(f"[round {round_ + 1}] ceiling: {json.dumps(report['ceilings'][-1])}", flush=True)
            write_report(report, args)
    markdown, data = write_report(report, args)
    print(f"written {markdown} and {data}")
    return 1 if any(run["failures"] or "error" in run or (run["wrk"] or {}).get("non_2xx") for run in report["runs"]) else 0


def failed_run(contender: Contender, err: Exception) -> dict[str, Any]:
    return {"server": contender.name, "kind": contender.kind, "inference": None, "settings": {}, "requests": 0,
            "failures": 0, "requests_per_s": 0.0, "correct": 0, "goodput_per_s": 0.0,
            "latency_ms": {"p50": None, "p99": None}, "cpu_cores": None, "wrk": None, "error": repr(err)[:500]}


def write_report(report: dict[str, Any], args: argparse.Namespace) -> tuple[Path, Path]:
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    data, markdown = args.docs_dir / f"{args.report_name}.json", args.docs_dir / f"{args.report_name.upper()}.md"
    write_json(data, report)
    markdown.write_text(peers_markdown(report, data.name))
    return markdown, data
