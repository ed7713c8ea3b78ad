"""Operating a real TorchServe past its keys' expiry, and the secret-free health checks.

One TorchServe for the module, the shipped config with ``token_expiration_min=1`` so that its keys
expire during the module: every client this project ships must keep working across that (renew the
key through the token API, retry once), and the health server must answer without any secret.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import requests

from clients.grpc_client import TorchServeGrpc
from clients.tokens import KeyRing, bearer, read_key_file
from loadtest.run import LoadSpec, load_test
from server.config import REPO_ROOT
from server.health import CACHE_S, DRAINING_FLAG, Health, check, requests_status
from server.launcher import TorchServe
from tests.conftest import PORT_OFFSET, ports_for
from training.model import CLASSES

MODELS = ["cifar10", "cifar10_onnx_int8_static"]
EXPIRY_MIN = 1
HEALTH_PORT = 18115 + PORT_OFFSET


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    store = tmp_path_factory.mktemp("store")
    for name in MODELS:  # two models, so that readiness can be shown to be about the default one only
        (store / f"{name}.mar").symlink_to(model_store / f"{name}.mar")
    server = TorchServe(workdir=tmp_path_factory.mktemp("torchserve-keys"), model_store=store,
                        overrides=ports_for(18110) | {"token_expiration_min": str(EXPIRY_MIN)})
    server.start(wait_for=MODELS)
    server.health_url = server.start_health(f"127.0.0.1:{HEALTH_PORT}")
    yield server
    server.stop()


def expiry(server: TorchServe, kind: str) -> datetime:
    return datetime.fromisoformat(json.loads(server.key_file.read_text())[kind]["expiration time"][:26] + "+00:00")


def grpc_cli(server: TorchServe, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients.grpc_client", "--key-file", str(server.key_file),
                           "--management-url", server.management_url, "--inference-target",
                           server.grpc_inference_target, "--management-target", server.grpc_management_target, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_health_answers_without_a_secret_and_says_nothing_more(server: TorchServe) -> None:
    for probe, status in (("live", "alive"), ("ready", "ready")):
        response = requests.get(f"{server.health_url}/{probe}", timeout=10)  # no Authorization header
        assert response.status_code == 200
        assert response.json() == {"status": status}
        assert check(server.health_url, probe)
    assert requests.get(f"{server.health_url}/models", timeout=10).status_code == 404
    # TorchServe's own /ping is what a probe cannot use: without the key it is refused.
    assert requests.get(f"{server.inference_url}/ping", timeout=10).status_code == 400


def test_readiness_follows_the_default_model_only(server: TorchServe) -> None:
    """Ready means "can serve cifar10": a variant with no worker (an idle one restarting) keeps the
    replica in the Service, the default model with no worker takes it out."""
    def scale(model: str, workers: int) -> None:
        response = server.call("management", "PUT", f"{server.management_url}/models/{model}",
                               params={"min_worker": workers, "max_worker": workers, "synchronous": "true"},
                               timeout=120)
        assert response.ok, response.text

    scale(MODELS[1], 0)
    try:
        time.sleep(CACHE_S)  # past the cached answer
        assert requests_status(f"{server.health_url}/ready") == 200
    finally:
        scale(MODELS[1], 1)
    scale(MODELS[0], 0)
    try:
        time.sleep(CACHE_S)
        response = requests.get(f"{server.health_url}/ready", timeout=10)
        assert (response.status_code, response.json()) == (503, {"status": "not ready"})
        assert MODELS[0] not in response.text
        assert requests_status(f"{server.health_url}/live") == 200  # alive: no reason to restart it
        assert subprocess.run([sys.executable, "-m", "server.health", "check", "ready", "--url", server.health_url],
                              cwd=REPO_ROOT, timeout=60).returncode == 1
    finally:
        scale(MODELS[0], 1)
    time.sleep(CACHE_S)
    assert requests_status(f"{server.health_url}/ready") == 200


def test_a_drain_turns_readiness_off_at_once_and_keeps_liveness(server: TorchServe) -> None:
    flag = server.workdir / DRAINING_FLAG
    assert requests_status(f"{server.health_url}/ready") == 200  # cached as ready from here on
    flag.touch()
    try:
        assert requests_status(f"{server.health_url}/ready") == 503  # not after the cache expires: now
        assert requests_status(f"{server.health_url}/live") == 200
    finally:
        flag.unlink()
    assert requests_status(f"{server.health_url}/ready") == 200


def test_a_burst_of_probes_costs_one_management_call(server: TorchServe) -> None:
    health = Health(server.workdir, server.properties, cache_s=5.0)
    calls = []
    describe = health.management.describe
    health.management.describe = lambda *args: calls.append(args) or describe(*args)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: health.ready(), range(64)))
    assert all(answers) and len(calls) == 1


def test_a_server_that_is_down_is_neither_live_nor_ready(tmp_path: Path) -> None:
    nothing = ports_for(18120)  # nobody listens there
    health = Health(tmp_path, nothing, timeout=2)
    assert not health.live()
    assert not health.ready()


def test_concurrent_renewals_of_one_refused_key_make_one_new_key(server: TorchServe) -> None:
    """Eight processes that saw the same key refused must end up with one and the same new key:
    renewing once each would invalidate the key the previous renewal handed out."""
    refused = read_key_file(server.key_file)["inference"]
    with ProcessPoolExecutor(8) as pool:
        renewed = set(pool.map(renew_in_a_process, [(str(server.key_file), server.management_url, refused)] * 8))
    (key,) = renewed
    assert key != refused and key == read_key_file(server.key_file)["inference"]
    assert requests.get(f"{server.inference_url}/ping", headers=bearer(key), timeout=10).status_code == 200
    assert requests.get(f"{server.inference_url}/ping", headers=bearer(refused), timeout=10).status_code == 400


def renew_in_a_process(args: tuple[str, str, str]) -> str:
    key_file, management_url, refused = args
    return KeyRing(key_file, management_url).renew("inference", refused)


@pytest.mark.endurance
def test_every_client_keeps_working_across_the_keys_expiry(server: TorchServe, model_store: Path,
                                                          data_root: Path, test_images, tmp_path: Path) -> None:
    """REST and gRPC Locust users (two worker processes each), a long-lived gRPC client, the gRPC CLI,
    the test helpers and the health server, all across the expiry: not one failed request."""
    first = read_key_file(server.key_file)
    run_s = 100
    assert (expiry(server, "inference") - datetime.now().astimezone()).total_seconds() < run_s - 20
    spec = {"host": server.inference_url, "management": server.management_url, "key_file": server.key_file,
            "grpc_target": server.grpc_inference_target, "model": "cifar10", "users": 2, "run_time_s": run_s,
            "workers": 2, "data_dir": str(data_root)}
    image, label = test_images[0]
    with TorchServeGrpc.from_key_file(server.key_file, server.management_url,
                                      inference_target=server.grpc_inference_target,
                                      management_target=server.grpc_management_target) as client, \
            ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(load_test, LoadSpec(protocol=protocol, **spec), tmp_path / protocol, model_store, "test")
                for protocol in ("rest", "grpc")]
        answers = []
        while not all(run.done() for run in runs):  # the same client object before and after the expiry
            answers.append(client.predict("cifar10", image)["label"])
            assert client.describe("cifar10")[0]["modelName"] == "cifar10"
            time.sleep(5)
        summaries = [run.result() for run in runs]
    assert answers.count(CLASSES[label]) == len(answers) >= run_s // 10
    for summary in summaries:
        assert summary["requests"] > 0
        assert summary["failures"] == 0, summary["failure_messages"]
    # The keys really expired and were renewed during the run, not before it.
    renewed = read_key_file(server.key_file)
    assert renewed["inference"] != first["inference"] and renewed["management"] != first["management"]
    cli = grpc_cli(server, "predict", "cifar10", str(write_png(tmp_path, image)))
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)[str(tmp_path / "image.png")]["label"] == CLASSES[label]
    assert server.ready_workers("cifar10") == 1  # the test helpers renew too
    assert requests_status(f"{server.health_url}/ready") == 200


def write_png(directory: Path, image: bytes) -> Path:
    path = directory / "image.png"
    path.write_bytes(image)
    return path


def test_the_grpc_cli_renews_a_key_it_finds_expired(server: TorchServe, test_images, tmp_path: Path) -> None:
    """A CLI started after the expiry, with nobody having renewed the key yet, renews it itself."""
    stale = read_key_file(server.key_file)["inference"]
    wait = (expiry(server, "inference") - datetime.now().astimezone()).total_seconds()
    time.sleep(max(0.0, wait) + 1)
    assert requests.get(f"{server.inference_url}/ping", headers=bearer(stale), timeout=10).status_code == 400
    image, label = test_images[0]
    cli = grpc_cli(server, "predict", "cifar10", str(write_png(tmp_path, image)))
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)[str(tmp_path / "image.png")]["label"] == CLASSES[label]
    assert read_key_file(server.key_file)["inference"] != stale


def test_the_health_server_follows_a_restarted_torchserve_and_its_new_keys(server: TorchServe) -> None:
    """TorchServe restarted in the same directory writes new keys; the running health server, which holds the
    old ones, must re-read them instead of reporting a serving replica as not ready. Last: it restarts the
    module's server."""
    old = read_key_file(server.key_file)
    assert requests_status(f"{server.health_url}/ready") == 200
    processes = server.processes()
    server.torchserve_cli("--stop")  # TorchServe only: the health server keeps running
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive and requests_status(f"{server.health_url}/ready") == 503
    server.start(wait_for=MODELS)
    new = read_key_file(server.key_file)
    assert new["management"] != old["management"] and new["inference"] != old["inference"]
    assert requests_status(f"{server.health_url}/ready") == 200
    assert requests_status(f"{server.health_url}/live") == 200
