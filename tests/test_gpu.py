"""The GPU paths: a TorchServe worker given a GPU, and training on CUDA.

Skipped where CUDA is absent (CI and the development machine have none); run on a GPU machine with

    CIFAR10_ROOT=<dir holding cifar-10-batches-py> python -m pytest -m gpu -v

The handler is driven through TorchServe's own worker ``Context`` with ``gpu_id`` 0, exactly as the
worker process builds it, and compared with the same handler on the CPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from export.convert import export_onnx, export_torchscript
from export.metadata import base_metadata, write_sidecar
from loadtest.ceiling import import_handler
from loadtest.images import test_images as png_pool
from server.config import REPO_ROOT
from tests.conftest import RELEASE_CHECKPOINT
from training import train as train_cli
from training.checkpoint import load_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HANDLER_FILE = REPO_ROOT / "handlers" / "cifar10_handler.py"
IMAGES = 1024
BATCH = 64


def start_worker(model_dir: Path, serialized_file: str, gpu_id: int | None) -> Any:
    """The handler initialised through TorchServe's worker Context, with or without a GPU."""
    from ts.context import Context

    manifest = {"model": {"modelName": "cifar10", "serializedFile": serialized_file, "handler": HANDLER_FILE.name}}
    context = Context("cifar10", str(model_dir), manifest, BATCH, gpu_id, "0.12.0",
                      model_yaml_config={"handler": {"threads": 1}})
    service = import_handler(HANDLER_FILE, f"cifar10_handler_{len(sys.modules)}")._service  # one per worker
    service.initialize(context)
    return service


def run_batch(service: Any, requests: list[dict[str, bytes]]) -> tuple[torch.Tensor | None, list[Any]]:
    """One batch as the worker's Service.predict hands it over: per-request headers and ids on the context."""
    from ts.context import RequestProcessor

    service.context.request_ids = {i: f"request-{i}" for i in range(len(requests))}
    service.context.request_processor = [RequestProcessor({}) for _ in requests]
    probabilities, slots = service.inference(service.preprocess(requests))
    return probabilities, service.postprocess((probabilities, slots))


def classify(service: Any, bodies: list[bytes]) -> tuple[torch.Tensor, list[Any]]:
    """Probabilities (on the CPU) and answers for every body, BATCH requests per model call."""
    probabilities, answers = [], []
    for start in range(0, len(bodies), BATCH):
        batch_probabilities, batch_answers = run_batch(service, [{"body": body} for body in bodies[start:start + BATCH]])
        probabilities.append(batch_probabilities)
        answers += batch_answers
    return torch.cat(probabilities), answers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TorchScript and ONNX exports of the release checkpoint with their sidecars, as the archives hold them."""
    directory = tmp_path_factory.mktemp("gpu_model")
    model, metadata = load_checkpoint(RELEASE_CHECKPOINT)
    shared = base_metadata(RELEASE_CHECKPOINT, metadata)
    export_torchscript(model, directory / "model.pt")
    write_sidecar(directory / "model.pt", {**shared, "variant": "torchscript"})
    export_onnx(model, directory / "model.onnx")
    write_sidecar(directory / "model.onnx", {**shared, "variant": "onnx"})
    return directory


@pytest.fixture(scope="module")
def pool(data_root: Path) -> tuple[list[bytes], list[str]]:
    pngs, classes = png_pool(str(data_root), IMAGES)
    return list(pngs), list(classes)


@pytest.mark.parametrize("serialized_file", ["model.pt", "model.onnx"])
def test_a_gpu_worker_answers_like_the_cpu_worker(model_dir: Path, pool: tuple[list[bytes], list[str]],
                                                 serialized_file: str) -> None:
    bodies, classes = pool
    gpu = start_worker(model_dir, serialized_file, gpu_id=0)
    cpu = start_worker(model_dir, serialized_file, gpu_id=None)
    assert gpu.device == torch.device("cuda:0") and cpu.device == torch.device("cpu")
    assert gpu.mean.is_cuda and gpu.std.is_cuda  # normalisation constants live on the worker's GPU
    if serialized_file == "model.pt":
        assert all(tensor.is_cuda for tensor in gpu.model.state_dict().values())

    gpu_probabilities, gpu_answers = classify(gpu, bodies)
    cpu_probabilities, cpu_answers = classify(cpu, bodies)
    # cuDNN may pick TF32 convolutions: equal to the CPU within float tolerance, not bit for bit
    assert (gpu_probabilities - cpu_probabilities).abs().max().item() < 1e-2
    agreement = sum(g["label"] == c["label"] for g, c in zip(gpu_answers, cpu_answers)) / len(bodies)
    assert agreement >= 0.995
    assert all(set(answer["probabilities"]) == set(classes) for answer in gpu_answers)
    print(json.dumps({"serialized_file": serialized_file, "onnx_providers": getattr(gpu.model, "get_providers", list)(),
                      "max_abs_diff": (gpu_probabilities - cpu_probabilities).abs().max().item(),
                      "label_agreement": agreement}))


def test_bad_input_on_a_gpu_worker_fails_alone(model_dir: Path, pool: tuple[list[bytes], list[str]]) -> None:
    bodies, classes = pool
    gpu = start_worker(model_dir, "model.pt", gpu_id=0)
    _, answers = run_batch(gpu, [{"body": bodies[0]}, {"body": b"not an image"}, {"body": bodies[1]}])
    assert answers[0]["label"] in classes and answers[2]["label"] in classes
    assert answers[1]["code"] == 415 and "not a PNG or JPEG" in answers[1]["message"]


def test_the_gpu_preset_trains_and_evaluates_on_cuda(data_root: Path, tmp_path: Path) -> None:
    """One short epoch with the gpu recipe (batch 512, bf16/fp16 autocast, channels_last, pinned memory)."""
    args = train_cli.get_args_parser().parse_args([
        "--preset", "gpu", "--data-dir", str(data_root), "--output-dir", str(tmp_path), "--epochs", "1",
        "--subset-train", "8192", "--subset-test", "2000", "--workers", "4"])
    result = train_cli.main(args)
    payload = torch.load(result["checkpoint"], weights_only=True)
    metadata = payload["metadata"]
    assert metadata["recipe"]["batch_size"] == 512 and metadata["epochs"] == 1
    assert metadata["device"].startswith("cuda (")  # the checkpoint says what it was trained on
    assert 0.0 <= metadata["test_accuracy"] <= 1.0
    print(json.dumps({"test_accuracy_after_1_short_epoch": metadata["test_accuracy"], "recipe": metadata["recipe"]}))
