"""The container's key renewer (server.renewer) against a real TorchServe whose keys live one minute."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from clients.tokens import KeyRing, bearer, read_key_file
from server.config import REPO_ROOT
from server.launcher import TorchServe
from server.proxy import ProxySpec, prepare, sync, write_private
from server.renewer import parse_instant, renew_due
from server.supervisor import haproxy_executable
from tests.conftest import PORT_OFFSET, needs_haproxy, ports_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    """No models: keys and the token API need none, and the server starts in seconds."""
    server = TorchServe(workdir=tmp_path_factory.mktemp("torchserve-renewer"),
                        model_store=tmp_path_factory.mktemp("empty-store"),
                        overrides=ports_for(18130) | {"token_expiration_min": "1"})
    server.start()
    yield server
    server.stop()


def ping(server: TorchServe, key: str) -> int:
    return requests.get(f"{server.inference_url}/ping", headers=bearer(key), timeout=10).status_code


def test_java_instants_parse_at_any_precision() -> None:
    assert parse_instant("2026-11-28T20:26:35Z") + timedelta(microseconds=123456) == \
        parse_instant("2026-11-28T20:26:35.123456789Z")


def test_keys_outside_the_margin_are_left_alone(server: TorchServe) -> None:
    before = read_key_file(server.key_file)
    assert renew_due(server.key_file, server.management_url, timedelta(seconds=1)) == []
    assert read_key_file(server.key_file) == before


def test_keys_inside_the_margin_are_renewed_and_the_file_holds_working_ones(server: TorchServe) -> None:
    before = read_key_file(server.key_file)
    expiry = json.loads(Path(server.key_file).read_text())["inference"]["expiration time"]
    client = KeyRing(server.key_file)  # a client outside the container: no management URL
    assert renew_due(server.key_file, server.management_url, timedelta(minutes=2)) == ["inference", "management"]
    after = read_key_file(server.key_file)
    assert after["inference"] != before["inference"] and after["management"] != before["management"]
    assert json.loads(Path(server.key_file).read_text())["inference"]["expiration time"] != expiry
    assert ping(server, before["inference"]) == 400 and ping(server, after["inference"]) == 200
    # the client still holds the old key: refused once, it re-reads the file and succeeds
    assert client.request("inference", "GET", f"{server.inference_url}/ping", timeout=10).status_code == 200


def age_until_due(server: TorchServe, margin: timedelta) -> None:
    """Sleep until the inference key expires within ``margin`` (the server's keys live one minute)."""
    expires = parse_instant(json.loads(Path(server.key_file).read_text())["inference"]["expiration time"])
    time.sleep(max(0.0, (expires - margin - datetime.now(timezone.utc)).total_seconds()) + 0.5)


@pytest.mark.parametrize("order", ["client first", "renewer first", "at once"])
def test_the_renewer_and_a_client_renewing_one_refused_key_agree_on_one_key(server: TorchServe, order: str) -> None:
    """Whichever renews first, the other must take its key, not renew it away: a fresh key is not due for
    the renewer, and a changed key is not the refused one for the client."""
    margin = timedelta(seconds=50)  # 1-minute keys: due 10 s after they were made
    age_until_due(server, margin)
    refused = read_key_file(server.key_file)["inference"]
    client = KeyRing(server.key_file, server.management_url)
    if order == "client first":
        held = client.renew("inference", refused)
        assert renew_due(server.key_file, server.management_url, margin) == ["management"]  # inference is fresh
    elif order == "renewer first":
        assert renew_due(server.key_file, server.management_url, margin) == ["inference", "management"]
        renewed = read_key_file(server.key_file)["inference"]
        held = client.renew("inference", refused)
        assert held == renewed  # taken, not renewed again
    else:
        start = threading.Barrier(2)

        def renewer() -> list[str]:
            start.wait()
            return renew_due(server.key_file, server.management_url, margin)

        def refused_client() -> str:
            start.wait()
            return client.renew("inference", refused)

        with ThreadPoolExecutor(2) as pool:
            due, held = pool.submit(renewer), pool.submit(refused_client)
            assert "management" in due.result()
            held = held.result()
    assert held != refused and held == read_key_file(server.key_file)["inference"]
    assert ping(server, held) == 200 and ping(server, refused) == 400


def run_renewer(server: TorchServe, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "server.renewer", "--workdir", str(server.workdir), "--config",
                             str(server.effective_config), *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize(("margin", "interval", "reason"), [("60", "5", "shorter than the keys' lifetime"),
                                                            ("5", "5", "must exceed --interval")])
def test_the_renewer_refuses_a_margin_that_cannot_work(server: TorchServe, margin: str, interval: str,
                                                       reason: str) -> None:
    """With 1-minute keys a 60 s margin would renew every key at every check."""
    process = run_renewer(server, "--margin", margin, "--interval", interval)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2 and reason in output, output


def test_the_renewers_loop_renews_each_key_before_it_expires(server: TorchServe) -> None:
    before = read_key_file(server.key_file)
    expires = parse_instant(json.loads(Path(server.key_file).read_text())["inference"]["expiration time"])
    process = run_renewer(server, "--margin", "50", "--interval", "1")
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in process.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 40
        while not any("renewed" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        renewed_at = datetime.now(timezone.utc)
        after = read_key_file(server.key_file)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "renewed the inference and management key(s)\n" in lines, lines
    assert after["inference"] != before["inference"] and after["management"] != before["management"]
    assert renewed_at < expires  # before the old key expired: a client re-reading the file never waits
    assert ping(server, after["inference"]) == 200


@needs_haproxy
def test_the_replica_proxy_follows_renewed_keys_and_the_client_key_file(server: TorchServe, tmp_path: Path) -> None:
    """A real HAProxy before the module's TorchServe: a renewal reaches it with one sync, so does a rotated
    client-key file (and the old client key is refused from then on)."""
    old_client, new_client = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    accepted = tmp_path / "client-keys"
    write_private(accepted, f"{old_client}\n")
    spec = ProxySpec("127.0.0.1", PORT_OFFSET + 18135, PORT_OFFSET + 18136, server.properties, accepted, tmp_path)
    prepare(spec, server.keys["inference"])
    proxy = subprocess.Popen([haproxy_executable(), "-db", "-f", str(spec.config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)
    pushed = {"inner": server.keys["inference"], "clients": [old_client]}

    def ping_through(key: str) -> int | None:
        try:
            return requests.get(f"{spec.rest_url}/ping", headers=bearer(key), timeout=10).status_code
        except requests.ConnectionError:
            return None

    try:
        deadline = time.monotonic() + 10
        while ping_through(old_client) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ping_through(old_client) == 200 and ping_through(server.keys["inference"]) == 401
        assert renew_due(server.key_file, server.management_url, timedelta(minutes=2)) == ["inference", "management"]
        assert ping_through(old_client) == 400  # forwarded with the key TorchServe just invalidated
        assert sync(spec.directory, accepted, server.keys["inference"], pushed) == ["TorchServe's inference key"]
        assert ping_through(old_client) == 200
        write_private(accepted, f"{new_client}\n")
        assert sync(spec.directory, accepted, server.keys["inference"], pushed) == ["1 client key(s)"]
        assert ping_through(new_client) == 200 and ping_through(old_client) == 401
        assert sync(spec.directory, accepted, server.keys["inference"], pushed) == []  # nothing changed
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
