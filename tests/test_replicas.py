"""Two supervised replicas behind a real HAProxy, one client key, requests flowing: a replica stopped with
SIGTERM and started again, and model updates (a bad one refused, a good one rolled out), with no failed
request. The benchmark of the same steps, with Locust and a third replica, is ``make replicas``
(docs/REPLICAS.md); here the load is a few threads on keep-alive connections, as a client library holds them.
"""
from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import requests

from clients.grpc_client import TorchServeGrpc
from clients.rollout import held_out_images
from loadtest.balancer import Balancer
from loadtest.replicas import MODEL, default_versions, roll_out, versioned
from server.health import requests_status
from server.proxy import write_private
from server.replica import Replica
from tests.conftest import PORT_OFFSET, needs_haproxy
from training.model import CLASSES

pytestmark = needs_haproxy

BASE = 18600 + PORT_OFFSET
SENDERS = 2
CHECK_IMAGES = 100


@pytest.fixture(scope="module")
def cluster(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    scratch = tmp_path_factory.mktemp("replicas")
    store = scratch / "store"
    store.mkdir()
    (store / f"{MODEL}.mar").symlink_to(model_store / f"{MODEL}.mar")
    versioned(model_store / f"{MODEL}.mar", store / f"{MODEL}_v2.mar", "2.0")
    versioned(model_store / f"{MODEL}.mar", store / f"{MODEL}_v2_rotated.mar", "2.0", rotate_labels=True)
    keys = scratch / "client-keys"
    key = secrets.token_urlsafe(24)
    write_private(keys, f"{key}\n")
    replicas = [Replica(f"r{i}", scratch / f"r{i}", store, keys, BASE + 10 * (i + 1)) for i in range(2)]
    balancer = Balancer(scratch / "balancer", BASE, BASE + 1, replicas)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Replica.start, replicas))
        balancer.start().wait_until({"r0", "r1"}, timeout=60)
        yield {"replicas": replicas, "balancer": balancer, "key": key, "store": store}
    finally:
        balancer.stop()
        for replica in replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.stop()


class Load:
    """SENDERS threads posting test images through the balancer on keep-alive sessions; outcomes tallied."""

    def __init__(self, url: str, key: str, images: list[tuple[bytes, int]]) -> None:
        self.url, self.key, self.images = f"{url}/predictions/{MODEL}", key, images
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()

    def _send(self, sender: int) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "image/png"}
        index = sender
        while not self.stop.is_set():
            body, label = self.images[index % len(self.images)]
            index += SENDERS
            try:
                response = session.post(self.url, data=body, headers=headers, timeout=120)
            except requests.RequestException as error:
                self.outcomes[type(error).__name__] += 1
                continue
            if response.status_code != 200:
                self.outcomes[f"HTTP {response.status_code} {response.text[:80]}"] += 1
            else:
                self.outcomes["answered" if response.json()["label"] in CLASSES else "garbled"] += 1

    def failed(self) -> dict[str, int]:
        return {outcome: count for outcome, count in self.outcomes.items() if outcome != "answered"}

    def more(self, answers: int, timeout: float = 60.0) -> None:
        target = self.outcomes["answered"] + answers
        deadline = time.monotonic() + timeout
        while self.outcomes["answered"] < target:
            assert time.monotonic() < deadline, f"load stalled: {dict(self.outcomes)}"
            time.sleep(0.05)

    def __enter__(self) -> "Load":
        self.threads = [threading.Thread(target=self._send, args=(sender,)) for sender in range(SENDERS)]
        for thread in self.threads:
            thread.start()
        self.more(2 * SENDERS)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def test_one_client_key_for_every_replica_and_nothing_else(cluster, test_images) -> None:
    balancer, key = cluster["balancer"], cluster["key"]
    image = test_images[0][0]
    for replica in cluster["replicas"]:  # the same key, each replica's own proxy
        response = requests.post(f"{replica.rest_url}/predictions/{MODEL}", data=image, timeout=30,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
        assert response.status_code == 200 and response.json()["label"] == CLASSES[test_images[0][1]]
        inner = replica.keys()["inference"]  # TorchServe's own key is not a client credential
        for wrong in (inner, key + "x", ""):
            refused = requests.post(f"{replica.rest_url}/predictions/{MODEL}", data=image, timeout=30,
                                    headers={"Authorization": f"Bearer {wrong}", "Content-Type": "image/png"})
            assert refused.status_code == 401 and "Token Authorization failed" in refused.text
    with TorchServeGrpc(inference_target=balancer.grpc_target, keys={"inference": key}) as client:
        assert client.predict(MODEL, image)["label"] == CLASSES[test_images[0][1]]
    with TorchServeGrpc(inference_target=balancer.grpc_target, keys={"inference": "wrong"}) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.predict(MODEL, image)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def grpc_answers(balancer: Balancer, key: str, image: bytes, label: int) -> None:
    """Four gRPC predictions through the balancer on one channel, then the channel closed: the balancer keeps
    its HTTP/2 connections to the replicas' proxies in its pool, idle."""
    with TorchServeGrpc(inference_target=balancer.grpc_target, keys={"inference": key}) as client:
        for _ in range(4):
            assert client.predict(MODEL, image)["label"] == CLASSES[label]


def test_a_replica_stopped_with_sigterm_drains_and_comes_back_without_a_failed_request(cluster, test_images) -> None:
    balancer, (first, second), key = cluster["balancer"], cluster["replicas"], cluster["key"]
    with Load(balancer.rest_url, key, test_images[:32]) as load:
        grpc_answers(balancer, key, *test_images[0])
        first.terminate()
        time.sleep(0.5)
        assert requests_status(f"{first.health_url}/ready") == 503  # not ready at once, still serving
        try:  # an idle HTTP/2 connection must not hold the stop until HAProxy's hard-stop-after (75 s)
            assert first.wait(timeout=first.drain_s + 30) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"{first.name} still stopping after {first.drain_s + 30:.0f} s:\n{first.log()[-3000:]}")
        assert "proxy drained" in first.log() and "hard stop" not in first.log()
        load.more(4 * SENDERS)  # served by the other replica meanwhile
        assert balancer.up() == {second.name}
        first.start()
        balancer.wait_until({first.name, second.name})
        load.more(4 * SENDERS)
        grpc_answers(balancer, key, *test_images[0])
    assert not load.failed(), dict(load.outcomes)


def roll_out_under_load(cluster, test_images, data_root: Path, archive: str, answers: int) -> list[dict]:
    """``archive`` rolled out to every replica while the load runs (and goes on for ``answers`` more); every
    request answered; the rollout's outcome per replica."""
    images = held_out_images(str(data_root), CHECK_IMAGES)
    with Load(cluster["balancer"].rest_url, cluster["key"], test_images[:32]) as load:
        outcomes = roll_out(cluster["replicas"], cluster["store"] / archive, images)
        load.more(answers)
    assert not load.failed(), dict(load.outcomes)
    return outcomes


def versions_held(replica: Replica) -> list[str]:
    with TorchServeGrpc(replica.grpc_inference_target, replica.grpc_management_target, replica.keys()) as client:
        return [d["modelVersion"] for d in client.describe(MODEL, "all")]


def test_a_bad_model_is_refused_by_the_rollout_and_the_old_one_keeps_serving(cluster, test_images, data_root) -> None:
    replicas = cluster["replicas"]
    outcomes = roll_out_under_load(cluster, test_images, data_root, f"{MODEL}_v2_rotated.mar", 2 * SENDERS)
    for outcome in outcomes:
        assert not outcome["succeeded"] and "held-out test images" in outcome["reason"], outcome
        assert outcome["steps"][-1]["step"] == "rolled back"
    assert default_versions(replicas) == {"r0": "1.0", "r1": "1.0"}
    assert {r.name: versions_held(r) for r in replicas} == {"r0": ["1.0"], "r1": ["1.0"]}  # the refused one is gone


def test_a_model_update_under_load_drops_nothing(cluster, test_images, data_root) -> None:
    replicas = cluster["replicas"]
    outcomes = roll_out_under_load(cluster, test_images, data_root, f"{MODEL}_v2.mar", 4 * SENDERS)
    assert all(outcome["succeeded"] for outcome in outcomes), outcomes
    assert [step["step"] for step in outcomes[0]["steps"]] == [
        "registered with READY workers", "accuracy checked", "made the default", "old version drained",
        "old version unregistered"]
    assert default_versions(replicas) == {"r0": "2.0", "r1": "2.0"}
    assert {r.name: versions_held(r) for r in replicas} == {"r0": ["2.0"], "r1": ["2.0"]}


def helper(replica: Replica, module: str) -> psutil.Process:
    """The supervisor's running child started with ``module``; ValueError when there is none (or several)."""
    running = []
    for child in psutil.Process(replica.process.pid).children():
        try:
            if module in child.cmdline():
                running.append(child)
        except psutil.ZombieProcess:  # killed, not yet reaped by the supervisor
            pass
    (process,) = running
    return process


@pytest.mark.parametrize("module", ["server.renewer", "server.health"])
def test_a_dead_helper_is_restarted(cluster, module: str) -> None:
    replica = cluster["replicas"][1]
    dead = helper(replica, module)
    dead.kill()
    deadline = time.monotonic() + 30
    while True:
        try:
            if helper(replica, module).pid != dead.pid:
                break
        except ValueError:  # between the death and the restart
            pass
        assert time.monotonic() < deadline, f"{module} not restarted"
        time.sleep(0.2)
    assert f"{module.split('.')[1]} exited with -9: restarted" in replica.log()
    deadline = time.monotonic() + 30
    while requests_status(f"{replica.health_url}/ready") != 200:
        assert time.monotonic() < deadline, "the restarted health server does not answer"
        time.sleep(0.2)


def test_a_dead_torchserve_takes_the_whole_replica_down_for_a_restart(cluster) -> None:
    """Last: it ends r1. A replica is never half alive: TorchServe gone, the supervisor drains and stops the rest
    and exits 1, so that the container is restarted."""
    replica, balancer = cluster["replicas"][1], cluster["balancer"]
    torchserve = helper(replica, "--foreground")
    for process in [*torchserve.children(recursive=True), torchserve]:
        process.kill()
    assert replica.wait(timeout=replica.drain_s + 60) == 1
    assert "torchserve exited" in replica.log() and "proxy drained" in replica.log()
    balancer.wait_until({"r0"})
