"""Locust users for the CIFAR-10 TorchServe deployment: REST (``RestUser``) and gRPC (``GrpcUser``).

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 20s --host http://127.0.0.1:8080 RestUser \
        --model cifar10 --images-per-request 4 --key-file key_file.json

Each user sends real CIFAR-10 test images (a pool of PNGs encoded once per process, cycled across
users) with the inference token (renewed through TorchServe's token API when it expires, the
request then retried once and timed as one), checks every answer (a CIFAR-10 label, 10 probabilities summing to
~1, one answer per image) and fails the request otherwise. Users wait for nothing between requests
(closed loop), so ``-u`` is the number of requests in flight.

Images, not requests, are the unit of throughput once requests carry several images, and only right
answers are served examples. So every prediction request is mirrored in Locust's own stats by one
``EXAMPLES`` entry per image sent (same latency, failed when the request failed: attempts) and one
``CORRECT`` entry per image answered with its true label (goodput). A wrong label does not fail the
request (the server answered), but it never counts as goodput. See docs/LOADTEST.md.
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, events, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from clients.grpc_client import MANAGEMENT_URL, TorchServeGrpc
from clients.tokens import KeyRing, is_refusal
from loadtest.check import answer_error, correct_labels
from loadtest.entries import CORRECT, EXAMPLES, request_entry
from loadtest.images import multipart, test_images, true_labels
from training.data import default_data_dir

grpc_gevent.init_gevent()  # grpc's blocking calls must yield to gevent, or one call would stall every user

_image_cursor = itertools.count()  # shared by the users of a process, so they walk the pool together
_key_rings: dict[tuple[str, str], KeyRing] = {}  # one per process and server: a renewal serves every user


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--model", default="cifar10", help="model name to call (default: cifar10)")
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="images per REST request; more than one are sent as multipart fields (default: 1)")
    parser.add_argument("--key-file", default="key_file.json",
                        help="key_file.json of the running TorchServe (default: ./key_file.json)")
    parser.add_argument("--management-url", default=MANAGEMENT_URL,
                        help="its REST management address, whose token API renews expired keys (default: %(default)s)")
    parser.add_argument("--grpc-target", default="127.0.0.1:7070", help="gRPC inference host:port")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--image-pool", type=int, default=256, help="distinct test images cycled (default: 256)")


@events.init.add_listener
def encode_images(environment: Environment, **kwargs: Any) -> None:
    """Encode the image pool before the test starts, so that the timed window never pays for it."""
    options = environment.parsed_options
    if options is not None and not isinstance(environment.runner, MasterRunner):
        test_images(options.data_dir, options.image_pool)


@events.quitting.add_listener
def final_csv_snapshot(environment: Environment, **kwargs: Any) -> None:
    """Locust rewrites its --csv files every second but not once more at exit, so they would miss the
    last second; by ``quitting`` the users have stopped, and one more writer cycle makes them final."""
    options = environment.parsed_options
    if options is not None and options.csv_prefix and not isinstance(environment.runner, WorkerRunner):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)


@events.request.add_listener
def count_examples(context: dict[str, Any] | None, response_time: float, exception: Exception | None,
                   **kwargs: Any) -> None:
    """One EXAMPLES entry per image of a prediction request (marked by ``context["examples"]``) and one
    CORRECT entry per image whose answer carried its true label (``context["correct"]``)."""
    if not context or "examples" not in context:
        return
    for _ in range(context["examples"]):
        events.request.fire(request_type=EXAMPLES, name=context["model"], response_time=response_time,
                            response_length=0, exception=exception, context={})
    for _ in range(0 if exception else context.get("correct", 0)):
        events.request.fire(request_type=CORRECT, name=context["model"], response_time=response_time,
                            response_length=0, exception=None, context={})


class Cifar10User(User):
    """Options, images and answer checking shared by both protocols."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.model: str = options.model
        self.images_per_request: int = options.images_per_request
        self.pool, self.classes = test_images(options.data_dir, options.image_pool)
        self.truth = true_labels(options.data_dir, options.image_pool)
        ring_id = (options.key_file, options.management_url)
        if ring_id not in _key_rings:
            _key_rings[ring_id] = KeyRing(*ring_id)
        self.keys = _key_rings[ring_id]

    def next_images(self) -> tuple[list[bytes], list[str]]:
        """The next images of the pool and their true labels."""
        start = next(_image_cursor) * self.images_per_request
        indices = [(start + i) % len(self.pool) for i in range(self.images_per_request)]
        return [self.pool[i] for i in indices], [self.truth[i] for i in indices]

    def check(self, answer: Any, truth: list[str]) -> tuple[str | None, int]:
        """Why the answer is malformed (or None), and how many of its labels are right."""
        error = answer_error(answer, self.classes, len(truth))
        return error, 0 if error is not None else correct_labels(answer, truth)

    def context(self) -> dict[str, Any]:
        return {"examples": self.images_per_request, "model": self.model}


class RestUser(Cifar10User, FastHttpUser):
    """POST /predictions/<model>: the PNG as the raw body, or several PNGs as multipart fields."""

    abstract = False

    @task
    def predict(self) -> None:
        images, truth = self.next_images()
        body, content_type = (images[0], "image/png") if len(images) == 1 else multipart(images)
        _, name = request_entry("rest", self.model)
        with self.post(name, body, content_type) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                error, correct = self.check(response.json(), truth)
            except ValueError as err:
                error, correct = f"answer is not JSON: {err}", 0
            if error is not None:
                response.failure(error)
            response.request_meta["context"]["correct"] = correct  # read by count_examples


    def post(self, path: str, body: bytes, content_type: str) -> ResponseContextManager:
        """The request, still to be checked and reported; a refused (expired) key is renewed and the
        request sent again, reported once with the time of both attempts."""
        key = self.keys["inference"]
        attempt = self.client.post(path, data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
                                   name=path, context=self.context(), catch_response=True)
        if not is_refusal(attempt.status_code, attempt.content or b""):
            return attempt
        retry = self.client.post(path, data=body, name=path, context=self.context(), catch_response=True,
                                 headers={"Authorization": f"Bearer {self.keys.renew('inference', key)}",
                                          "Content-Type": content_type})
        retry.request_meta["response_time"] += attempt.request_meta["response_time"]
        return retry


class GrpcUser(Cifar10User):
    """TorchServe's gRPC Predictions call through clients.grpc_client, one image per call.

    One image per call because the gRPC input is a protobuf map, whose order is not preserved, so
    several images in one call could not be matched to their answers.
    """

    abstract = False

    def on_start(self) -> None:
        super().on_start()
        if self.images_per_request != 1:
            raise ValueError("GrpcUser sends one image per call: use --images-per-request 1")
        self.client = TorchServeGrpc(inference_target=self.environment.parsed_options.grpc_target, keys=self.keys)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def predict(self) -> None:
        (image,), truth = self.next_images()
        correct = 0
        exception: Exception | None = None
        answer = b""
        start = time.perf_counter()
        try:
            answer = self.client.predict_raw(self.model, image)
        except grpc.RpcError as err:
            exception = err
        elapsed_ms = 1e3 * (time.perf_counter() - start)
        if exception is None:
            try:
                error, correct = self.check(json.loads(answer), truth)
            except ValueError as err:
                error = f"answer is not JSON: {err}"
            exception = AssertionError(error) if error is not None else None
        request_type, name = request_entry("grpc", self.model)
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=elapsed_ms,
            response_length=len(answer), exception=exception, context=self.context() | {"correct": correct})
