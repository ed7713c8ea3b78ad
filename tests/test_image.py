"""The built container image, run the way torchserve.yaml runs it (`make image-test`).

Skipped unless CIFAR10_TEST_IMAGE names a built image (make image-test sets it): Docker and a ~10 GB image are
not part of the default suite. The container runs as the image's non-root user with a read-only root
file system, a tmpfs /tmp, no capabilities and the manifest's memory limit; its working directory is
a host directory, which is how a client gets key_file.json. The test talks to it only on 127.0.0.1
(ports published there), never on a bridge address.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
import torch
import yaml

from clients.grpc_client import PredictionError, TorchServeGrpc
from clients.tokens import bearer, read_key_file
from server.config import REPO_ROOT
from tests.conftest import PORT_OFFSET
from tests.test_serving import probabilities_of, reference_probabilities  # noqa: F401 (fixture)
from training.model import CLASSES

IMAGE = os.environ.get("CIFAR10_TEST_IMAGE")
DOCKER = os.environ.get("DOCKER", "docker")
pytestmark = pytest.mark.skipif(not IMAGE, reason="needs a built image: make image-test")

CONTAINER_PORTS = {"http": 8080, "grpc": 7070, "metrics": 8082, "health": 8083}
HOST_PORTS = {name: 18400 + PORT_OFFSET + i for i, name in enumerate(CONTAINER_PORTS)}
WORKDIR = "/var/lib/torchserve"
KEYS_DIR = "/etc/cifar10/client-keys"  # the Dockerfile's ACCEPTED_CLIENTS_FILE is KEYS_DIR/keys
START_TIMEOUT = 600
RESULTS = REPO_ROOT / "build" / "image" / "image-test.json"


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout)


DEPLOYMENT = next(yaml.safe_load_all((REPO_ROOT / "deploy" / "kubernetes" / "cpu" / "torchserve.yaml").read_text()))
GRACE_S = DEPLOYMENT["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def manifest_memory_limit() -> str:
    limit = DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    return limit.replace("Gi", "g").replace("Mi", "m")


class Container:
    def __init__(self, name: str, workdir: Path, client_key: str) -> None:
        self.name = name
        self.workdir = workdir
        self.client_key = client_key  # what the replica's proxy accepts (the Secret's file)
        self.memory = ""

    def url(self, port: str) -> str:
        return f"http://127.0.0.1:{HOST_PORTS[port]}"

    @property
    def keys(self) -> dict[str, str]:
        return read_key_file(self.workdir / "key_file.json")

    def health(self) -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", self.name).stdout.strip()

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *command, check=False)

    def read_memory(self) -> str:
        """What ``docker stats`` shows of its memory (it takes a second or two)."""
        self.memory = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", self.name).stdout.strip()
        return self.memory

    def stop(self) -> int:
        """``docker stop`` (SIGTERM, SIGKILL after the manifest's grace period); records what the run measured;
        the exit code."""
        if docker("inspect", "-f", "{{.State.Running}}", self.name).stdout.strip() == "true":
            memory = self.memory or self.read_memory()
            stopping = time.monotonic()
            docker("kill", "--signal", "KILL", self.name, timeout=GRACE_S + 60)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({
                "image": IMAGE, "seconds_to_healthy": round(getattr(self, "seconds_to_healthy", -1), 1),
                "memory_before_stop": memory, "stop_seconds": round(time.monotonic() - stopping, 1),
            }, indent=2) + "\n")
        return int(docker("inspect", "-f", "{{.State.ExitCode}}", self.name).stdout.strip())


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Container:
    workdir = tmp_path_factory.mktemp("image-workdir")
    uid, gid = docker("image", "inspect", "-f", "{{.Config.User}}", IMAGE).stdout.strip().split(":")
    try:
        os.chown(workdir, int(uid), int(gid))  # the volume must be writable by the image's user
    except PermissionError:  # not root: let anyone write it
        workdir.chmod(0o777)
    keys_dir = tmp_path_factory.mktemp("client-keys")
    client_key = secrets.token_urlsafe(24)
    (keys_dir / "keys").write_text(f"{client_key}\n")
    try:  # readable by the image's user only, as the Secret's 0440 with fsGroup
        os.chown(keys_dir, int(uid), int(gid))
        os.chown(keys_dir / "keys", int(uid), int(gid))
        (keys_dir / "keys").chmod(0o400)
    except PermissionError:
        keys_dir.chmod(0o755)
        (keys_dir / "keys").chmod(0o444)
    name = f"cifar10-image-test-{os.getpid()}"
    publish = [f"--publish=127.0.0.1:{HOST_PORTS[p]}:{port}" for p, port in CONTAINER_PORTS.items()]
    started = time.monotonic()
    docker("run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--memory", manifest_memory_limit(),
           "--volume", f"{workdir}:{WORKDIR}", "--volume", f"{data_root.resolve()}:/data:ro",
           "--volume", f"{keys_dir}:{KEYS_DIR}:ro", *publish, IMAGE)
    box = Container(name, workdir, client_key)
    try:
        while (status := box.health()) != "healthy":
            assert status in ("starting", ""), f"container {status}: {docker('logs', name, check=False).stderr[-3000:]}"
            assert time.monotonic() - started < START_TIMEOUT, "not healthy in time"
            time.sleep(2)
        box.seconds_to_healthy = time.monotonic() - started
        yield box
    finally:
        box.stop()
        logs = docker("logs", name, check=False)
        docker("rm", "--force", name, check=False)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        (RESULTS.parent / "container.log").write_text(logs.stdout + logs.stderr)


def test_runs_as_the_images_non_root_user(container: Container) -> None:
    assert container.exec("id", "-u").stdout.strip() == "10001"
    assert container.exec("touch", "/var/tmp/probe").returncode != 0  # world-writable, but the root fs is read-only


def test_health_endpoints_need_no_secret_and_say_nothing_else(container: Container) -> None:
    for probe, status in (("live", "alive"), ("ready", "ready")):
        response = requests.get(f"{container.url('health')}/{probe}", timeout=10)
        assert response.status_code == 200 and response.json() == {"status": status}


def test_key_file_is_written_to_the_mounted_working_directory(container: Container) -> None:
    keys = container.keys
    assert set(keys) == {"inference", "management", "API"} and all(keys.values())


def test_rest_predictions_with_the_client_key(container: Container, test_images, reference_probabilities) -> None:  # noqa: F811
    key = container.client_key
    for model in ("cifar10_torchscript", "cifar10"):
        responses = [requests.post(f"{container.url('http')}/predictions/{model}", data=body, timeout=60,
                                   headers=bearer(key) | {"Content-Type": "image/png"}) for body, _ in test_images]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
        served = torch.tensor([probabilities_of(r) for r in responses])
        if model == "cifar10_torchscript":  # fp32: the checkpoint's own numbers
            torch.testing.assert_close(served, reference_probabilities, atol=1e-4, rtol=0)
        else:  # the default static INT8 variant: the same standard as tests/test_serving.py
            assert (served.argmax(1) == reference_probabilities.argmax(1)).float().mean() >= 0.95


def test_grpc_predictions_with_the_client_key(container: Container, test_images) -> None:
    client = TorchServeGrpc(f"127.0.0.1:{HOST_PORTS['grpc']}", "127.0.0.1:1", keys={"inference": container.client_key})
    body, label = test_images[0]
    assert client.predict("cifar10", body)["label"] == CLASSES[label]
    with pytest.raises(PredictionError) as refused:
        client.predict("cifar10", b"not an image")
    assert refused.value.code == 415
    anonymous = TorchServeGrpc(f"127.0.0.1:{HOST_PORTS['grpc']}", "127.0.0.1:1", keys=None)
    with pytest.raises(grpc.RpcError) as denied:
        anonymous.predict("cifar10", body)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the replica's proxy refuses it


def test_bad_input_and_missing_or_internal_keys_are_refused(container: Container, test_images) -> None:
    url = f"{container.url('http')}/predictions/cifar10"
    bad = requests.post(url, data=b"not an image", timeout=60,
                        headers=bearer(container.client_key) | {"Content-Type": "application/octet-stream"})
    assert bad.status_code == 415 and bad.json()["type"] == "BadInput"
    for headers in ({}, bearer(container.keys["inference"])):  # TorchServe's own key is not a client credential
        refused = requests.post(url, data=test_images[0][0], headers=headers | {"Content-Type": "image/png"}, timeout=60)
        assert refused.status_code == 401 and "Token Authorization failed" in refused.text


def test_management_api_listens_on_the_containers_loopback_only(container: Container) -> None:
    probe = ("import socket, sys; host = sys.argv[1]; s = socket.socket(); s.settimeout(3); "
             "print(s.connect_ex((host, 8081)))")
    own_address = container.exec("python", "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))")
    assert container.exec("python", "-c", probe, "127.0.0.1").stdout.strip() == "0"
    assert container.exec("python", "-c", probe, own_address.stdout.strip()).stdout.strip() != "0"


def test_workers_and_threads_follow_the_containers_cores(container: Container) -> None:
    """The entrypoint applies the serve-time plan (server.scaler): one single-threaded cifar10 worker per
    core the container is given (as many as its memory limit holds), one for every other model; the
    archives alone would start 1 x 1. The scaler, done, leaves no zombie behind."""
    cores = int(container.exec("python", "-c", "from server.plan import plan_from_environment; "
                               "print(plan_from_environment().default_workers)").stdout)
    describe = ("import json; from clients.tokens import KeyRing; ring = KeyRing('key_file.json'); "
                "print(json.dumps({m: len([w for w in ring.request('management', 'GET', "
                "f'http://127.0.0.1:8081/models/{m}', timeout=10).json()[0]['workers'] if w['status'] == 'READY']) "
                "for m in ('cifar10', 'cifar10_onnx')}))")
    deadline = time.monotonic() + 120
    while (ready := json.loads(container.exec("python", "-c", describe).stdout or "{}")) != {
            "cifar10": cores, "cifar10_onnx": 1} and time.monotonic() < deadline:
        time.sleep(2)
    assert ready == {"cifar10": cores, "cifar10_onnx": 1}
    threads = re.findall(r"W-\d+-cifar10_1\.0-stdout MODEL_LOG - loaded \S+ \(\S+\) on cpu with (\d+) thread",
                         (container.workdir / "logs" / "model_log.log").read_text())
    assert threads == ["1"] * cores
    assert "Z" not in container.exec("sh", "-c", "cat /proc/[0-9]*/stat | cut -d' ' -f3").stdout.split()


def test_the_projects_tools_run_inside_the_image(container: Container) -> None:
    """What Locust pods and an operator's `kubectl exec` run: the load test from the read-only venv, against
    the container's own TorchServe over gRPC (stubs made at build time) with the image's config's addresses."""
    result = container.exec("python", "-m", "loadtest", "--protocol", "grpc", "--key-file", f"{WORKDIR}/key_file.json",
                            "--data-dir", "/data", "--users", "4", "--run-time", "5", "--output-dir", f"{WORKDIR}/load")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((container.workdir / "load" / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["answered"] > 0


def test_metrics_carry_the_autoscalers_counter(container: Container) -> None:
    rules = yaml.safe_load(next(yaml.safe_load_all(
        (REPO_ROOT / "deploy" / "kubernetes" / "prometheus-adapter-rules.yaml").read_text()))["data"]["config.yaml"])
    metric = rules["rules"][0]["seriesQuery"].split("{", 1)[0]
    text = requests.get(f"{container.url('metrics')}/metrics", timeout=10).text
    assert f"# TYPE {metric} counter" in text and f'{metric}{{' in text


def test_stops_on_sigterm_under_load_serving_through_the_drain(container: Container, test_images) -> None:
    """Runs last: tini hands SIGTERM to the supervisor. Under load, /ready turns 503 at once while every
    request sent in the drain window (DRAIN_SECONDS, while a Service removes the endpoint) is answered;
    after it HAProxy closes its listeners and finishes what it holds: no request gets an HTTP error, only
    connections refused; exit 0 before the grace period, nothing needs SIGKILL (137)."""
    drain_s = float(docker("exec", container.name, "printenv", "DRAIN_SECONDS").stdout.strip())
    url, headers = f"{container.url('http')}/predictions/cifar10", bearer(container.client_key)
    stop, outcomes = threading.Event(), []  # (seconds after SIGTERM when sent, outcome)

    def send(offset: int) -> None:
        session, index = requests.Session(), offset
        while not stop.is_set():
            body = test_images[index % len(test_images)][0]
            index += 2
            sent = time.monotonic()
            try:
                response = session.post(url, data=body, headers=headers | {"Content-Type": "image/png"}, timeout=60)
                outcome = "answered" if response.status_code == 200 and response.json()["label"] in CLASSES \
                    else f"HTTP {response.status_code}"
            except requests.ConnectionError as error:
                outcome = f"connection: {type(error.__context__ or error).__name__}"
                time.sleep(0.05)
            outcomes.append((sent - signalled, outcome))

    signalled = time.monotonic() + 3600
    senders = [threading.Thread(target=send, args=(offset,)) for offset in range(2)]
    for sender in senders:
        sender.start()
    container.read_memory()  # under load, and before the stop starts: docker stats takes a second or two
    with ThreadPoolExecutor(1) as pool:
        signalled = time.monotonic()
        stopped = pool.submit(container.stop)
        time.sleep(1)
        assert requests.get(f"{container.url('health')}/ready", timeout=5).status_code == 503
        code = stopped.result()
    stop.set()
    for sender in senders:
        sender.join()
    assert code == 0 and json.loads(RESULTS.read_text())["stop_seconds"] < GRACE_S
    in_window = [outcome for at, outcome in outcomes if at < drain_s - 0.5]
    assert len(in_window) > 20 and set(in_window) == {"answered"}, Counter(in_window)
    assert not [outcome for _, outcome in outcomes if outcome.startswith("HTTP")], Counter(o for _, o in outcomes)
    logs = docker("logs", container.name, check=False)
    assert "proxy drained" in logs.stdout + logs.stderr and "hard stop" not in logs.stdout + logs.stderr
