"""Peer: BentoML, ``workers`` processes, each batching adaptively (``batchable=True``) up to ``--batch-size``.

BentoML passes a batchable API a list and splits its list of answers back per request; the input and
output specs below take the raw PNG body and answer each request with its own JSON object and status,
as the other servers do. Each worker runs one batch at a time (BentoML's default of one thread for a
sync API), off its event loop. How long a batch waits is BentoML's adaptive batcher's call (its
default latency budget): ``--batch-delay-ms`` does not apply. Access logs are off, as for every peer. ``python -m
loadtest.peers.bentoml_batched --archive model_store/cifar10.mar --port 8000 --processes 2 --batch-size 8
--registry DIR`` runs ``bentoml serve`` on this module, whose processes read the settings from the environment.
"""
import os
import sys
from typing import Any

import bentoml
from _bentoml_sdk.io_models import IORootModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from loadtest.peers.common import ROUTE, PeerConfig, archive_handler, classify, status_of


class PngBody(IORootModel[list[bytes]]):
    """The request body as it came: one PNG, a batch of one."""

    __root_input__ = True

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "PngBody":
        return cls([await request.body()])


class Answer(IORootModel[list[Any]]):
    """This request's one answer, with the status the handler gave it."""

    @classmethod
    async def to_http_response(cls, obj: list[Any], serde: Any) -> Response:
        (answer,) = obj
        return JSONResponse(answer, status_code=status_of(answer))


if __name__ == "__main__":
    config = PeerConfig.from_arguments(__doc__)
    config.to_env()
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    os.execv(sys.executable, [sys.executable, "-m", "bentoml", "serve", "loadtest.peers.bentoml_batched:Cifar10",
                              "--host", "127.0.0.1", "--port", str(config.port)])
else:  # imported by `bentoml serve`, in its processes: the service, sized by the settings
    CONFIG = PeerConfig.from_env()

    @bentoml.service(workers=CONFIG.processes, logging={"access": {"enabled": False}})
    class Cifar10:
        def __init__(self) -> None:
            self.handler = archive_handler(CONFIG)

        @bentoml.api(route=ROUTE, batchable=True, max_batch_size=CONFIG.batch_size, input_spec=PngBody,
                     output_spec=Answer)
        def predict(self, bodies: list[bytes]) -> list[Any]:
            return classify(self.handler, bodies)
