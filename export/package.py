"""TorchServe model archives (.mar) built with torch-model-archiver's Python API."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml
from model_archiver.model_archiver import ModelArchiver
from model_archiver.model_archiver_config import ModelArchiverConfig


# The timeouts in their order (docs/OPERATIONS.md, "Timeouts"): a request's images may cost the handler
# REQUEST_CPU_BUDGET_MS of CPU (else 422) and take REQUEST_DEADLINE_MS (else 503 + Retry-After); a batch
# stops reading at half of RESPONSE_TIMEOUT_S; TorchServe kills a worker only past RESPONSE_TIMEOUT_S.
REQUEST_CPU_BUDGET_MS = 2000
REQUEST_DEADLINE_MS = 5000
RESPONSE_TIMEOUT_S = 60


def write_model_config(path: Path, batch_size: int, max_batch_delay_ms: int, worker_threads: int) -> Path:
    """TorchServe's per-model config; ``handler.threads`` is read by our handler to size torch/ORT thread pools.

    One worker per model: TorchServe scales by adding workers, each with its own thread pool, so
    workers x threads should not exceed the cores. The handler's work budget per request is written
    here beside ``responseTimeout``, which it must stay well under.
    """
    config = {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": RESPONSE_TIMEOUT_S,
        "handler": {"threads": worker_threads, "request_cpu_budget_ms": REQUEST_CPU_BUDGET_MS,
                    "request_deadline_ms": REQUEST_DEADLINE_MS},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_index_to_name(path: Path, classes: Sequence[str]) -> Path:
    """TorchServe's conventional class-index map, {"0": "airplane", ...}."""
    path.write_text(json.dumps({str(i): name for i, name in enumerate(classes)}, indent=2) + "\n")
    return path


def archive(
    model_name: str,
    serialized_file: Path,
    extra_files: Sequence[Path],
    handler: Path,
    config_file: Path,
    version: str,
    model_store: Path,
) -> Path:
    """Pack one model, overwriting an older archive of the same name."""
    model_store.mkdir(parents=True, exist_ok=True)
    ModelArchiver.generate_model_archive(ModelArchiverConfig(
        model_name=model_name,
        handler=str(handler),
        version=version,
        serialized_file=str(serialized_file),
        extra_files=",".join(str(path) for path in extra_files),
        export_path=str(model_store),
        config_file=str(config_file),
        # stored, not deflated: fp32 weights barely compress, and deflating them took seconds per archive
        archive_format="zip-store",
        force=True,
    ))
    return model_store / f"{model_name}.mar"
