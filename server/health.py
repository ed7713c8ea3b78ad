"""Liveness and readiness for orchestrators and load balancers, with no secret and no detail.

TorchServe's own ``/ping`` needs the inference key (token authorization answers it with HTTP 400
otherwise), so a Kubernetes probe, a Docker HEALTHCHECK or a load balancer cannot use it. This small
HTTP server runs beside TorchServe, holds the keys itself (key_file.json in TorchServe's start
directory, renewed when they expire) and answers two questions:

- ``GET /live``: 200 while the frontend answers HTTP (its metrics address, which needs no key);
  503 otherwise. A failing liveness probe means "restart the container".
- ``GET /ready``: 200 when the replica can serve the default model: its default version has a READY
  worker and the replica is not stopping; 503 otherwise (starting up, its workers restarting, a
  drain under way). One bounded management call, answered from a cache for ``cache_s`` seconds and
  made by one probe at a time, so that a burst of probes costs one call; a restarting worker of an
  idle variant does not take the replica out of the Service. A failing readiness probe means "send
  no traffic here for now".

The replica's supervisor (server.supervisor) marks a drain with a flag file beside the keys: from
the moment it is written ``/ready`` answers 503, while ``/live`` stays 200. Requests are served by
a bounded number of threads; a probe beyond them is answered 503 at once instead of queueing.

Bodies are ``{"status": "..."}`` only: no model names, versions, keys or error text, since the
endpoints are unauthenticated. ``python -m server.health check live|ready`` is the same question
as an exit status, for exec probes and HEALTHCHECK.

    python -m server.health serve --bind 127.0.0.1:8083 --workdir . --config config.properties
    python -m server.health check ready --url http://127.0.0.1:8083
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from clients.management import Management, ready_workers
from server.config import SHIPPED_CONFIG, read_properties
from server.plan import DEFAULT_MODEL

DEFAULT_BIND = "127.0.0.1:8083"
PROBE_TIMEOUT = 2.0
CACHE_S = 1.0
MAX_PROBE_THREADS = 8
DRAINING_FLAG = "draining"  # written into TorchServe's working directory by server.supervisor on SIGTERM


class Health:
    """Answers liveness and readiness for the TorchServe started in ``workdir`` with ``properties``."""

    def __init__(self, workdir: Path, properties: dict[str, str], timeout: float = PROBE_TIMEOUT,
                 model: str = DEFAULT_MODEL, cache_s: float = CACHE_S) -> None:
        self.management = Management(Path(workdir) / "key_file.json", properties["management_address"], timeout)
        self.metrics_url = properties["metrics_address"].rstrip("/")
        self.timeout = timeout
        self.model = model
        self.cache_s = cache_s
        self.draining_flag = Path(workdir) / DRAINING_FLAG
        self._lock = threading.Lock()
        self._checked = (-float("inf"), False)  # (monotonic time, answer) of the last management call

    def live(self) -> bool:
        try:
            return requests.get(f"{self.metrics_url}/metrics", params={"name[]": "ts_inference_requests_total"},
                                timeout=self.timeout).ok
        except requests.RequestException:
            return False

    def ready(self) -> bool:
        if self.draining_flag.exists():
            return False
        with self._lock:  # one management call at a time; the probes waiting meanwhile reuse its answer
            at, answer = self._checked
            if time.monotonic() - at >= self.cache_s:
                answer = self._default_model_serves()
                self._checked = (time.monotonic(), answer)
            return answer

    def _default_model_serves(self) -> bool:
        # A restart's new keys are picked up by KeyRing.renew, which re-reads the file before asking for new ones.
        try:
            return ready_workers(self.management.describe(self.model)[0]) > 0
        except (requests.RequestException, OSError, ValueError, KeyError, TypeError, IndexError):
            return False  # not started, keys not written yet, or an answer we cannot read: not ready


def handler_for(health: Health) -> type[BaseHTTPRequestHandler]:
    class Probe(BaseHTTPRequestHandler):
        checks = {"/live": (health.live, "alive", "down"), "/ready": (health.ready, "ready", "not ready")}

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            check = self.checks.get(self.path.split("?", 1)[0])
            if check is None:
                self._answer(404, "not found")
                return
            probe, up, down = check
            ok = probe()
            self._answer(200 if ok else 503, up if ok else down)

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _answer(self, status: int, text: str) -> None:
            body = json.dumps({"status": text}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a probe every few seconds would flood the output; TorchServe logs its own requests

    return Probe


class BoundedServer(ThreadingHTTPServer):
    """A thread per probe, at most ``MAX_PROBE_THREADS`` at once: a flood of probes cannot exhaust the pod."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_PROBE_THREADS)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # the prober sees a closed connection: a failed probe
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(health: Health, bind: str = DEFAULT_BIND) -> ThreadingHTTPServer:
    host, port = bind.rsplit(":", 1)
    return BoundedServer((host, int(port)), handler_for(health))


def requests_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET ``url``, or None when nothing answers."""
    try:
        return requests.get(url, timeout=timeout).status_code
    except requests.RequestException:
        return None


def check(url: str, probe: str, timeout: float = PROBE_TIMEOUT + 2) -> bool:
    return requests_status(f"{url.rstrip('/')}/{probe}", timeout) == 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.health", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="answer /live and /ready over HTTP")
    serve.add_argument("--bind", default=DEFAULT_BIND, help="host:port to listen on (default: %(default)s)")
    serve.add_argument("--workdir", type=Path, default=Path.cwd(),
                       help="TorchServe's start directory, where key_file.json is (default: the current one)")
    serve.add_argument("--config", type=Path, default=SHIPPED_CONFIG,
                       help="TorchServe's config.properties, for its addresses (default: the shipped one)")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="the model readiness is about (default: %(default)s)")
    probe = commands.add_parser("check", help="exit 0 if the health server answers 200, else 1")
    probe.add_argument("probe", choices=("live", "ready"))
    probe.add_argument("--url", default=f"http://{DEFAULT_BIND}", help="health server (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return 0 if check(args.url, args.probe) else 1
    server = make_server(Health(args.workdir, read_properties(args.config), model=args.model), args.bind)
    print(f"health checks on http://{args.bind}/live and /ready", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
