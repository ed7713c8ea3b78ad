"""Peer: FastAPI + uvicorn, an async endpoint, one image per model call on the event loop (one core).

``python -m loadtest.peers.fastapi_async --archive model_store/cifar10.mar --port 8000``
"""
from typing import Annotated

import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from loadtest.peers.common import ROUTE, archive_handler, classify, peer_arguments, status_of

args = peer_arguments(__doc__)
handler = archive_handler(args.archive, 1, args.intra_op_threads)
app = FastAPI()


@app.post(ROUTE)
async def predict(body: Annotated[bytes, Body(media_type="image/png")]) -> JSONResponse:
    (answer,) = classify(handler, [body])
    return JSONResponse(answer, status_code=status_of(answer))


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
