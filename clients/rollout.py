"""A model update with no request dropped: ``python -m clients.rollout --archive cifar10_v2.mar`` (``make rollout``).

TorchServe leaves the safe order to the operator: a version made default before its workers are
READY answers 503, and unregistering a version stops its workers without draining them (TorchServe
issue #1101: requests in flight get HTTP 500 "Worker scaled down"). Over the gRPC management API,
this command, on one replica:

1. registers the archive (a file name in the server's model store) as a new version of its model,
   synchronously, with as many workers as the default version has, and waits until all are READY;
2. checks it: predictions on held-out CIFAR-10 test images (the last ``--images`` of the test set,
   which the load tests never send) must be at least as accurate as the archive's export recorded,
   within sampling error (loadtest.check.accuracy_floor);
3. makes it the default;
4. waits until the old version has nothing queued for ``--quiet`` seconds in a row (longer than a
   batch takes), at most ``--drain-timeout``; then unregisters it.

A failed check or step rolls back: the old version stays (or is made again) the default, the new
one is unregistered, and the reason is printed; exit status 1. An old version still busy after the
drain timeout is left registered (nothing is dropped) and said so; exit status 1. The server must run
with the model API enabled (``--enable-model-api``), which ``allowed_urls`` confines to the store.

    python -m clients.rollout --archive model_store/cifar10_v2.mar --key-file /var/lib/torchserve/key_file.json
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from clients.grpc_client import (
    INFERENCE_TARGET,
    MANAGEMENT_TARGET,
    MANAGEMENT_URL,
    PredictionError,
    TorchServeGrpc,
    describe_error,
)
from clients.management import ready_workers
from clients.tokens import KeyRing
from loadtest.archive import read_archive
from loadtest.check import accuracy_floor
from training.data import CIFAR10, default_data_dir


class RolloutFailed(Exception):
    """A step failed; the message says which and why."""


@dataclass
class Outcome:
    """What a rollout did, step by step, for the operator and the benchmark's report."""

    model: str
    old_version: str | None
    new_version: str
    succeeded: bool = False
    reason: str = ""
    accuracy: float | None = None
    floor: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def step(self, name: str, started: float, **details: Any) -> None:
        self.steps.append({"step": name, "seconds": round(time.monotonic() - started, 2), **details})
        print(f"rollout {self.model} {self.old_version} -> {self.new_version}: {name} "
              f"({self.steps[-1]['seconds']} s){' ' + json.dumps(details) if details else ''}", flush=True)


def held_out_images(data_dir: str, count: int) -> list[tuple[bytes, str]]:
    """The last ``count`` CIFAR-10 test images as PNG bytes with their class names."""
    dataset = CIFAR10(data_dir, train=False)
    images = []
    for index in range(len(dataset) - count, len(dataset)):
        image, label = dataset[index]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append((buffer.getvalue(), dataset.classes[label]))
    return images


def check_accuracy(client: TorchServeGrpc, model: str, version: str, images: list[tuple[bytes, str]],
                   recorded: float) -> tuple[float, float]:
    """Accuracy of ``version`` on ``images`` and the lowest one consistent with ``recorded``; raises when below."""
    correct = 0
    for image, label in images:
        try:
            correct += client.predict(model, image, version=version)["label"] == label
        except PredictionError:
            pass  # a refused test image is a wrong answer
    accuracy, floor = correct / len(images), accuracy_floor(recorded, len(images))
    if accuracy < floor:
        raise RolloutFailed(f"version {version} answered {100 * accuracy:.1f}% of {len(images)} held-out test images "
                            f"right; its export recorded {100 * recorded:.2f}%, so at least {100 * floor:.1f}% was due")
    return accuracy, floor


def wait_ready(client: TorchServeGrpc, model: str, version: str, workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while ready_workers(client.describe(model, version)[0]) < workers:
        if time.monotonic() > deadline:
            raise RolloutFailed(f"version {version} has fewer than {workers} READY worker(s) after {timeout:.0f} s")
        time.sleep(0.5)


def pending(client: TorchServeGrpc, model: str, version: str) -> int:
    """Requests queued for ``version`` (DescribeModel's job queue status)."""
    return int(client.describe(model, version)[0]["jobQueueStatus"]["pendingRequests"])


def wait_drained(client: TorchServeGrpc, model: str, version: str, quiet_s: float, timeout: float) -> bool:
    """True once ``version`` had nothing queued for ``quiet_s`` seconds in a row: requests routed to it before
    the switch are queued or in a worker's batch, and a batch ends well within ``quiet_s``."""
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        if pending(client, model, version) > 0:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return True
        time.sleep(0.2)
    return False


def rollout(client: TorchServeGrpc, archive: Path, images: list[tuple[bytes, str]], workers: int | None = None,
            quiet_s: float = 3.0, drain_timeout: float = 120.0, ready_timeout: float = 300.0) -> Outcome:
    """Register, check, switch, drain, unregister (see the module docstring); rolls back on any failure."""
    contents = read_archive(archive)
    model, version = contents.manifest["model"]["modelName"], contents.manifest["model"]["modelVersion"]
    current = client.describe(model)[0]
    outcome = Outcome(model, current["modelVersion"], version)
    recorded = contents.metadata.get("verification", {}).get("accuracy")
    if outcome.old_version == version:
        outcome.reason = f"version {version} of {model} is already the default"
        return outcome
    if recorded is None:
        outcome.reason = f"{archive.name} records no verified accuracy to check the new version against"
        return outcome
    workers = workers or max(1, len(current["workers"]))
    registered = switched = False
    try:
        started = time.monotonic()
        client.register(archive.name, initial_workers=workers, synchronous=True)
        registered = True
        wait_ready(client, model, version, workers, ready_timeout)
        outcome.step("registered with READY workers", started, workers=workers)
        started = time.monotonic()
        outcome.accuracy, outcome.floor = check_accuracy(client, model, version, images, recorded)
        outcome.step("accuracy checked", started, images=len(images), accuracy=round(outcome.accuracy, 4),
                     floor=round(outcome.floor, 4))
        started = time.monotonic()
        client.set_default(model, version)
        switched = True
        outcome.step("made the default", started)
    except (RolloutFailed, grpc.RpcError) as error:
        outcome.reason = str(error) if isinstance(error, RolloutFailed) else describe_error(error, client.management_target)
        roll_back(client, outcome, registered, switched)
        return outcome
    started = time.monotonic()
    if not wait_drained(client, model, outcome.old_version, quiet_s, drain_timeout):
        outcome.reason = (f"version {outcome.old_version} still had requests queued after {drain_timeout:.0f} s: "
                          "left registered (unregister it once idle)")
        return outcome
    outcome.step("old version drained", started, quiet_s=quiet_s)
    started = time.monotonic()
    client.unregister(model, outcome.old_version)
    outcome.step("old version unregistered", started)
    outcome.succeeded = True
    return outcome


def roll_back(client: TorchServeGrpc, outcome: Outcome, registered: bool, switched: bool) -> None:
    """The old version serving as default again and the new one gone; a failure here is added to the reason."""
    started = time.monotonic()
    try:
        if switched:
            client.set_default(outcome.model, outcome.old_version)
        if registered:
            client.unregister(outcome.model, outcome.new_version)
        outcome.step("rolled back", started, reason=outcome.reason)
    except grpc.RpcError as error:
        outcome.reason += f"; rolling back failed too: {describe_error(error, client.management_target)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True,
                        help="the new .mar; its file name must be in the server's model store")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="the replica's key_file.json")
    parser.add_argument("--management-url", default=MANAGEMENT_URL, help="REST management address (key renewal)")
    parser.add_argument("--inference-target", default=INFERENCE_TARGET)
    parser.add_argument("--management-target", default=MANAGEMENT_TARGET)
    parser.add_argument("--workers", type=int, help="workers of the new version (default: as many as the old one)")
    parser.add_argument("--images", type=int, default=500, help="held-out test images to check (default: 500)")
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds with nothing queued that mean drained")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--data-dir", default=default_data_dir())
    args = parser.parse_args(argv)
    images = held_out_images(args.data_dir, args.images)
    keys = KeyRing(args.key_file, args.management_url)
    with TorchServeGrpc(args.inference_target, args.management_target, keys) as client:
        outcome = rollout(client, args.archive, images, args.workers, args.quiet, args.drain_timeout)
    print(json.dumps(asdict(outcome), indent=2))
    if not outcome.succeeded:
        print(f"rollout refused: {outcome.reason}", file=sys.stderr)
    return 0 if outcome.succeeded else 1


if __name__ == "__main__":
    raise SystemExit(main())
