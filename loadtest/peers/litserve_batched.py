"""Peer: LitServe with ``workers_per_device`` inference processes on the CPU and its own batching.

LitServe's HTTP server hands requests to its inference worker processes, each of which batches up to
``--batch-size`` requests within ``--batch-delay-ms``; ``python -m loadtest.peers.litserve_batched
--archive model_store/cifar10.mar --port 8000 --processes 2 --batch-size 8 --registry DIR``
"""
from typing import Annotated, Any

import litserve as ls
from fastapi import Body

from loadtest.peers.common import ROUTE, PeerConfig, archive_handler, classify


class Cifar10Api(ls.LitAPI):
    def __init__(self, config: PeerConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config

    def setup(self, device: str) -> None:
        self.handler = archive_handler(self.config)

    def decode_request(self, request: Annotated[bytes, Body(media_type="image/png")]) -> bytes:
        return request  # the raw PNG: the handler decodes it with the rest of the batch

    def batch(self, inputs: list[bytes]) -> list[bytes]:
        return inputs

    def predict(self, bodies: list[bytes]) -> list[Any]:
        return classify(self.handler, bodies)

    def unbatch(self, answers: list[Any]) -> list[Any]:
        return answers

    def encode_response(self, answer: Any) -> Any:
        return answer


if __name__ == "__main__":
    config = PeerConfig.from_arguments(__doc__)
    api = Cifar10Api(config, max_batch_size=config.batch_size, batch_timeout=config.batch_delay_ms / 1000, api_path=ROUTE)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=config.processes, track_requests=False)
    server.run(host="127.0.0.1", port=config.port, log_level="warning", generate_client_file=False)
