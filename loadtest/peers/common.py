"""What every peer shares: its settings, the archive's handler loaded as a TorchServe worker loads it,
and the record of its inference processes that the benchmark checks."""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.archive import extract, read_archive
from loadtest.ceiling import load_handler

ROUTE = "/predictions/cifar10"  # TorchServe's route, so that one Locust user class calls every server
GOODPUT = "GOODPUT"  # Locust request type of the entry that counts correct answers (loadtest/peers/locustfile.py)
CONFIG_ENV = "PEER_CONFIG"  # how a peer whose server re-imports its module per worker (uvicorn, BentoML) gets its settings


@dataclass(frozen=True)
class PeerConfig:
    """One peer's settings: ``processes`` inference processes, each running one model call at a time with
    ``threads`` intra-op threads, as a TorchServe worker does; batching peers batch up to ``batch_size``
    requests, waiting at most ``batch_delay_ms`` for them."""

    archive: str
    port: int
    processes: int
    threads: int
    batch_size: int
    batch_delay_ms: float
    registry: str  # each inference process writes its pid and threads here (``register``)

    @classmethod
    def from_arguments(cls, description: str) -> PeerConfig:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--archive", required=True, help="the .mar TorchServe serves")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--processes", type=int, default=1, help="inference processes (default: 1)")
        parser.add_argument("--threads", type=int, default=1, help="intra-op threads per model call (default: 1)")
        parser.add_argument("--batch-size", type=int, default=1, help="largest batch (batching peers only)")
        parser.add_argument("--batch-delay-ms", type=float, default=10.0, help="batching peers only (default: 10)")
        parser.add_argument("--registry", required=True, help="directory where each inference process registers")
        return cls(**vars(parser.parse_args()))

    def to_env(self) -> None:
        os.environ[CONFIG_ENV] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> PeerConfig:
        return cls(**json.loads(os.environ[CONFIG_ENV]))


def archive_handler(config: PeerConfig) -> Any:
    """The archive's own handler, initialised from the unpacked archive (removed at exit), and this
    process registered as one of the peer's inference processes."""
    scratch = Path(tempfile.mkdtemp(prefix="peer-model-"))
    atexit.register(shutil.rmtree, scratch, True)
    handler = load_handler(extract(Path(config.archive), scratch), read_archive(Path(config.archive)),
                           config.batch_size, config.threads)
    register(Path(config.registry), handler.threads)
    return handler


def register(registry: Path, threads: int) -> None:
    """This process is an inference process with ``threads`` intra-op threads (contenders.inference_processes reads it)."""
    registry.mkdir(parents=True, exist_ok=True)
    partial = registry / f"{os.getpid()}.partial"  # renamed when complete: a reader never sees half a record
    partial.write_text(json.dumps({"pid": os.getpid(), "threads": threads}))
    partial.rename(registry / f"{os.getpid()}.json")


def classify(handler: Any, bodies: list[bytes]) -> list[Any]:
    """One answer per image body: exactly what the TorchServe worker computes for the same batch."""
    return handler.postprocess(handler.inference(handler.preprocess([{"body": body} for body in bodies])))


def status_of(answer: Any) -> int:
    """The handler answers bad input with ``{"code": 4xx, ...}``; everything else is a 200."""
    return answer["code"] if isinstance(answer, dict) and "code" in answer else 200
