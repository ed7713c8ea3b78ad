"""In-process throughput of an archive: the ceiling a served deployment is measured against.

Two ceilings, both at the server's batch size and per-worker thread count, on real test images,
loaded from the very archive the server runs (unzipped as TorchServe unzips it for a worker):

* ``model``: the serialized model alone (ONNX Runtime session or torch.jit module) on batches that
  are already decoded and normalised. The strict ceiling: served/model is what the deployment keeps
  of the model's own speed, everything else (decode, HTTP, batching, IPC, JSON) counted as cost.
* ``pipeline``: the archive's own handler called in-process (PNG decode, resize, normalise, model,
  softmax, answer JSON) without the TorchServe frontend. served/pipeline isolates the cost of the
  server itself from the work any deployment must do per image.

Run it pinned to the cores the server gets (``--cpus``) so that both sides see the same hardware,
and with as many processes as the server has workers (``--processes``, each with ``--threads``): the
processes load everything first, then time the same windows side by side, and each window's rate is
the sum over the processes.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil
from PIL import Image

from export.runtime import load_runner
from loadtest.affinity import parse_cpus
from loadtest.archive import Archive, extract, read_archive
from loadtest.images import test_images
from server.plan import THREADS_ENV
from training.data import default_data_dir

WARMUP_BATCHES = 5
WINDOWS = 5


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children, live or reaped: the handler decodes in a forked
    child, whose CPU is part of the pipeline's cost as it is part of a worker's."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, and the reaped children's user and system
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def window_rates(run_batch: Callable[[int], None], batch_size: int, seconds: float,
                 start_at: float | None = None) -> tuple[list[float], float]:
    """Images/s in each of WINDOWS back-to-back windows filling ``seconds``, after a warm-up; with
    ``start_at`` (unix time) the windows start then, so that several processes time the same windows.

    On a shared machine a disturbance can only slow a window down, never speed it up. A mean over the
    whole time would let one disturbed second lower the ceiling and so flatter every served/ceiling
    ratio (a 5 s mean once put a served deployment at 111% of its ceiling); the fastest window does not.
    ``run_batch`` gets the batch index. Also returns images per CPU-second of this process over all the
    windows (its children's included), which a busy machine disturbs far less than the rate: a served
    deployment's answers per busy core are compared with it.
    """
    for index in range(WARMUP_BATCHES):
        run_batch(index)
    done, rates = 0, []
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    cpu_start = cpu_seconds()
    for _ in range(WINDOWS):
        window_done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / WINDOWS:
            run_batch(done + window_done)
            window_done += 1
        done += window_done
        rates.append(window_done * batch_size / elapsed)
    return rates, done * batch_size / max(cpu_seconds() - cpu_start, 1e-9)


def images_per_second(run_batch: Callable[[int], None], batch_size: int, seconds: float) -> float:
    """The fastest window of ``window_rates``."""
    return max(window_rates(run_batch, batch_size, seconds)[0])


class _Context:
    """The part of TorchServe's worker Context that the handler touches for valid requests."""

    def __init__(self, model_dir: Path, archive: Archive, batch_size: int) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": batch_size}
        self.manifest = archive.manifest
        self.model_yaml_config = archive.model_config

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return {}

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        """Bad input: the answer itself carries the code and the message."""


def import_handler(path: Path, module_name: str) -> ModuleType:
    """A handler file imported as a module of its own name, with its own ``_service``, as in a worker process."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_handler(model_dir: Path, archive: Archive, batch_size: int, threads: int | None = None) -> Any:
    """The archive's handler module, initialised as a worker would initialise it (with ``threads``
    intra-op threads, set as the server sets them, when given)."""
    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)
    module = import_handler(model_dir / archive.handler_file, "archived_handler")
    module._service.initialize(_Context(model_dir, archive, batch_size))
    return module._service


def normalised_batches(pngs: tuple[bytes, ...], metadata: dict[str, Any], batch_size: int) -> list[np.ndarray]:
    """Decoded, normalised NCHW float32 batches cycling through the images, as the model receives them."""
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs])
    mean, std = np.array(metadata["mean"], np.float32), np.array(metadata["std"], np.float32)
    images = ((pixels.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    count = max(1, len(images) // batch_size)
    return [np.ascontiguousarray(images[np.arange(i * batch_size, (i + 1) * batch_size) % len(images)])
            for i in range(count)]


START_DELAY_S = 3.0  # after the processes' start, time for each to load the model and its handler
PHASE_GAP_S = 2.0  # between the model windows and the pipeline windows, so that no process is still in the first


def measure(archive_path: Path, batch_size: int | None, threads: int | None, seconds: float, data_dir: str,
            image_pool: int, start_at: float | None = None) -> dict[str, Any]:
    """Both ceilings of one archive in this process; batch size and threads default to the archive's
    model-config. ``start_at``: when the first window starts (processes timed side by side)."""
    archive = read_archive(archive_path)
    batch_size = batch_size or int(archive.model_config.get("batchSize", 1))
    threads = threads or archive.threads
    pngs, _ = test_images(data_dir, image_pool)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = extract(archive_path, Path(scratch))
        run_model = load_runner(model_dir / archive.serialized_file, threads)
        batches = normalised_batches(pngs, archive.metadata, batch_size)
        handler = load_handler(model_dir, archive, batch_size, threads)
        requests = [[{"body": pngs[(i * batch_size + j) % len(pngs)]} for j in range(batch_size)]
                    for i in range(max(1, len(pngs) // batch_size))]

        def serve(i: int) -> None:
            for answer in handler.postprocess(handler.inference(handler.preprocess(requests[i % len(requests)]))):
                json.dumps(answer)  # the worker serialises every answer too

        model, model_per_cpu = window_rates(lambda i: run_model(batches[i % len(batches)]), batch_size, seconds,
                                            start_at)
        pipeline_start = None if start_at is None else start_at + seconds + PHASE_GAP_S
        pipeline, pipeline_per_cpu = window_rates(serve, batch_size, seconds, pipeline_start)
    return {"archive": str(archive_path), "variant": archive.variant, "batch_size": batch_size, "threads": threads,
            "processes": 1, "cpus": sorted(os.sched_getaffinity(0)), "seconds": seconds,
            "model_images_per_s": max(model), "pipeline_images_per_s": max(pipeline),
            "model_windows": model, "pipeline_windows": pipeline,
            "model_images_per_cpu_s": model_per_cpu, "pipeline_images_per_cpu_s": pipeline_per_cpu}


def measure_processes(processes: int, argv: list[str]) -> dict[str, Any]:
    """``processes`` copies of this command (one process each), timed side by side: per window, the sum
    of their rates; the ceiling is the fastest such window, as for one process."""
    start_at = time.time() + START_DELAY_S + processes
    command = [sys.executable, "-m", "loadtest.ceiling", *argv, "--processes", "1", "--start-at", str(start_at)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"ceiling process exited with {child.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    combined = dict(results[0], processes=processes)
    for key in ("model", "pipeline"):
        windows = [sum(rates) for rates in zip(*(result[f"{key}_windows"] for result in results))]
        combined |= {f"{key}_windows": windows, f"{key}_images_per_s": max(windows),
                     f"{key}_images_per_cpu_s": sum(r[f"{key}_images_per_cpu_s"] for r in results) / len(results)}
    return combined


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="the .mar the server runs")
    parser.add_argument("--batch-size", type=int, help="default: the archive's batchSize")
    parser.add_argument("--threads", type=int, help="threads per process (default: the archive's handler.threads)")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes timed side by side, as the server's workers (default: 1)")
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)  # set by --processes for its children
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per ceiling (default: 5)")
    parser.add_argument("--cpus", type=parse_cpus, help="pin to these cores first, e.g. 1 or 2-3 (default: no pinning)")
    parser.add_argument("--data-dir", default=default_data_dir(), help="directory holding cifar-10-batches-py")
    parser.add_argument("--image-pool", type=int, default=256, help="distinct test images cycled (default: 256)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, args.cpus)  # before any thread pool exists, so every pool thread inherits it
    if args.processes > 1:
        result = measure_processes(args.processes, argv)
    else:
        result = measure(args.archive, args.batch_size, args.threads, args.seconds, args.data_dir, args.image_pool,
                         args.start_at)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
