"""Peer: LitServe, dynamic batching (``--batch-size``, ``--batch-delay-ms``), ``--threads`` inference
worker processes.

LitServe decodes the HTTP request in its API server process and runs ``predict`` on batches in
separate worker processes. ``python -m loadtest.peers.litserve_batched --archive model_store/cifar10.mar
--port 8000 --batch-size 16``
"""
from typing import Annotated, Any

import litserve as ls
from fastapi import Body

from loadtest.peers.common import ROUTE, archive_handler, classify, peer_arguments


class Cifar10Api(ls.LitAPI):
    def __init__(self, archive: Any, batch_size: int, intra_op_threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.archive, self.model_batch, self.intra_op_threads = archive, batch_size, intra_op_threads

    def setup(self, device: str) -> None:
        self.handler = archive_handler(self.archive, self.model_batch, self.intra_op_threads)

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
    args = peer_arguments(__doc__)
    api = Cifar10Api(args.archive, args.batch_size, args.intra_op_threads, max_batch_size=args.batch_size,
                     batch_timeout=args.batch_delay_ms / 1000, api_path=ROUTE)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.threads, track_requests=False)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
