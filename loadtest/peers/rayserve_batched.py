"""Peer: Ray Serve, one replica per inference process (``num_cpus`` = its threads), batching with ``@serve.batch``.

A local Ray cluster confined to processes x threads CPUs runs as children of this process (so the
benchmark meters and stops all of it), Serve's HTTP proxy on ``--port`` hands each request to a
replica, and each replica batches up to ``--batch-size`` requests within ``--batch-delay-ms`` and runs
the batch in a thread, off its event loop, one batch at a time. Access logs are off, as for every peer.
``python -m loadtest.peers.rayserve_batched --archive model_store/cifar10.mar --port 8000 --processes 2
--batch-size 8 --registry DIR``
"""
import asyncio
import atexit
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from loadtest.peers.common import ROUTE, PeerConfig, archive_handler, classify, status_of

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a benchmark
OBJECT_STORE_BYTES = 128 << 20  # requests and answers are a few KiB; Ray's default reserves 30% of the memory


class Cifar10:
    def __init__(self, config: PeerConfig) -> None:
        self.handler = archive_handler(config)
        self.classify_batch.set_max_batch_size(config.batch_size)
        self.classify_batch.set_batch_wait_timeout_s(config.batch_delay_ms / 1000)

    @serve.batch
    async def classify_batch(self, bodies: list[bytes]) -> list[Any]:
        return await asyncio.to_thread(classify, self.handler, bodies)

    async def __call__(self, request: Request) -> JSONResponse:
        answer = await self.classify_batch(await request.body())
        return JSONResponse(answer, status_code=status_of(answer))


def serve_forever(config: PeerConfig) -> None:
    """Start the cluster and the application, then wait for SIGTERM and take both down."""
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    atexit.register(shutil.rmtree, temp_dir, True)
    ray.init(num_cpus=config.processes * config.threads, include_dashboard=False, _temp_dir=temp_dir,
             object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": config.port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    deployment = serve.deployment(Cifar10, num_replicas=config.processes,
                                  ray_actor_options={"num_cpus": config.threads},
                                  max_ongoing_requests=2 * config.batch_size)  # room to fill a batch while one runs
    serve.run(deployment.bind(config), route_prefix=ROUTE)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    serve_forever(PeerConfig.from_arguments(__doc__))
