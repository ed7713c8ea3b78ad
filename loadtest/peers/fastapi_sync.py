"""Peer: FastAPI + uvicorn, a sync endpoint, one image per model call, ``--threads`` requests at a time.

FastAPI runs a plain ``def`` endpoint in its thread pool; ONNX Runtime releases the GIL while it
runs, so ``--threads`` inference threads overlap. ``python -m loadtest.peers.fastapi_sync --archive
model_store/cifar10.mar --port 8000 --threads 2``
"""
from typing import Annotated

import anyio.to_thread
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from loadtest.peers.common import ROUTE, archive_handler, classify, peer_arguments, status_of

args = peer_arguments(__doc__)
handler = archive_handler(args.archive, 1, args.intra_op_threads)
app = FastAPI()


@app.on_event("startup")
def limit_threads() -> None:
    anyio.to_thread.current_default_thread_limiter().total_tokens = args.threads


@app.post(ROUTE)
def predict(body: Annotated[bytes, Body(media_type="image/png")]) -> JSONResponse:
    (answer,) = classify(handler, [body])
    return JSONResponse(answer, status_code=status_of(answer))


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
