"""One Locust user for TorchServe and every peer alike: a real CIFAR-10 test PNG per request, and
goodput, the answers whose label is the image's true label.

    locust -f loadtest/peers/locustfile.py --headless -u 16 -t 30s --host http://127.0.0.1:8000 \
        --key-file key_file.json    # the key only for TorchServe, whose token authorization stays on

A request fails when the server errs or the answer is malformed (loadtest.check); a well-formed
answer with the wrong label is a success for the server but not goodput, so it is not mirrored in
the ``GOODPUT`` entry, which counts correct answers only (its Requests/s is goodput per second).
"""
from __future__ import annotations

import itertools
from functools import cache
from typing import Any

from locust import FastHttpUser, constant, events, task

from clients.tokens import bearer, read_key_file
from loadtest.check import answer_error
from loadtest.images import test_images
from loadtest.peers.common import GOODPUT, ROUTE
from training.data import CIFAR10, default_data_dir

_cursor = itertools.count()  # shared by the users of the process, so they walk the pool together


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--key-file", default="", help="TorchServe's key_file.json (default: no token)")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--image-pool", type=int, default=256, help="distinct test images cycled (default: 256)")


@cache
def labelled_pool(data_dir: str, count: int) -> tuple[tuple[bytes, ...], tuple[str, ...], tuple[str, ...]]:
    """PNG bodies, their true class names, and the class names in label order."""
    pngs, classes = test_images(data_dir, count)
    targets = CIFAR10(data_dir, train=False).targets[:len(pngs)]
    return pngs, tuple(classes[target] for target in targets), classes


class PeerUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.pngs, self.truth, self.classes = labelled_pool(options.data_dir, options.image_pool)
        self.headers = {"Content-Type": "image/png"}
        if options.key_file:
            self.headers |= bearer(read_key_file(options.key_file)["inference"])

    @task
    def predict(self) -> None:
        index = next(_cursor) % len(self.pngs)
        with self.client.post(ROUTE, data=self.pngs[index], headers=self.headers, name=ROUTE,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                answer = response.json()
                error = answer_error(answer, self.classes, 1)
            except ValueError as err:
                error = f"answer is not JSON: {err}"
            if error is not None:
                response.failure(error)
                return
            if answer["label"] == self.truth[index]:
                events.request.fire(request_type=GOODPUT, name=ROUTE, response_time=response.request_meta["response_time"],
                                    response_length=0, exception=None, context={})
