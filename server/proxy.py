"""The replica's authenticating proxy: HAProxy in front of TorchServe's loopback inference endpoints.

TorchServe cannot load keys: every instance mints its own, so a client key could never be shared by
two replicas. Each replica therefore keeps TorchServe (token authorization on) on loopback and puts
HAProxy on the client-facing ports, REST and gRPC (HTTP/2). HAProxy

- accepts ``Authorization: Bearer <client key>`` only for a key listed in the client-keys file (a
  Kubernetes Secret: one key per line, several lines during a rotation), and refuses anything else
  as TorchServe does, with ``Token Authorization failed`` (REST 401, gRPC UNAUTHENTICATED);
- replaces that header with TorchServe's current inference key, read from a map file of its own.

Neither key is ever on a command line or in the configuration: HAProxy reads both from files
(mode 0600 here, the Secret's mode there) and both are updated at run time through HAProxy's
runtime API, a Unix socket of mode 0600 (:class:`Runtime`): the client keys in one atomic
``prepare``/``commit`` (no instant with no valid key), TorchServe's key with ``set map`` as soon as it
is renewed (server.renewer). On SIGUSR1 HAProxy soft-stops (:func:`drain`): it closes its listeners and
idle HTTP/1.1 connections, answers what arrives on the others with ``Connection: close`` or an HTTP/2
GOAWAY, finishes what it holds and exits, bounded by ``hard-stop-after``. A client that keeps its idle
HTTP/2 connection after the GOAWAY (a load balancer's or an ingress's pool does) is closed after
``timeout client-fin`` instead of holding the stop until the hard stop.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REFUSAL_MESSAGE = "Token Authorization failed"  # the words TorchServe refuses a key with (clients.tokens)
INNER_KEY_NAME = "inference"  # the map entry holding TorchServe's current inference key
CONFIG_FILE = "haproxy.cfg"
MAP_FILE = "torchserve-key.map"
SOCKET_FILE = "haproxy.sock"
CLOSING_S = 2


@dataclass(frozen=True)
class ProxySpec:
    """Where the proxy listens, what it forwards to, and the files it reads.

    ``bind_host``: the client-facing address (0.0.0.0 in a pod, 127.0.0.1 here);
    ``torchserve``: TorchServe's properties (its loopback inference and gRPC inference addresses);
    ``client_keys``: the file of accepted client keys; ``directory``: where its config, map and socket go.
    ``hard_stop_s`` bounds a soft stop: what TorchServe's response timeout allows a request, plus margin.
    """

    bind_host: str
    rest_port: int
    grpc_port: int
    torchserve: dict[str, str]
    client_keys: Path
    directory: Path
    hard_stop_s: int = 75

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def map_file(self) -> Path:
        return self.directory / MAP_FILE

    @property
    def socket(self) -> Path:
        return self.directory / SOCKET_FILE

    @property
    def rest_url(self) -> str:
        return f"http://{self.bind_host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.bind_host}:{self.grpc_port}"


def _loopback(address: str) -> str:
    """``127.0.0.1:8080`` from ``http://127.0.0.1:8080``."""
    return address.split("//", 1)[-1].rstrip("/")


def render_config(spec: ProxySpec) -> str:
    """haproxy.cfg for one replica. No secret in it: keys are in the files it names."""
    keys, inner = spec.client_keys.resolve(), spec.map_file.resolve()
    rest_backend = _loopback(spec.torchserve["inference_address"])
    grpc_backend = f"{spec.torchserve['grpc_inference_address']}:{spec.torchserve['grpc_inference_port']}"
    timeout = int(spec.torchserve.get("default_response_timeout", "60")) + 15
    # word(2) of "Bearer <key>": the key; HAProxy's -f reads one pattern per line, as the Secret holds them.
    authenticate = [
        'acl bearer req.hdr(authorization) -m beg "Bearer "',
        f"acl client_key req.hdr(authorization),word(2,' ') -m str -f {keys}",
    ]
    forward = f'http-request set-header authorization "Bearer %[str({INNER_KEY_NAME}),map({inner})]"'
    refusal = f'{{"code": 401, "type": "Unauthorized", "message": "{REFUSAL_MESSAGE}"}}'
    return "\n".join([
        "global",
        f"    stats socket {spec.socket.resolve()} mode 600 level admin",
        f"    hard-stop-after {spec.hard_stop_s}s",
        "    log stdout format raw local0 notice",
        "defaults",
        "    mode http",
        "    log global",
        "    timeout connect 5s",
        "    timeout http-request 15s",
        f"    timeout client {timeout}s",
        f"    timeout server {timeout}s",
        "    timeout http-keep-alive 30s",
        f"    timeout client-fin {CLOSING_S}s",
        "frontend rest",
        f"    bind {spec.bind_host}:{spec.rest_port}",
        *(f"    {line}" for line in authenticate),
        f"    http-request return status 401 content-type application/json string '{refusal}' "
        "unless bearer client_key",
        f"    {forward}",
        "    default_backend torchserve_rest",
        "frontend grpc",
        f"    bind {spec.bind_host}:{spec.grpc_port} proto h2",
        *(f"    {line}" for line in authenticate),
        # gRPC's "trailers-only" refusal: status 16 (UNAUTHENTICATED) in the only HEADERS frame.
        f'    http-request return status 200 hdr content-type application/grpc hdr grpc-status 16 '
        f'hdr grpc-message "{REFUSAL_MESSAGE}" unless bearer client_key',
        f"    {forward}",
        "    default_backend torchserve_grpc",
        "backend torchserve_rest",
        f"    server torchserve {rest_backend}",
        "backend torchserve_grpc",
        f"    server torchserve {grpc_backend} proto h2",
        "",
    ])


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner only, from the first byte on."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o600)
        os.write(handle, text.encode())
    finally:
        os.close(handle)
    os.replace(temporary, path)


def read_client_keys(path: Path) -> list[str]:
    """The accepted client keys: one per non-empty line, as HAProxy reads the same file."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def prepare(spec: ProxySpec, inner_key: str) -> None:
    """Write the config and the map of TorchServe's key before HAProxy starts."""
    spec.directory.mkdir(parents=True, exist_ok=True)
    spec.config.write_text(render_config(spec))
    write_private(spec.map_file, f"{INNER_KEY_NAME} {inner_key}\n")


class ProxyCommandError(Exception):
    """HAProxy's runtime API refused a command."""


class Runtime:
    """HAProxy's runtime API (the admin stats socket): one command per connection."""

    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(self.timeout)
            connection.connect(str(self.socket_path))
            connection.sendall(text.encode() + b"\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace").strip()

    def set_inner_key(self, map_file: Path, key: str) -> None:
        """Forward with ``key`` from the next request on."""
        answer = self.command(f"set map {map_file.resolve()} {INNER_KEY_NAME} {key}")
        if answer:
            raise ProxyCommandError(f"set map: {answer[:200]}")

    def accepted_keys(self, keys_file: Path) -> set[str]:
        """The client keys HAProxy accepts now."""
        answer = self.command(f"show acl {keys_file.resolve()}")
        return {line.split(" ", 1)[1] for line in answer.splitlines() if " " in line and line.startswith("0x")}

    def replace_client_keys(self, keys_file: Path, keys: list[str]) -> None:
        """Accept exactly ``keys`` from now on, in one atomic swap (HAProxy's versioned ACL update)."""
        acl = keys_file.resolve()
        answer = self.command(f"prepare acl {acl}")
        if not answer.startswith("New version created:"):
            raise ProxyCommandError(f"prepare acl: {answer[:200]}")
        version = answer.rsplit(":", 1)[1].strip()
        for key in keys:
            answer = self.command(f"add acl @{version} {acl} {key}")
            if answer:
                raise ProxyCommandError(f"add acl: {answer[:200]}")
        answer = self.command(f"commit acl @{version} {acl}")
        if answer:
            raise ProxyCommandError(f"commit acl: {answer[:200]}")


def sync(directory: Path, client_keys: Path, inner_key: str, known: dict[str, object]) -> list[str]:
    """Push TorchServe's current key and the client-keys file to the HAProxy whose socket and map are in
    ``directory``, where they changed since ``known`` (what was last pushed; updated here). What was pushed,
    for the log: names and counts, never keys."""
    runtime, map_file = Runtime(directory / SOCKET_FILE), directory / MAP_FILE
    pushed = []
    if known.get("inner") != inner_key:
        runtime.set_inner_key(map_file, inner_key)
        write_private(map_file, f"{INNER_KEY_NAME} {inner_key}\n")  # what a restarted HAProxy reads
        known["inner"] = inner_key
        pushed.append("TorchServe's inference key")
    clients = read_client_keys(client_keys)
    if known.get("clients") != clients:
        runtime.replace_client_keys(client_keys, clients)
        known["clients"] = clients
        pushed.append(f"{len(clients)} client key(s)")
    return pushed


def drain(process: subprocess.Popen, spec: ProxySpec) -> float:
    """Soft-stop the HAProxy ``process`` and wait until it has finished what it holds and exited (at most
    ``spec.hard_stop_s``); the seconds it took."""
    started = time.monotonic()
    process.send_signal(signal.SIGUSR1)
    try:
        process.wait(timeout=spec.hard_stop_s + 5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return time.monotonic() - started
