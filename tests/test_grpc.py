"""gRPC access to TorchServe, against a real server: stubs, management, predictions, auth, shutdown.

One TorchServe for the module, started exactly as in production (shipped config.properties, token
authorization on) plus ``--enable-model-api`` so that register/unregister can be exercised, on its
own ports (18090..18094) so that it runs beside the REST tests' instance. The tests run in file
order; the last but one stops that server, and the last checks the production instance of conftest.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import psutil
import pytest
import requests
import yaml

from clients import grpc_stubs
from clients.grpc_client import PredictionError, TorchServeGrpc
from clients.tokens import bearer
from loadtest.faults import gone
from server.config import REPO_ROOT
from server.launcher import TorchServe
from tests.conftest import ports_for

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
COPY = "cifar10_grpc_copy"  # a second registration of cifar10_onnx.mar, made and removed by the tests


def served_models(store: Path) -> list[str]:
    """load_models=all: every archive in the store is served, under the name it was archived with."""
    return sorted(path.stem for path in store.glob("*.mar"))


def archive_config(store: Path, model: str) -> dict:
    with zipfile.ZipFile(store / f"{model}.mar") as archive:
        return yaml.safe_load(archive.read("model-config.yaml"))


def eventually(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def ready_pids(client: TorchServeGrpc, model: str) -> list[int]:
    return [worker["pid"] for worker in client.describe(model)[0]["workers"] if worker["status"] == "READY"]


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchServe:
    server = TorchServe(workdir=tmp_path_factory.mktemp("torchserve-grpc"), model_store=model_store,
                        overrides=ports_for(18090), enable_model_api=True)
    server.start(wait_for=served_models(model_store))
    yield server
    if server.process is not None:  # not already stopped by the last test
        server.stop()


@pytest.fixture(scope="module")
def client(server: TorchServe) -> TorchServeGrpc:
    """What an operator or the load tester holds: both channels and both tokens from key_file.json."""
    with TorchServeGrpc.from_key_file(server.key_file, server.management_url,
                                      inference_target=server.grpc_inference_target,
                                      management_target=server.grpc_management_target) as client:
        yield client


def test_stubs_are_generated_from_the_installed_torchserve_jar_and_then_reused(tmp_path: Path) -> None:
    out = tmp_path / "grpc"
    assert grpc_stubs.main(["--out", str(out)]) == 0  # what `python -m clients.grpc_stubs` does
    generated = {path.relative_to(out).as_posix() for path in out.rglob("*.py")}
    assert {"inference_pb2.py", "inference_pb2_grpc.py", "management_pb2.py", "management_pb2_grpc.py",
            "google/rpc/status_pb2.py"} <= generated
    stamp = json.loads((out / grpc_stubs.STAMP).read_text())
    assert set(stamp) == {"protos_sha256", "grpcio_tools", "protobuf"}
    first = (out / "inference_pb2.py").stat().st_mtime_ns
    grpc_stubs.generate(out)  # current stamp: nothing is regenerated
    assert (out / "inference_pb2.py").stat().st_mtime_ns == first
    # The client's modules come from build/grpc/ (gitignored), generated on first use.
    assert Path(grpc_stubs.load_stubs().inference_pb2.__file__).parent == grpc_stubs.BUILD_DIR
    assert "build/" in (REPO_ROOT / ".gitignore").read_text().split()


def test_ping_with_the_inference_key_reports_healthy(client: TorchServeGrpc) -> None:
    assert client.ping() == "Healthy"


def test_list_shows_every_served_model_and_pages_with_limit(client: TorchServeGrpc, model_store: Path) -> None:
    served = served_models(model_store)
    assert [model["modelName"] for model in client.list_models(limit=100)["models"]] == served
    first = client.list_models(limit=2)
    assert len(first["models"]) == 2 and first["nextPageToken"] == "2"
    second = client.list_models(limit=100, next_page_token=int(first["nextPageToken"]))
    assert [model["modelName"] for model in first["models"] + second["models"]] == served


def test_describe_reports_the_archives_batching_and_the_ready_workers(client: TorchServeGrpc,
                                                                      model_store: Path) -> None:
    config = archive_config(model_store, "cifar10")
    (description,) = client.describe("cifar10")
    assert description["batchSize"] == config["batchSize"]
    assert description["maxBatchDelay"] == config["maxBatchDelay"]
    assert description["minWorkers"] == config["minWorkers"]
    assert len(ready_pids(client, "cifar10")) == config["minWorkers"]


def test_scaling_to_two_workers_and_back_to_one(client: TorchServeGrpc) -> None:
    model = "cifar10_torchscript"
    assert client.scale(model, min_workers=2, max_workers=2) == f"Workers scaled to 2 for model: {model}"
    assert eventually(lambda: len(ready_pids(client, model)) == 2), client.describe(model)
    workers = {pid: psutil.Process(pid) for pid in ready_pids(client, model)}
    assert len(workers) == 2  # two separate worker processes

    client.scale(model, min_workers=1, max_workers=1)
    assert eventually(lambda: len(client.describe(model)[0]["workers"]) == 1), client.describe(model)
    (kept,) = ready_pids(client, model)
    (removed,) = set(workers) - {kept}
    assert eventually(lambda: gone(workers[removed]))  # the surplus worker process exited


def test_register_a_second_copy_predict_set_default_and_unregister(client: TorchServeGrpc,
                                                                   test_images: list[tuple[bytes, int]]) -> None:
    image, label = test_images[0]
    registered = client.register("cifar10_onnx.mar", name=COPY, initial_workers=1)
    assert registered.startswith(f'Model "{COPY}" Version: ')
    assert registered.endswith("registered with 1 initial workers")
    assert COPY in [model["modelName"] for model in client.list_models()["models"]]

    # The copy serves the same archive, so it answers exactly as the original does: the first test image's cat.
    copy, original = client.predict(COPY, image), client.predict("cifar10_onnx", image)
    assert copy["label"] == original["label"] == CLASSES[label]
    assert copy["probabilities"] == pytest.approx(original["probabilities"], abs=1e-4)

    version = client.describe(COPY)[0]["modelVersion"]
    assert client.set_default(COPY, version) == \
        f'Default version successfully updated for model "{COPY}" to "{version}"'
    missing = status_of(lambda: client.set_default(COPY, "9.9"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "Model version 9.9 does not exist" in missing.details()
    # TorchServe 0.12 does not map its conflict exception to a status: a duplicate registration is
    # UNKNOWN with no details (the CLI explains this case).
    duplicate = status_of(lambda: client.register("cifar10_onnx.mar", name=COPY))
    assert duplicate.code() == grpc.StatusCode.UNKNOWN

    assert client.unregister(COPY) == f'Model "{COPY}" unregistered'
    assert COPY not in [model["modelName"] for model in client.list_models()["models"]]
    gone = status_of(lambda: client.describe(COPY))
    assert gone.code() == grpc.StatusCode.NOT_FOUND and f"Model not found: {COPY}" in gone.details()
    # Predictions for an unknown model are INTERNAL over gRPC (404 over REST), with the same message.
    unknown = status_of(lambda: client.predict(COPY, image))
    assert unknown.code() == grpc.StatusCode.INTERNAL and f"Model not found: {COPY}" in unknown.details()


def register_over_rest(server: TorchServe, url: str, name: str) -> requests.Response:
    return requests.post(f"{server.management_url}/models", params={"url": url, "model_name": name},
                         headers=bearer(server.keys["management"]), timeout=120)


def test_the_model_api_registers_archives_from_the_model_store_only(client: TorchServeGrpc, server: TorchServe,
                                                                     tmp_path: Path) -> None:
    """allowed_urls confines registration to the store: TorchServe's default fetches and runs any
    http(s) or file URL (CVE-2023-43654). By name (the test above) registration still works."""
    outside = tmp_path / "cifar10_outside.mar"
    outside.write_bytes((server.model_store / "cifar10_onnx.mar").read_bytes())
    refused = {
        "http://127.0.0.1:9/cifar10_remote.mar": "does not match any allowed URL",
        "https://example.com/models/cifar10_remote.mar": "does not match any allowed URL",
        outside.as_uri(): "does not match any allowed URL",
        f"FILE://{outside}": "does not match any allowed URL",
        f"{(server.model_store / 'cifar10_onnx.mar').as_uri()[:-len('cifar10_onnx.mar')]}../x/cifar10_outside.mar":
            "Relative path is not allowed",
    }
    for url, reason in refused.items():
        response = register_over_rest(server, url, "intruder")
        assert response.status_code == 404 and reason in response.json()["message"], (url, response.text)
    assert not (server.model_store / outside.name).exists()  # nothing was copied into the store either
    grpc_refused = status_of(lambda: client.register("http://127.0.0.1:9/cifar10_remote.mar", name="intruder"))
    assert grpc_refused.code() == grpc.StatusCode.NOT_FOUND
    assert "intruder" not in [model["modelName"] for model in client.list_models()["models"]]


@pytest.mark.xfail(strict=True, reason="TorchServe 0.12 loads a model *directory* from any local path: allowed_urls "
                                       "only governs URLs (docs/SERVING_ROBUSTNESS.md)")
def test_a_model_directory_outside_the_store_is_refused(server: TorchServe, tmp_path: Path) -> None:
    with zipfile.ZipFile(server.model_store / "cifar10_onnx.mar") as archive:
        archive.extractall(tmp_path / "unpacked")
    response = register_over_rest(server, str(tmp_path / "unpacked"), "intruder_dir")
    if response.ok:
        requests.delete(f"{server.management_url}/models/intruder_dir", headers=bearer(server.keys["management"]),
                        timeout=120)
    assert not response.ok


def test_grpc_predictions_equal_rest_and_are_accurate(client: TorchServeGrpc, server: TorchServe,
                                                      test_images: list[tuple[bytes, int]]) -> None:
    def over_rest(image: bytes) -> dict:
        response = requests.post(f"{server.inference_url}/predictions/cifar10", data=image,
                                 headers=bearer(server.keys["inference"]), timeout=60)
        response.raise_for_status()
        return response.json()

    images = [image for image, _ in test_images]
    # Concurrent, like real clients, so that TorchServe fills its batches instead of waiting maxBatchDelay.
    with ThreadPoolExecutor(max_workers=8) as pool:
        by_grpc = list(pool.map(lambda image: client.predict("cifar10", image), images))
        by_rest = list(pool.map(over_rest, images))

    for grpc_prediction, rest_prediction in zip(by_grpc, by_rest):
        assert grpc_prediction["label"] == rest_prediction["label"]
        assert grpc_prediction["probabilities"] == pytest.approx(rest_prediction["probabilities"], abs=1e-3)
    correct = sum(prediction["label"] == CLASSES[label] for prediction, (_, label) in zip(by_grpc, test_images))
    assert correct >= 0.9 * len(test_images), f"{correct}/{len(test_images)} right"


@pytest.mark.parametrize("keys", [None, "swapped", "stale"], ids=["no-token", "keys-swapped", "stale-keys"])
def test_calls_without_the_right_token_are_refused(server: TorchServe, keys: str | None) -> None:
    real = server.keys
    tokens = {None: None, "swapped": {"inference": real["management"], "management": real["inference"]},
              "stale": {"inference": "0" * 8, "management": "0" * 8}}[keys]
    with TorchServeGrpc(server.grpc_inference_target, server.grpc_management_target, tokens) as intruder:
        for call in (intruder.ping, intruder.list_models, lambda: intruder.predict("cifar10", b"")):
            refused = status_of(call)
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "Token Authorization failed" in refused.details()


def test_a_bad_image_is_refused_with_the_handlers_status_and_message(client: TorchServeGrpc, server: TorchServe,
                                                                     test_images: list[tuple[bytes, int]]) -> None:
    # TorchServe 0.12's gRPC frontend drops the handler's per-request status: the call itself is OK
    # and the body is the handler's error, the same body REST sends with HTTP 415.
    body = json.loads(client.predict_raw("cifar10", b"definitely not an image"))
    assert body["code"] == 415 and body["type"] == "BadInput"
    assert "not a PNG or JPEG image" in body["message"]
    rest = requests.post(f"{server.inference_url}/predictions/cifar10", data=b"definitely not an image",
                         headers=bearer(server.keys["inference"]), timeout=60)
    assert rest.status_code == 415 and rest.json() == body

    # The client turns that body back into an error, so it can never pass for a prediction.
    with pytest.raises(PredictionError) as refused:
        client.predict("cifar10", test_images[0][0][:100])
    assert refused.value.code == 400 and "truncated or corrupt PNG image" in refused.value.message
    with pytest.raises(PredictionError, match="400: empty request body"):
        client.predict("cifar10", b"")
    # Only that request failed: the worker is still up and classifies the next image (CIFAR-10's first test cat).
    image, label = test_images[0]
    assert CLASSES[label] == "cat" and client.predict("cifar10", image)["label"] == "cat"


def test_the_cli_uses_the_key_file_and_reports_grpc_errors(server: TorchServe, tmp_path: Path,
                                                           test_images: list[tuple[bytes, int]],
                                                           model_store: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        targets = ["--inference-target", server.grpc_inference_target,
                   "--management-target", server.grpc_management_target]
        return subprocess.run([sys.executable, "-m", "clients.grpc_client", "--key-file",
                               str(server.workdir / "key_file.json"), *targets, *args],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    listing = cli("list", "--limit", "10")
    assert listing.returncode == 0, listing.stderr
    assert [model["modelName"] for model in json.loads(listing.stdout)["models"]] == served_models(model_store)

    image = tmp_path / "first.png"
    image.write_bytes(test_images[0][0])
    predicted = cli("predict", "cifar10", str(image))
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[str(image)]["label"] == CLASSES[test_images[0][1]] == "cat"

    missing = cli("describe", "no_such_model")
    assert missing.returncode == 1
    assert "gRPC NOT_FOUND" in missing.stderr and "Model not found: no_such_model" in missing.stderr


def test_stopping_the_server_leaves_no_process_behind(server: TorchServe, model_store: Path) -> None:
    family = server.processes()
    assert len(family) >= 1 + len(served_models(model_store))  # the frontend and at least a worker per model
    inference_target = server.grpc_inference_target
    server.stop()
    assert [process for process in family if not gone(process)] == []
    with TorchServeGrpc(inference_target, keys=None) as client:
        assert status_of(client.ping).code() == grpc.StatusCode.UNAVAILABLE


def test_the_production_config_refuses_registration_but_serves(torchserve: TorchServe) -> None:
    """The shipped config (enable_model_api=false) keeps the served set fixed; reads still work."""
    with TorchServeGrpc(torchserve.grpc_inference_target, torchserve.grpc_management_target,
                        torchserve.keys) as production:
        for change in (lambda: production.register("cifar10.mar", name=COPY),
                       lambda: production.unregister("cifar10")):
            refused = status_of(change)
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "Model API disabled" in refused.details()
        assert "cifar10" in [model["modelName"] for model in production.list_models()["models"]]
        assert production.ping() == "Healthy"
