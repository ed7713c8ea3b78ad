"""One replica's processes, kept alive together and stopped without dropping a request.

The container's entrypoint used to start the health server, the key renewer and the scaler in the
background and exec TorchServe under ``tini -g``: a dead helper went unnoticed, and SIGTERM ended
TorchServe (and every request it held) at once. This supervisor runs instead, under plain tini:

- starts TorchServe (``--foreground``, loopback only), then, once its keys exist, the replica's
  authenticating proxy (HAProxy, server.proxy) on the client-facing ports, the health server, the
  key renewer (which also keeps the proxy's keys current) and the one-shot worker scaler; every
  child in a session of its own, so that a signal to the supervisor reaches nobody else;
- restarts a helper (health, renewer) that dies, at most ``MAX_RESTARTS`` times in ``RESTART_WINDOW_S``;
  beyond that, or when TorchServe or the proxy dies, it stops the replica and exits 1: the container
  restarts, the replica is never silently half alive;
- on SIGTERM (or SIGINT): ``/ready`` answers 503 at once (a flag file the health server reads);
  for ``drain_s`` seconds everything keeps serving while the load balancer takes the endpoint out;
  then the proxy soft-stops (server.proxy.drain: closes its listeners and idle connections so that
  clients reconnect elsewhere, finishes every request it holds, bounded by its ``hard-stop-after``);
  then TorchServe and the helpers stop. Exits 0.

    python -m server.supervisor --workdir /var/lib/torchserve --config /app/config.effective.properties \
        --client-keys /etc/cifar10/client-keys --bind 0.0.0.0 --rest-port 8080 --grpc-port 7070
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from clients.tokens import read_key_file
from server.config import read_properties
from server.health import DEFAULT_BIND as DEFAULT_HEALTH_BIND
from server.health import DRAINING_FLAG
from server.java import java_home
from server.plan import THREADS_ENV, WORKERS_ENV, plan_from_environment
from server.processes import family, stop_processes
from server.proxy import ProxySpec, drain, prepare

MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
POLL_S = 0.5
KEY_FILE_TIMEOUT_S = 300.0  # JVM start on a busy node; the startup probe allows as long
TORCHSERVE_STOP_S = 30.0


@dataclass
class Child:
    """One supervised process. ``required``: the replica cannot serve without it. ``once``: done when it
    exits 0 (the scaler)."""

    name: str
    command: list[str]
    required: bool = False
    once: bool = False
    process: subprocess.Popen | None = None
    restarts: deque = field(default_factory=deque)

    def start(self, cwd: Path, env: dict[str, str], logs: Path) -> None:
        with open(logs / f"{self.name}.log", "a") as log:
            self.process = subprocess.Popen(self.command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


class Supervisor:
    """Starts, watches and stops the processes of one replica (see the module docstring)."""

    def __init__(self, workdir: Path, config: Path, proxy: ProxySpec, health_bind: str, drain_s: float,
                 enable_model_api: bool) -> None:
        self.workdir, self.config, self.proxy = workdir, config, proxy
        self.health_bind, self.drain_s = health_bind, drain_s
        self.logs = Path(os.environ.get("LOG_LOCATION") or workdir / "logs")
        self.env = self._environment()
        torchserve = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground",
                      "--ts-config", str(config), "--ncs", *(["--enable-model-api"] if enable_model_api else [])]
        python = [sys.executable, "-m"]
        common = ["--workdir", str(workdir), "--config", str(config)]
        self.torchserve = Child("torchserve", torchserve, required=True)
        self.haproxy = Child("haproxy", [haproxy_executable(), "-db", "-f", str(proxy.config)], required=True)
        self.helpers = [
            Child("health", [*python, "server.health", "serve", "--bind", health_bind, *common]),
            Child("renewer", [*python, "server.renewer", *common, "--proxy-dir", str(proxy.directory),
                              "--client-keys", str(proxy.client_keys)]),
            Child("scaler", [*python, "server.scaler", *common], once=True),
        ]
        self.stopping = threading.Event()

    def _environment(self) -> dict[str, str]:
        """What every child inherits: the worker plan (TorchServe hands it to its workers), Java, logs."""
        chosen = plan_from_environment()
        env = os.environ | {WORKERS_ENV: str(chosen.default_workers), THREADS_ENV: str(chosen.threads)}
        env.setdefault("JAVA_HOME", java_home())
        env.setdefault("LOG_LOCATION", str(self.logs))
        env.setdefault("METRICS_LOCATION", str(self.logs))
        print(f"Workers: {chosen.describe()}.", flush=True)
        return env

    @property
    def flag(self) -> Path:
        return self.workdir / DRAINING_FLAG

    def run(self) -> int:
        """Serve until SIGTERM (exit 0) or until the replica cannot be kept whole (exit 1)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flag.unlink(missing_ok=True)
        # A restarted container keeps its temp directory: a stale pid file would make TorchServe refuse to start.
        Path(self.env.get("TMPDIR") or tempfile.gettempdir(), ".model_server.pid").unlink(missing_ok=True)
        key_file = self.workdir / "key_file.json"
        key_file.unlink(missing_ok=True)  # so that the wait below sees this start's keys
        self.torchserve.start(self.workdir, self.env, self.logs)
        try:
            inner_key = self._wait_for_key(key_file)
        except (TimeoutError, RuntimeError) as error:
            print(f"replica not started: {error}", flush=True)
            return self.stop(1)
        if inner_key is None:  # SIGTERM while starting
            return self.stop(0)
        prepare(self.proxy, inner_key)
        for child in (self.haproxy, *self.helpers):
            child.start(self.workdir, self.env, self.logs)
        print(f"replica serving: REST {self.proxy.rest_url}, gRPC {self.proxy.grpc_target}, "
              f"health http://{self.health_bind}", flush=True)
        return self._watch()

    def _wait_for_key(self, key_file: Path) -> str | None:
        deadline = time.monotonic() + KEY_FILE_TIMEOUT_S
        while not self.stopping.is_set():
            if self.torchserve.exited() is not None:
                raise RuntimeError(f"TorchServe exited with {self.torchserve.exited()}; see {self.logs}")
            try:
                return read_key_file(key_file)["inference"]
            except (OSError, ValueError, KeyError, TypeError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {key_file} after {KEY_FILE_TIMEOUT_S:.0f} s") from None
            self.stopping.wait(POLL_S)
        return None

    def _watch(self) -> int:
        while not self.stopping.wait(POLL_S):
            for child in (self.torchserve, self.haproxy):
                if child.exited() is not None:
                    print(f"{child.name} exited with {child.exited()}: stopping the replica", flush=True)
                    return self.stop(1)
            for child in self.helpers:
                code = child.exited()
                if code is None or (child.once and code == 0):
                    continue
                now = time.monotonic()
                while child.restarts and now - child.restarts[0] > RESTART_WINDOW_S:
                    child.restarts.popleft()
                if child.once:
                    print(f"{child.name} failed with {code}; not retried (it retried for its own timeout)", flush=True)
                    self.helpers.remove(child)
                    break
                if len(child.restarts) >= MAX_RESTARTS:
                    print(f"{child.name} died {MAX_RESTARTS + 1} times in {RESTART_WINDOW_S:.0f} s: "
                          "stopping the replica", flush=True)
                    return self.stop(1)
                child.restarts.append(now)
                print(f"{child.name} exited with {code}: restarted", flush=True)
                child.start(self.workdir, self.env, self.logs)
        return self.stop(0)

    def request_stop(self, signum: int, frame: object) -> None:
        """SIGTERM: not ready from this instant; the drain itself runs on the main thread."""
        self.flag.touch()
        self.stopping.set()

    def stop(self, code: int) -> int:
        """Drain and stop everything; ``code`` is the exit status."""
        self.flag.touch()
        started = time.monotonic()
        if self.haproxy.exited() is None and self.haproxy.process is not None:
            print(f"draining: not ready, serving on for {self.drain_s:.0f} s while the endpoint is removed", flush=True)
            time.sleep(self.drain_s)
            took = drain(self.haproxy.process, self.proxy)
            print(f"proxy drained after {time.monotonic() - started:.1f} s"
                  + (" (its hard stop: requests still held were cut)" if took >= self.proxy.hard_stop_s else ""),
                  flush=True)
        for child in self.helpers:
            if child.process is not None:
                stop_processes(family(child.process.pid), grace=5)
        stop_processes(family(self.haproxy.process.pid) if self.haproxy.process else [], grace=1)
        if self.torchserve.process is not None:
            stop_processes(family(self.torchserve.process.pid), grace=TORCHSERVE_STOP_S)
        self.flag.unlink(missing_ok=True)
        print(f"replica stopped after {time.monotonic() - started:.1f} s", flush=True)
        return code


def haproxy_executable() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError("haproxy not found: install Debian's haproxy package (apt-get install haproxy)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="TorchServe's start directory (keys, logs)")
    parser.add_argument("--config", type=Path, required=True, help="TorchServe's config.properties")
    parser.add_argument("--client-keys", type=Path, required=True,
                        help="the accepted client keys, one per line (a Secret); never on the command line")
    parser.add_argument("--bind", default="127.0.0.1", help="the proxy's client-facing address (default: %(default)s)")
    parser.add_argument("--rest-port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=7070)
    parser.add_argument("--health-bind", default=DEFAULT_HEALTH_BIND, help="host:port of /live and /ready")
    parser.add_argument("--drain-s", type=float, default=5.0,
                        help="seconds between not-ready and the proxy's soft stop (default: %(default)s)")
    parser.add_argument("--enable-model-api", action="store_true",
                        help="allow register/unregister (confined by allowed_urls): what a rollout needs")
    args = parser.parse_args(argv)
    if not args.client_keys.is_file():
        parser.error(f"no client-keys file at {args.client_keys}: mount the Secret holding them (docs/DEPLOY.md)")
    workdir = args.workdir.resolve()
    properties = read_properties(args.config)
    proxy = ProxySpec(args.bind, args.rest_port, args.grpc_port, properties, args.client_keys.resolve(),
                      workdir / "proxy", hard_stop_s=int(properties.get("default_response_timeout", "60")) + 15)
    supervisor = Supervisor(workdir, args.config.resolve(), proxy, args.health_bind, args.drain_s,
                            args.enable_model_api)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    raise SystemExit(main())
