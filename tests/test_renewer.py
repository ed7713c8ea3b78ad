"""The container's key renewer against a real TorchServe whose keys live one minute."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from clients.tokens import KeyRing, bearer, read_key_file
from server.launcher import TorchServe
from server.renewer import parse_instant, renew_due
from tests.conftest import ports_for


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
