"""Replicas behind one load balancer, under steady load, through stops, a credential rotation and model updates:
``python -m loadtest replicas`` (``make replicas`` writes docs/replicas.json and docs/REPLICAS.md).

Real parts only: ``--replicas`` supervised replicas (server.supervisor: TorchServe, its authenticating
HAProxy, health, renewer) plus one spare, a front HAProxy health-checking their ``/ready`` as a
Kubernetes Service would (loadtest.balancer), and one Locust run through it for the whole benchmark,
with one client key. Each scenario is a step taken under that load; its requests, failures and p99
come from Locust's own history between the step's start and end:

- a: one replica stopped with SIGTERM (it drains), then started again;
- b: the spare replica added, then the client credential rotated (add the new key, move the
  clients, remove the old one);
- d: a bad v2 (labels rotated by one class) rolled out to every replica: refused by the rollout's
  accuracy check, v1 serving throughout;
- c: a good v2 rolled out to every replica (clients.rollout), then every replica replaced in turn
  (SIGTERM, started again with v2 as its archive).
"""
from __future__ import annotations

import argparse
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import requests

from clients.grpc_client import TorchServeGrpc
from clients.rollout import held_out_images, rollout
from loadtest.archive import read_archive, rewrite
from loadtest.balancer import Balancer
from loadtest.entries import request_entry
from loadtest.faults import failures_between
from loadtest.locust_csv import history, run_stats
from loadtest.report import machine, machine_line, table, write_json
from loadtest.run import LoadSpec, locust_commands
from server.config import REPO_ROOT
from server.processes import family, stop_processes
from server.proxy import Runtime, write_private
from server.replica import Replica
from training.data import default_data_dir

MODEL = "cifar10"
LOCUST_MAX_S = 3600


def versioned(source: Path, target: Path, version: str, rotate_labels: bool = False) -> Path:
    """A copy of the archive ``source`` declaring model version ``version``; with ``rotate_labels`` its
    class list is shifted by one (every answer names the next class: a wrong model that loads and answers)."""
    contents = read_archive(source)

    def manifest(data: bytes) -> bytes:
        loaded = json.loads(data)
        loaded["model"]["modelVersion"] = version
        return json.dumps(loaded).encode()

    def metadata(data: bytes) -> bytes:
        loaded = json.loads(data)
        loaded["classes"] = loaded["classes"][1:] + loaded["classes"][:1]
        return json.dumps(loaded).encode()

    edits = {"MAR-INF/MANIFEST.json": manifest} | ({contents.metadata_file: metadata} if rotate_labels else {})
    return rewrite(source, target, edits)


def accepted_everywhere(replicas: list[Replica], keys_file: Path, expected: set[str], timeout: float = 30.0) -> None:
    """Wait until the proxy of every running replica accepts exactly ``expected``."""
    deadline = time.monotonic() + timeout
    for replica in replicas:
        runtime = Runtime(replica.workdir / "proxy" / "haproxy.sock")
        while runtime.accepted_keys(keys_file) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica.name}'s proxy does not accept the keys of {keys_file} yet")
            time.sleep(0.2)


def rotate(replicas: list[Replica], keys_file: Path, old: str) -> str:
    """Rotate the client credential with no refused request: the new key accepted everywhere first, then
    the clients moved to it (the first line is the one they send), then the old key removed."""
    new = secrets.token_urlsafe(24)
    write_private(keys_file, f"{old}\n{new}\n")
    accepted_everywhere(replicas, keys_file, {old, new})
    write_private(keys_file, f"{new}\n{old}\n")  # clients re-read the file when it changes
    time.sleep(3)  # every client sends at least once in between
    write_private(keys_file, f"{new}\n")
    accepted_everywhere(replicas, keys_file, {new})
    return new


def roll_out(replicas: list[Replica], archive: Path, images: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
    """clients.rollout on every replica in turn, as an operator would (kubectl exec into each pod)."""
    outcomes = []
    for replica in replicas:
        with TorchServeGrpc(replica.grpc_inference_target, replica.grpc_management_target, replica.keys()) as client:
            outcomes.append(asdict(rollout(client, archive, images)) | {"replica": replica.name})
    return outcomes


def default_versions(replicas: list[Replica]) -> dict[str, str]:
    versions = {}
    for replica in replicas:
        with TorchServeGrpc(replica.grpc_inference_target, replica.grpc_management_target, replica.keys()) as client:
            versions[replica.name] = client.describe(MODEL)[0]["modelVersion"]
    return versions


def replace(replica: Replica, balancer: Balancer, running: list[Replica], load_models: str | None = None) -> dict[str, Any]:
    """SIGTERM one replica, wait for its drained exit, start it again (with ``load_models``) and back in the balancer."""
    started = time.monotonic()
    replica.terminate()
    code = replica.wait()
    stopped = time.monotonic() - started
    if load_models:
        replica.load_models = load_models
        replica.properties["load_models"] = load_models
    replica.start()
    balancer.wait_until({r.name for r in running})
    return {"replica": replica.name, "exit_code": code, "stop_s": round(stopped, 1),
            "back_in_s": round(time.monotonic() - started, 1)}


def window(prefix: Path, start: float, end: float) -> dict[str, Any]:
    """Requests, failures and the highest of Locust's rolling p99 between ``start`` and ``end``."""
    entry = request_entry("rest", MODEL)
    counts = failures_between(prefix, *entry, start, end)
    p99s = [row["p99"] for row in history(prefix, *entry) if start <= row["t"] <= end + 1 and row["p99"] is not None]
    return counts | {"p99_ms": max(p99s) if p99s else None, "seconds": round(end - start, 1)}


class Load:
    """One Locust process through the balancer for the whole benchmark, stopped with SIGTERM (it writes its CSV)."""

    def __init__(self, spec: LoadSpec, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.prefix = directory / "locust"
        (command,) = locust_commands(spec, self.prefix)
        with open(directory / "locust.log", "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_flowing(self, seconds: float, timeout: float = 180.0) -> None:
        """Until Locust has sent requests for ``seconds``."""
        deadline = time.monotonic() + timeout
        entry = request_entry("rest", MODEL)
        while True:
            path = Path(f"{self.prefix}_stats_history.csv")
            rows = history(self.prefix, *entry) if path.exists() else []
            rows = [row for row in rows if row["count"] > 0]
            if rows and rows[-1]["t"] - rows[0]["t"] >= seconds:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Locust is not sending; see {self.prefix.parent / 'locust.log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        finally:
            stop_processes(family(self.process.pid))


def markdown(report: dict[str, Any]) -> str:
    rows = [[s["name"], s["what"], str(s["requests"]), str(s["failures"]),
             "n/a" if s["p99_ms"] is None else f"{s['p99_ms']:.0f}", f"{s['seconds']:.0f}"] for s in report["scenarios"]]
    run = report["run"]
    return "\n".join([
        "# Replicas behind one load balancer: stops, a credential rotation, model updates",
        "",
        f"Generated by `{report['command']}` on {report['date']}; raw data in [replicas.json](replicas.json). "
        "How it works and how to operate it: [DEPLOY.md](DEPLOY.md#several-replicas-one-credential).",
        "",
        f"**Machine:** {machine_line(report['machine'])}; {report['load_average_after']} after it. The machine "
        "is shared with other work: timings (p99, step seconds) vary with it; the failure counts do not.",
        "",
        f"**Setup:** {report['replicas']} replicas (+1 added in b), each `python -m server.supervisor` (TorchServe "
        f"with {report['workers']} `cifar10` worker, its HAProxy checking the client key), a front HAProxy "
        f"health-checking `/ready` every 0.5 s; Locust `RestUser`, {report['users']} users, one client key, "
        f"through the front for the whole run; drain delay {report['drain_s']} s.",
        "",
        *table(("scenario", "step", "requests", "failed", "p99 ms (Locust's rolling 10 s p99, highest in the step)",
                "step s"), rows),
        "",
        f"Whole run: {run['requests']} requests, {run['failures']} failed"
        + (f" ({'; '.join(run['failure_messages'])})" if run["failure_messages"] else "")
        + f", served accuracy {100 * (run['served_accuracy'] or 0):.1f}% on the {report['image_pool']}-image pool.",
        "",
        "Rollout checks (held-out images, accuracy and the floor from the export's recorded accuracy):",
        "",
        *[f"- {o['replica']} {o['old_version']} -> {o['new_version']}: "
          + ("done" if o["succeeded"] else f"refused: {o['reason']}")
          + (f" (accuracy {100 * o['accuracy']:.1f}%)" if o.get("accuracy") is not None else "")
          for s in report["scenarios"] for o in s.get("rollouts", [])],
        "",
    ])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--port-base", type=int, default=19500, help="balancer on PORT_BASE and +1, replicas above")
    parser.add_argument("--drain-s", type=float, default=3.0, help="each replica's drain delay (default: 3)")
    parser.add_argument("--check-images", type=int, default=200, help="held-out images per rollout check")
    parser.add_argument("--image-pool", type=int, default=256)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--report-dir", type=Path, default=REPO_ROOT / "build" / "replicas")
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    command = "python -m loadtest replicas " + " ".join(argv)
    host = machine()
    images = held_out_images(args.data_dir, args.check_images)
    with tempfile.TemporaryDirectory(prefix="replicas-") as scratch_name:
        scratch = Path(scratch_name)
        store = scratch / "store"
        store.mkdir()
        (store / f"{MODEL}.mar").symlink_to((args.model_store / f"{MODEL}.mar").resolve())
        good = versioned(args.model_store / f"{MODEL}.mar", store / f"{MODEL}_v2.mar", "2.0")
        bad = versioned(args.model_store / f"{MODEL}.mar", store / f"{MODEL}_v2_rotated.mar", "2.0", rotate_labels=True)
        keys_file = scratch / "client-keys"
        key = secrets.token_urlsafe(24)
        write_private(keys_file, f"{key}\n")
        replicas = [Replica(f"r{i}", scratch / f"r{i}", store, keys_file, args.port_base + 10 * (i + 1),
                            drain_s=args.drain_s) for i in range(args.replicas + 1)]
        running, spare = replicas[:-1], replicas[-1]
        balancer = Balancer(scratch / "balancer", args.port_base, args.port_base + 1, replicas)
        scenarios: list[dict[str, Any]] = []
        load = None
        try:
            starters = [threading.Thread(target=replica.start) for replica in running]
            for thread in starters:
                thread.start()
            for thread in starters:
                thread.join()
            balancer.start().wait_until({r.name for r in running}, timeout=60)
            spec = LoadSpec(host=balancer.rest_url, management="", grpc_target=balancer.grpc_target,
                            key_file=keys_file, model=MODEL, users=args.users, run_time_s=LOCUST_MAX_S,
                            data_dir=args.data_dir, image_pool=args.image_pool)
            load = Load(spec, scratch / "locust")
            load.wait_flowing(10)

            def step(name: str, what: str, action: Any) -> None:
                time.sleep(5)  # steady load between steps
                start = time.time()
                details = action()
                end = time.time()
                time.sleep(2)  # Locust's history one second past the step
                scenarios.append({"name": name, "what": what, "start": start, "end": end, **details})
                print(f"{name}: {what}: {json.dumps(details)[:400]}", flush=True)

            step("a", f"SIGTERM to {running[0].name} (drain, exit), then started again",
                 lambda: {"replacement": replace(running[0], balancer, running)})

            def add_and_rotate() -> dict[str, Any]:
                started = time.monotonic()
                spare.start()
                running.append(spare)
                balancer.wait_until({r.name for r in running})
                added = time.monotonic() - started
                rotate(running, keys_file, key)
                refused = requests.post(f"{balancer.rest_url}/predictions/{MODEL}", data=images[0][0], timeout=30,
                                        headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
                return {"added_in_s": round(added, 1), "old_key_refused_with": refused.status_code}

            step("b", f"{spare.name} added, then the client credential rotated", add_and_rotate)

            def bad_rollout() -> dict[str, Any]:
                outcomes = roll_out(running, bad, images)
                return {"rollouts": outcomes, "default_versions_after": default_versions(running)}

            step("d", f"bad v2 ({bad.name}, labels rotated) rolled out to every replica", bad_rollout)

            def good_rollout_and_replace() -> dict[str, Any]:
                outcomes = roll_out(running, good, images)
                after_rollout = default_versions(running)
                replaced = [replace(replica, balancer, running, load_models=good.name) for replica in running]
                return {"rollouts": outcomes, "default_versions_after_rollout": after_rollout,
                        "replacements": replaced, "default_versions_after": default_versions(running)}

            step("c", f"v2 ({good.name}) rolled out to every replica, then every replica replaced in turn",
                 good_rollout_and_replace)
            time.sleep(5)
            load.stop()
            entry = request_entry("rest", MODEL)
            for scenario in scenarios:
                scenario |= window(load.prefix, scenario["start"], scenario["end"])
            run = run_stats(load.prefix, *entry, MODEL)
        finally:
            if load is not None and load.process.poll() is None:
                load.stop()
            balancer.stop()
            for replica in replicas:
                if replica.process is not None and replica.process.poll() is None:
                    replica.stop()
    report = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": command, "machine": host,
              "load_average_after": [round(x, 2) for x in psutil.getloadavg()], "replicas": args.replicas,
              "workers": 1, "users": args.users, "drain_s": args.drain_s, "image_pool": args.image_pool,
              "run": run, "scenarios": scenarios}
    write_json(args.report_dir / "replicas.json", report)
    (args.report_dir / "REPLICAS.md").write_text(markdown(report))
    print(markdown(report))
    ok = run["failures"] == 0 and all(s["failures"] == 0 for s in scenarios)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
