"""The replica's authenticating proxy alone: a real HAProxy from server.proxy's configuration in front of a
slow stand-in for TorchServe, stopped with server.proxy.drain as the supervisor stops it."""
from __future__ import annotations

import http.server
import secrets
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests

from clients.grpc_client import TorchServeGrpc
from server.proxy import ProxySpec, drain, prepare, write_private
from server.supervisor import haproxy_executable
from tests.conftest import PORT_OFFSET, needs_haproxy

pytestmark = needs_haproxy

BASE = 18700 + PORT_OFFSET
ANSWER_S = 2.0
HARD_STOP_S = 20
INNER_KEY = "torchserve-own-key"


class SlowBackend(http.server.BaseHTTPRequestHandler):
    """Answers every POST after ANSWER_S with the Authorization header it received."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        time.sleep(ANSWER_S)
        body = self.headers.get("Authorization", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def start_haproxy(config: Path, port: int) -> subprocess.Popen:
    """HAProxy on ``config``, once ``port`` accepts connections; its output in the config's .log beside it."""
    with open(config.with_suffix(".log"), "w") as log:
        process = subprocess.Popen([haproxy_executable(), "-db", "-f", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, config.with_suffix(".log").read_text()
            time.sleep(0.05)


@pytest.fixture
def proxy(tmp_path: Path):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", BASE + 2), SlowBackend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    key = secrets.token_urlsafe(24)
    write_private(tmp_path / "client-keys", f"{key}\n")
    torchserve = {"inference_address": f"http://127.0.0.1:{BASE + 2}", "grpc_inference_address": "127.0.0.1",
                  "grpc_inference_port": str(BASE + 3), "default_response_timeout": "10"}
    spec = ProxySpec("127.0.0.1", BASE, BASE + 1, torchserve, tmp_path / "client-keys", tmp_path / "proxy",
                     hard_stop_s=HARD_STOP_S)
    prepare(spec, INNER_KEY)
    process = start_haproxy(spec.config, BASE)
    try:
        yield spec, process, key
    finally:
        process.kill()
        process.wait()
        backend.shutdown()
        backend.server_close()


def test_the_drain_finishes_what_it_holds_and_takes_nothing_new(proxy) -> None:
    spec, process, key = proxy
    url = f"{spec.rest_url}/predictions/cifar10"
    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(requests.post, url, data=b"x", headers={"Authorization": f"Bearer {key}"},
                                 timeout=30) for _ in range(2)]
        time.sleep(ANSWER_S / 4)
        took = drain(process, spec)
        answers = [future.result() for future in in_flight]
    assert process.poll() is not None
    assert took > ANSWER_S / 2, "stopped before the requests it held were answered"
    # the client's key was swapped for TorchServe's own on the way in
    assert [(a.status_code, a.text) for a in answers] == [(200, f"Bearer {INNER_KEY}")] * 2
    with pytest.raises(requests.ConnectionError):
        requests.post(url, data=b"x", headers={"Authorization": f"Bearer {key}"}, timeout=5)


def test_an_idle_grpc_channel_does_not_hold_the_drain_until_the_hard_stop(proxy) -> None:
    spec, process, _ = proxy
    with TorchServeGrpc(inference_target=spec.grpc_target, keys={"inference": "not-a-client-key"}) as client:
        with pytest.raises(grpc.RpcError) as refused:  # answered by the proxy: the channel is connected, then idle
            client.predict("cifar10", b"x")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert drain(process, spec) < HARD_STOP_S / 4


def test_a_load_balancers_pooled_http2_connection_does_not_hold_the_drain(proxy, tmp_path: Path) -> None:
    """An HTTP/2 client that keeps its idle connection after the proxy's GOAWAY: another HAProxy in front,
    as a load balancer or ingress pools its connections to the pods."""
    spec, process, _ = proxy
    front_config = tmp_path / "front.cfg"
    front_config.write_text("\n".join([
        "defaults", "    mode http", "    timeout connect 2s", "    timeout client 60s", "    timeout server 60s",
        "frontend grpc", f"    bind 127.0.0.1:{BASE + 5} proto h2", "    default_backend replica",
        "backend replica", f"    server proxy {spec.grpc_target} proto h2", ""]))
    front = start_haproxy(front_config, BASE + 5)
    try:
        with TorchServeGrpc(inference_target=f"127.0.0.1:{BASE + 5}", keys={"inference": "wrong"}) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.predict("cifar10", b"x")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert drain(process, spec) < HARD_STOP_S / 4
    finally:
        front.kill()
        front.wait()
