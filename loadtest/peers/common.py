"""What every peer shares: the archive's handler, loaded as a TorchServe worker loads it, and its CLI."""
from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loadtest.archive import extract, read_archive
from loadtest.ceiling import load_handler

ROUTE = "/predictions/cifar10"  # TorchServe's route, so that one Locust user class calls every server
GOODPUT = "GOODPUT"  # Locust request type of the entry that counts correct answers (loadtest/peers/locustfile.py)


def peer_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--archive", type=Path, required=True, help="the .mar TorchServe serves")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="inference threads (default: 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="largest batch (batching peers only)")
    parser.add_argument("--batch-delay-ms", type=float, default=10.0, help="batching peers only (default: 10)")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per call (default: 1)")
    return parser.parse_args()


def archive_handler(archive_path: Path, batch_size: int, intra_op_threads: int) -> Any:
    """The archive's own handler, initialised from the unpacked archive (removed at exit)."""
    scratch = Path(tempfile.mkdtemp(prefix="peer-model-"))
    atexit.register(shutil.rmtree, scratch, True)
    archive = read_archive(archive_path)
    return load_handler(extract(archive_path, scratch), archive, batch_size, intra_op_threads)


def classify(handler: Any, bodies: list[bytes]) -> list[Any]:
    """One answer per image body: exactly what the TorchServe worker computes for the same batch."""
    return handler.postprocess(handler.inference(handler.preprocess([{"body": body} for body in bodies])))


def status_of(answer: Any) -> int:
    """The handler answers bad input with ``{"code": 4xx, ...}``; everything else is a 200."""
    return answer["code"] if isinstance(answer, dict) and "code" in answer else 200
