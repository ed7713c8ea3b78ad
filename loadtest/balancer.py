"""The load balancer in front of the replicas: a real HAProxy on 127.0.0.1, standing in for a Kubernetes Service.

Like a Service's endpoints, it sends requests only to replicas whose ``/ready`` answers 200 (checked
every half second, out after two failures, back after two successes) and spreads them round-robin,
request by request. Like kube-proxy it holds no credential: the client's ``Authorization`` goes through
to the replica's own proxy, which checks it. A request whose connection to a replica failed, or that a
replica's proxy answered 502/503 (no worker, stopping), is retried once on another replica.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.health import requests_status
from server.processes import family, stop_processes
from server.proxy import Runtime
from server.replica import Replica
from server.supervisor import haproxy_executable


@dataclass
class Balancer:
    """HAProxy on ``rest_port`` (HTTP/1.1) and ``grpc_port`` (HTTP/2) over ``replicas``, present or not yet."""

    directory: Path
    rest_port: int
    grpc_port: int
    replicas: list[Replica]
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def config(self) -> str:
        def servers(port: str) -> list[str]:
            # gRPC is forwarded as HTTP/2; the health check still speaks HTTP/1.1 to the health server.
            return [f"    server {r.name} 127.0.0.1:{getattr(r, port)} check port {int(r.health_url.rsplit(':', 1)[1])}"
                    + (" proto h2 check-proto h1" if port == "grpc_port" else "") for r in self.replicas]

        backend = ["    balance roundrobin", "    option httpchk GET /ready", "    http-check expect status 200",
                   "    default-server inter 500ms fall 2 rise 2"]
        return "\n".join([
            "global",
            f"    stats socket {self.directory.resolve() / 'balancer.sock'} mode 600 level admin",
            "    hard-stop-after 30s",
            "defaults",
            "    mode http",
            "    timeout connect 2s",
            "    timeout client 90s",
            "    timeout server 90s",
            "    timeout queue 30s",
            "    retries 2",
            "    option redispatch 1",
            "    retry-on conn-failure empty-response junk-response 502 503",
            "frontend rest",
            f"    bind 127.0.0.1:{self.rest_port}",
            "    default_backend replicas_rest",
            "frontend grpc",
            f"    bind 127.0.0.1:{self.grpc_port} proto h2",
            "    default_backend replicas_grpc",
            "backend replicas_rest", *backend, *servers("rest_port"),
            "backend replicas_grpc", *backend, *servers("grpc_port"),
            "",
        ])

    def start(self) -> "Balancer":
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "balancer.cfg"
        config.write_text(self.config())
        with open(self.directory / "balancer.log", "a") as log:
            self.process = subprocess.Popen([haproxy_executable(), "-db", "-f", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while requests_status(self.rest_url) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"balancer did not start; see {self.directory / 'balancer.log'}")
            time.sleep(0.1)
        return self

    def up(self) -> set[str]:
        """The replicas it sends REST requests to now (health checks passing)."""
        stat = Runtime(self.directory / "balancer.sock").command("show stat")
        rows = [line.split(",") for line in stat.splitlines() if line.startswith("replicas_rest,")]
        return {row[1] for row in rows if row[1] != "BACKEND" and row[17] == "UP"}

    def wait_until(self, names: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.up() != names:
            if time.monotonic() > deadline:
                raise TimeoutError(f"balancer sends to {sorted(self.up())}, expected {sorted(names)}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            stop_processes(family(self.process.pid), grace=5)
            self.process = None
