"""Worker faults under load, measured: ``python -m loadtest faults`` (``make faults`` writes docs/FAULTS.md).

A TorchServe of its own (shipped config, its own ports) serves a copy of the archive whose
``responseTimeout`` is short, under steady Locust load. In the middle of the run its model worker is
killed (SIGKILL, as the OOM killer or a crash would), and later hung: SIGSTOP freezes it holding a
batch, exactly as a deadlocked handler would, until TorchServe's response timeout kills and
replaces it. No code path in the handler can be made to hang on purpose, so nothing here is a
back door. For each fault: seconds until a new worker is READY and answers correctly, and how many
requests failed (Locust's own history).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

from clients.tokens import bearer
from loadtest.archive import read_archive, rewrite
from loadtest.entries import request_entry
from loadtest.images import test_images
from loadtest.locust_csv import read_rows, run_stats
from loadtest.report import machine, write_json
from loadtest.run import LoadSpec, add_own_server_options, run_locust, warm_up
from server.config import free_port_overrides
from server.launcher import TorchServe
from training.data import CIFAR10

FAULTS = ("kill", "hang")


def with_response_timeout(archive: Path, store: Path, seconds: int) -> Path:
    """A copy of ``archive`` in ``store`` whose model-config.yaml has ``responseTimeout: seconds``.

    The shipped archives wait 60 s for a batch; a hang test should not have to.
    """
    def longer(config: bytes) -> bytes:
        return yaml.safe_dump(yaml.safe_load(config) | {"responseTimeout": seconds}, sort_keys=False).encode()

    return rewrite(archive, store / archive.name, {read_archive(archive).config_file: longer})


def ready_pids(server: TorchServe, model: str) -> list[int]:
    return [worker["pid"] for worker in server.describe(model)["workers"] if worker["status"] == "READY"]


def answers(server: TorchServe, model: str, image: bytes, label: str) -> bool:
    try:
        response = requests.post(f"{server.inference_url}/predictions/{model}", data=image, timeout=30,
                                 headers=bearer(server.keys["inference"]) | {"Content-Type": "image/png"})
    except requests.RequestException:
        return False
    return response.status_code == 200 and response.json()["label"] == label


def gone(process: psutil.Process | int) -> bool:
    """Exited (a zombie has exited too: it only waits for its parent to collect the status).

    Pass the Process object where you have one: it also tells a reused pid from the original process.
    """
    try:
        process = process if isinstance(process, psutil.Process) else psutil.Process(process)
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Recovery:
    """One injected fault: when, which worker, and when a new one was READY and answering."""

    fault: str
    started: float  # unix time, like Locust's history timestamps
    old_pid: int
    new_pid: int | None = None
    recovered: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.recovered is None else round(self.recovered - self.started, 2)


def inject(server: TorchServe, model: str, fault: str, probe: tuple[bytes, str], timeout: float) -> Recovery:
    """Kill or hang the model's worker, then wait until a *new* worker is READY and classifies ``probe`` right.

    A hung worker must also be gone (TorchServe kills it at the response timeout); should it outlive
    ``timeout``, it is killed here so that no stopped process is left behind.
    """
    (pid,) = ready_pids(server, model)
    recovery = Recovery(fault, time.time(), pid)
    os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            new = [p for p in ready_pids(server, model) if p != pid]
            if new and gone(pid) and answers(server, model, *probe):
                recovery.new_pid, recovery.recovered = new[0], time.time()
                return recovery
            time.sleep(0.2)
        return recovery
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def failures_between(csv_prefix: Path, request_type: str, name: str, start: float, end: float) -> dict[str, int]:
    """Requests and failures Locust recorded from the second before ``start`` to the second after ``end``."""
    rows = [row for row in read_rows(Path(f"{csv_prefix}_stats_history.csv"))
            if row["Type"] == request_type and row["Name"] == name]
    before = [row for row in rows if float(row["Timestamp"]) <= start - 1] or rows[:1]
    after = [row for row in rows if float(row["Timestamp"]) >= end + 1] or rows[-1:]
    first, last = before[-1], after[0]
    return {"requests": int(last["Total Request Count"]) - int(first["Total Request Count"]),
            "failures": int(last["Total Failure Count"]) - int(first["Total Failure Count"]),
            "window_s": round(float(last["Timestamp"]) - float(first["Timestamp"]), 1)}


def markdown(report: dict[str, Any]) -> str:
    rows = ["| fault | how | recovered in | requests in the window | failed | new worker |", "|---|---|---|---|---|---|"]
    how = {"kill": "SIGKILL to the worker", "hang": f"SIGSTOP past responseTimeout {report['response_timeout_s']} s"}
    for fault in report["faults"]:
        seconds = "not recovered" if fault["seconds"] is None else f"{fault['seconds']:.1f} s"
        rows.append(f"| {fault['fault']} | {how[fault['fault']]} | {seconds} | {fault['window']['requests']} "
                    f"| {fault['window']['failures']} | {fault['old_pid']} -> {fault['new_pid']} |")
    run = report["run"]
    failures = "; ".join(re.sub(r"(\\n|\s)+", " ", message) for message in run["failure_messages"])
    return "\n".join([
        f"Run {report['date']} on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
        f"other load before the run: {report['other_cpu_percent']:.0f}% of the machine busy, load average "
        f"{report['machine']['load_average']}.",
        f"Command: `{report['command']}`", "",
        f"{report['users']} Locust users, {report['run_time_s']} s, model {report['model']} (batch "
        f"{report['batch_size']}); whole run: {run['requests']} requests, {run['failures']} failed "
        f"({failures or 'none'}).", "",
        *rows, ""])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_own_server_options(parser, port_base=18400, report_name="faults")
    parser.add_argument("--run-time", type=int, default=120, help="seconds of Locust load (default: 120)")
    parser.add_argument("--kill-at", type=float, default=25.0, help="seconds into the load (default: 25)")
    parser.add_argument("--hang-at", type=float, default=70.0, help="seconds into the load (default: 70)")
    parser.add_argument("--response-timeout", type=int, default=10, help="the copy's responseTimeout (default: 10)")
    parser.add_argument("--recovery-timeout", type=float, default=120.0)
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    command = "python -m loadtest faults " + " ".join(argv)
    host, other_load = machine(), psutil.cpu_percent(interval=2.0)
    pngs, classes = test_images(args.data_dir, 1)
    probe = (pngs[0], classes[CIFAR10(args.data_dir, train=False).targets[0]])  # a cat, and every variant says so
    with tempfile.TemporaryDirectory(prefix="faults-") as scratch:
        store = Path(scratch) / "store"
        with_response_timeout(args.model_store / f"{args.model}.mar", store, args.response_timeout)
        server = TorchServe(workdir=Path(scratch), model_store=store,
                            overrides=free_port_overrides(args.port_base) | {"load_models": "all"})
        server.start(wait_for=[args.model])
        try:
            spec = LoadSpec.against(server, args.model, users=args.users, run_time_s=args.run_time,
                                    data_dir=args.data_dir)
            warm_up(spec, server.key_ring)
            output = Path(scratch) / "locust"
            output.mkdir()
            locust = threading.Thread(target=lambda: setattr(locust, "prefix", run_locust(spec, output)))
            start = time.time()
            locust.start()
            recoveries = []
            for fault, at in sorted(zip(FAULTS, (args.kill_at, args.hang_at)), key=lambda item: item[1]):
                time.sleep(max(0.0, start + at - time.time()))
                recoveries.append(inject(server, args.model, fault, probe, args.recovery_timeout))
                print(f"{fault}: {recoveries[-1]}", flush=True)
            locust.join()
            batch_size = server.describe(args.model)["batchSize"]
        finally:
            server.stop()
        entry = request_entry("rest", args.model)
        report = {
            "date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
            "machine": host, "other_cpu_percent": other_load, "model": args.model, "batch_size": batch_size,
            "users": args.users, "run_time_s": args.run_time, "response_timeout_s": args.response_timeout,
            "run": run_stats(locust.prefix, *entry, args.model),
            "faults": [asdict(r) | {"seconds": r.seconds,
                                    "window": failures_between(locust.prefix, *entry, r.started, r.recovered or time.time())}
                       for r in recoveries],
        }
    write_json(args.report_dir / "faults.json", report)
    (args.report_dir / "FAULTS.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r.recovered is not None for r in recoveries) else 1
