"""Peer: FastAPI behind ``uvicorn --workers N``, one process per core, as FastAPI's deployment docs advise.

The endpoint is a plain ``def``: FastAPI runs it in its thread pool, off the event loop, so HTTP and
JSON go on while the model runs. Each process's pool is capped at one model call at a time (with
``--threads`` intra-op threads), as a TorchServe worker runs one batch at a time; FastAPI has no
batching. An ``async def`` endpoint that hands the model to a thread (``anyio.to_thread``) would do
exactly what FastAPI does for this ``def`` one, so there is no separate async peer.

``python -m loadtest.peers.fastapi_workers --archive model_store/cifar10.mar --port 8000 --processes 2 --registry DIR``
"""
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio.to_thread
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from loadtest.peers.common import ROUTE, PeerConfig, archive_handler, classify, status_of

READY_TIMEOUT_S = 120


def create_app() -> FastAPI:
    """Called by uvicorn in each worker process: the settings come from the environment the supervisor passes on."""
    handler = archive_handler(PeerConfig.from_env())

    @asynccontextmanager
    async def one_call_at_a_time(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        yield

    app = FastAPI(lifespan=one_call_at_a_time)

    @app.post(ROUTE)
    def predict(body: Annotated[bytes, Body(media_type="image/png")]) -> JSONResponse:
        (answer,) = classify(handler, [body])
        return JSONResponse(answer, status_code=status_of(answer))

    return app


if __name__ == "__main__":
    config = PeerConfig.from_arguments(__doc__)
    config.to_env()
    # A worker loads the model before it answers uvicorn's health pings: on a busy machine that takes longer
    # than the default 5 s, after which uvicorn would kill and restart it, over and over.
    uvicorn.run("loadtest.peers.fastapi_workers:create_app", factory=True, workers=config.processes,
                host="127.0.0.1", port=config.port, log_level="warning", access_log=False,
                timeout_worker_healthcheck=READY_TIMEOUT_S)
