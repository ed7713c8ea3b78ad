"""A replica as the container runs it (server.supervisor: TorchServe, its proxy, health, renewer), on loopback.

The multi-replica benchmark (``python -m loadtest replicas``) and tests/test_replicas.py start several
of these side by side, each in its own working directory and on its own ports, and stop them the
way Kubernetes does: SIGTERM to the supervisor.

Ports from ``base``: TorchServe's five (REST, management, metrics, gRPC inference, gRPC management)
on base..base+4, the proxy's REST and gRPC on base+5 and base+6, health on base+7.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from clients.tokens import KeyRing
from server.config import (
    REPO_ROOT,
    SHIPPED_CONFIG,
    anchored_vmargs,
    free_port_overrides,
    read_properties,
    render_properties,
    store_only_urls,
)
from server.health import requests_status
from server.java import java_home
from server.plan import THREADS_ENV, WORKERS_ENV
from server.processes import family, stop_processes

PORTS_PER_REPLICA = 10


@dataclass
class Replica:
    """One supervised replica serving ``load_models`` from ``model_store`` with ``workers`` single-threaded
    cifar10 workers (several replicas share this machine's cores)."""

    name: str
    workdir: Path
    model_store: Path
    client_keys: Path
    base: int
    load_models: str = "cifar10.mar"
    workers: int = 1
    drain_s: float = 3.0
    process: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.properties = read_properties(SHIPPED_CONFIG) | free_port_overrides(self.base) | {
            "model_store": str(Path(self.model_store).resolve()), "load_models": self.load_models,
            "allowed_urls": store_only_urls(Path(self.model_store).resolve()),
            "vmargs": anchored_vmargs(read_properties(SHIPPED_CONFIG)["vmargs"], SHIPPED_CONFIG.resolve().parent)}

    @property
    def rest_port(self) -> int:
        return self.base + 5

    @property
    def grpc_port(self) -> int:
        return self.base + 6

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.base + 7}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def management_url(self) -> str:
        return self.properties["management_address"]

    @property
    def grpc_inference_target(self) -> str:
        return f"127.0.0.1:{self.properties['grpc_inference_port']}"

    @property
    def grpc_management_target(self) -> str:
        return f"127.0.0.1:{self.properties['grpc_management_port']}"

    def keys(self) -> KeyRing:
        """TorchServe's own keys (in-pod tools: the rollout, the tests' direct checks)."""
        return KeyRing(self.key_file, self.management_url)

    def start(self, timeout: float = 300.0) -> "Replica":
        """Start the supervisor and wait until /ready answers 200."""
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text(render_properties(self.properties))
        env = {**os.environ, "JAVA_HOME": java_home(), "TMPDIR": str(self.workdir / "tmp"),
               "LOG_LOCATION": str(self.workdir / "logs"), "METRICS_LOCATION": str(self.workdir / "logs"),
               WORKERS_ENV: str(self.workers), THREADS_ENV: "1"}
        command = [sys.executable, "-m", "server.supervisor", "--workdir", str(self.workdir), "--config", str(config),
                   "--client-keys", str(self.client_keys), "--rest-port", str(self.rest_port),
                   "--grpc-port", str(self.grpc_port), "--health-bind", f"127.0.0.1:{self.base + 7}",
                   "--drain-s", str(self.drain_s), "--enable-model-api"]
        with open(self.workdir / "supervisor.log", "a") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while requests_status(f"{self.health_url}/ready") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"replica {self.name} not ready; see {self.workdir / 'supervisor.log'}")
            time.sleep(0.5)
        return self

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes stops a pod: the supervisor drains and exits."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 120.0) -> int:
        """The supervisor's exit status; kills what is left past ``timeout``."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """Everything of this replica, at once (cleanup only)."""
        if self.process is not None:
            stop_processes(family(self.process.pid), grace=10)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 120.0) -> int:
        self.terminate()
        return self.wait(timeout)

    def log(self) -> str:
        path = self.workdir / "supervisor.log"
        return path.read_text(errors="replace") if path.exists() else ""
