"""A killed or hung model worker is replaced while requests keep coming, and only in-flight requests fail.

Its own TorchServe (shipped config, ports 18140..18144) serves a copy of cifar10.mar whose
responseTimeout is short, so that a hung worker is detected in seconds. The fault injection and
recovery check are the benchmark's own (loadtest/faults.py, figures in docs/FAULTS.md); here the
load is a few threads sending back to back, and the bounds are generous: they catch a worker that
never comes back, not a slow machine.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from clients.tokens import bearer
from loadtest.faults import gone, inject, with_response_timeout
from server.launcher import TorchServe
from tests.conftest import ports_for
from training.model import CLASSES

MODEL = "cifar10"
RESPONSE_TIMEOUT_S = 4
SENDERS = 3  # requests in flight at any moment: the most that a fault may cost
RECOVERY_BOUND_S = 90  # far above a worker's start on 2 busy cores (docs/FAULTS.md)


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    workdir = tmp_path_factory.mktemp("torchserve-faults")
    store = workdir / "store"
    with_response_timeout(model_store / f"{MODEL}.mar", store, RESPONSE_TIMEOUT_S)
    server = TorchServe(workdir=workdir, model_store=store, overrides=ports_for(18140))
    server.start(wait_for=[MODEL])
    yield server
    server.stop()


class Load:
    """SENDERS threads sending test images back to back; every answer is tallied by outcome."""

    def __init__(self, server: TorchServe, images: list[tuple[bytes, int]]) -> None:
        self.server, self.images = server, images
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(SENDERS)

    def _send(self, sender: int) -> None:
        headers = bearer(self.server.keys["inference"]) | {"Content-Type": "image/png"}
        index = sender
        while not self.stop.is_set():
            body, label = self.images[index % len(self.images)]
            index += SENDERS
            response = requests.post(f"{self.server.inference_url}/predictions/{MODEL}", data=body, headers=headers,
                                     timeout=120)
            if response.status_code != 200:
                self.outcomes[f"HTTP {response.status_code}"] += 1
            else:
                self.outcomes["answered" if response.json()["label"] in CLASSES else "garbled"] += 1

    def wait_for(self, answers: int, timeout: float = 60.0) -> bool:
        """True once ``answers`` requests have come back."""
        deadline = time.monotonic() + timeout
        while sum(self.outcomes.values()) < answers:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def __enter__(self) -> "Load":
        self.futures = [self.pool.submit(self._send, sender) for sender in range(SENDERS)]
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_faulty_worker_is_replaced_and_costs_only_the_requests_in_flight(server, test_images, fault):
    probe = (test_images[0][0], CLASSES[test_images[0][1]])
    with Load(server, test_images[:32]) as load:
        assert load.wait_for(2 * SENDERS)  # the load is flowing before the fault
        recovery = inject(server, MODEL, fault, probe, timeout=RESPONSE_TIMEOUT_S + RECOVERY_BOUND_S)
        assert load.wait_for(sum(load.outcomes.values()) + 4 * SENDERS)  # and after the recovery
    assert recovery.recovered is not None, f"no new worker answered within {RESPONSE_TIMEOUT_S + RECOVERY_BOUND_S} s"
    assert recovery.new_pid != recovery.old_pid and gone(recovery.old_pid)
    if fault == "hang":  # TorchServe waited for the response timeout, not less
        assert recovery.seconds >= RESPONSE_TIMEOUT_S
    failed = sum(count for outcome, count in load.outcomes.items() if outcome != "answered")
    assert load.outcomes["answered"] > 6 * SENDERS and failed <= SENDERS, load.outcomes
    print(f"{fault}: recovered in {recovery.seconds} s, outcomes {dict(load.outcomes)}")
