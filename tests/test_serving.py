"""REST serving of every exported variant by a real TorchServe with the shipped production config."""
from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import psutil
import pytest
import requests
import torch
from PIL import Image

from clients.tokens import bearer
from server.config import REPO_ROOT, SHIPPED_CONFIG, anchored_vmargs, parse_properties
from server.launcher import TorchServe
from tests.conftest import MODEL_NAMES, RELEASE_CHECKPOINT
from training.checkpoint import load_checkpoint
from training.data import load_split
from training.model import CLASSES

FP32_MODELS = ("cifar10_torchscript", "cifar10_onnx")


def predict(server: TorchServe, model: str, body: bytes | None = None, headers: dict | None = None,
            **kwargs) -> requests.Response:
    return server.call("inference", "POST", f"{server.inference_url}/predictions/{model}", data=body, headers=headers,
                       timeout=60, **kwargs)


def predict_all(server: TorchServe, model: str, bodies: list[bytes]) -> list[requests.Response]:
    """Send the bodies concurrently, so that TorchServe can batch them."""
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda body: predict(server, model, body), bodies))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def batch_log_lines(server: TorchServe, model: str) -> list[tuple[int, int, int]]:
    """(requests, images, rejected) for every batch the model's worker has handled so far."""
    pattern = re.compile(rf"W-\d+-{model}_[\d.]+-stdout MODEL_LOG - batch of (\d+) request\(s\), (\d+) image\(s\), (\d+) rejected")
    return [tuple(map(int, match.groups())) for match in pattern.finditer(server.log_text())]


@pytest.fixture(scope="module")
def reference_probabilities(data_root) -> torch.Tensor:
    """The release checkpoint's own fp32 probabilities for the 64 test images the tests send."""
    model, _ = load_checkpoint(RELEASE_CHECKPOINT)
    images = torch.stack([image for image, _ in load_split(data_root, train=False, subset=64)])
    with torch.no_grad():
        return torch.softmax(model(images), dim=1)


def probabilities_of(response: requests.Response) -> list[float]:
    return [response.json()["probabilities"][name] for name in CLASSES]


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_variant_classifies_real_test_images(torchserve, test_images, reference_probabilities, model):
    responses = predict_all(torchserve, model, [body for body, _ in test_images])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    served = torch.tensor([probabilities_of(r) for r in responses])
    labels = torch.tensor([label for _, label in test_images])
    assert [r.json()["label"] for r in responses] == [CLASSES[i] for i in served.argmax(1)]
    torch.testing.assert_close(served.sum(1), torch.ones(len(responses)), atol=1e-4, rtol=0)
    assert (served.argmax(1) == labels).float().mean() >= 0.85
    agreement = (served.argmax(1) == reference_probabilities.argmax(1)).float().mean()
    if model in FP32_MODELS:
        # Same bytes, same preprocessing, same fp32 weights: the served numbers are the checkpoint's.
        assert agreement == 1.0
        torch.testing.assert_close(served, reference_probabilities, atol=1e-4, rtol=0)
    else:
        assert agreement >= 0.95


def test_the_first_test_image_is_a_cat_for_every_variant(torchserve, test_images):
    body, label = test_images[0]
    assert CLASSES[label] == "cat"
    for model in MODEL_NAMES:
        assert predict(torchserve, model, body).json()["label"] == "cat"


def test_the_default_model_answers_by_name_and_by_version(torchserve, test_images):
    body, _ = test_images[1]
    by_name = predict(torchserve, "cifar10", body)
    version = torchserve.describe("cifar10")["modelVersion"]
    by_version = predict(torchserve, f"cifar10/{version}", body)
    assert by_name.status_code == by_version.status_code == 200
    assert by_name.json() == by_version.json()


def test_images_of_any_size_mode_and_format_are_accepted(torchserve, test_images):
    photo = Image.open(io.BytesIO(test_images[0][0])).resize((300, 200))
    variants = {
        "large RGB PNG": encode(photo),
        "JPEG": encode(photo, "JPEG"),
        "grayscale": encode(photo.convert("L")),
        "RGBA": encode(photo.convert("RGBA")),
        "palette": encode(photo.convert("P")),
        "1-bit": encode(photo.convert("1")),
    }
    for name, body in variants.items():
        response = predict(torchserve, "cifar10", body)
        assert response.status_code == 200, f"{name}: {response.text}"
        assert response.json()["label"] in CLASSES


def test_topk_is_returned_on_request(torchserve, test_images):
    response = predict(torchserve, "cifar10", test_images[0][0], headers={"X-TopK": "3"})
    topk = response.json()["topk"]
    assert [entry["label"] for entry in topk][0] == response.json()["label"] and len(topk) == 3
    assert [e["probability"] for e in topk] == sorted((e["probability"] for e in topk), reverse=True)
    bad = predict(torchserve, "cifar10", test_images[0][0], headers={"X-TopK": "eleven"})
    assert bad.status_code == 400 and "topk" in bad.json()["message"]


def test_several_images_in_one_multipart_request(torchserve, test_images):
    files = {f"image{i}": (f"{i}.png", body, "image/png") for i, (body, _) in enumerate(test_images[:4])}
    response = requests.post(f"{torchserve.inference_url}/predictions/cifar10", files=files,
                             headers=bearer(torchserve.keys["inference"]), timeout=60)
    assert response.status_code == 200
    single = [predict(torchserve, "cifar10", body).json()["label"] for body, _ in test_images[:4]]
    assert [p["label"] for p in response.json()] == single


def test_concurrent_requests_are_batched(torchserve, test_images):
    batch_size = torchserve.describe("cifar10_onnx")["batchSize"]
    assert batch_size > 1
    before = len(batch_log_lines(torchserve, "cifar10_onnx"))
    responses = predict_all(torchserve, "cifar10_onnx", [body for body, _ in test_images[:32]])
    assert all(r.status_code == 200 for r in responses)
    batches = batch_log_lines(torchserve, "cifar10_onnx")[before:]
    assert sum(requests for requests, _, _ in batches) == 32
    assert max(requests for requests, _, _ in batches) > 1, batches
    assert max(requests for requests, _, _ in batches) <= batch_size


BAD_INPUTS = {
    "empty body": (b"", 400, "empty"),
    "not an image": (b"this is not an image", 415, "not a PNG or JPEG"),
    "truncated PNG": (None, 400, "truncated"),
    "GIF": (encode(Image.new("P", (32, 32)), "GIF"), 415, "unsupported image format GIF"),
    "decompression bomb": (encode(Image.new("1", (20_000, 20_000))), 413, "too large"),
    "too many pixels": (encode(Image.new("L", (5_000, 5_000))), 413, "more than the limit"),
}


def test_bad_input_gets_a_4xx_naming_the_problem_and_spares_the_rest_of_the_batch(torchserve, test_images,
                                                                                   reference_probabilities):
    model = "cifar10_torchscript"  # fp32: its answers are the checkpoint's own, so neighbours are checked exactly
    worker_pids = [w["pid"] for w in torchserve.describe(model)["workers"]]
    truncated = test_images[0][0][:60]
    bad = [(truncated if body is None else body, status, text) for body, status, text in BAD_INPUTS.values()]
    good = [(body, 200, index) for index, (body, _) in enumerate(test_images[:8])]
    # Good and bad requests interleaved and sent at once, so that they share batches.
    plan = [case for pair in zip(good, bad) for case in pair] + good[len(bad):]
    before = len(batch_log_lines(torchserve, model))
    responses = predict_all(torchserve, model, [body for body, _, _ in plan])

    for (_, status, expected), response in zip(plan, responses):
        assert response.status_code == status, response.text
        if status != 200:
            assert expected in response.json()["message"], response.json()
        else:  # its own answer, as if it had been alone: no row of a rejected neighbour shifted into it
            reference = reference_probabilities[expected]
            assert response.json()["label"] == CLASSES[int(reference.argmax())]
            torch.testing.assert_close(torch.tensor(probabilities_of(response)), reference, atol=1e-4, rtol=0)
    assert [w["pid"] for w in torchserve.describe(model)["workers"]] == worker_pids, "the worker was restarted"
    # At least one batch mixed rejected and accepted requests, and the accepted ones were still answered.
    assert any(0 < rejected < count for count, _, rejected in batch_log_lines(torchserve, model)[before:])


def test_oversize_request_is_refused_by_the_frontend(torchserve):
    limit = int(torchserve.properties["max_request_size"])
    response = predict(torchserve, "cifar10", b"\x89PNG" + b"\0" * limit)
    assert response.status_code == 413


def test_requests_without_the_token_are_refused(torchserve, test_images):
    body = test_images[0][0]
    anonymous = requests.post(f"{torchserve.inference_url}/predictions/cifar10", data=body, timeout=30)
    assert anonymous.status_code == 400 and "Token Authorization failed" in anonymous.text
    wrong_key = predict(torchserve, "cifar10", body, headers=bearer(torchserve.keys["management"]))
    assert wrong_key.status_code == 400
    management = requests.get(f"{torchserve.management_url}/models", timeout=30)
    assert management.status_code == 400


def test_production_config_keeps_the_model_api_off(torchserve):
    response = requests.post(f"{torchserve.management_url}/models", params={"url": "cifar10.mar", "model_name": "copy"},
                             headers=bearer(torchserve.keys["management"]), timeout=30)
    # TorchServe's REST frontend answers a disabled model API with 405 (gRPC: PERMISSION_DENIED).
    assert response.status_code == 405 and "not allowed" in response.json()["message"]
    # Should an operator enable it with the shipped file, no URL is allowed (CVE-2023-43654); only names.
    allowed = parse_properties(SHIPPED_CONFIG.read_text())["allowed_urls"].split(",")
    for url in ("http://example.com/evil.mar", "https://example.com/evil.mar", "file:///tmp/evil.mar",
                f"file://{torchserve.model_store}/cifar10.mar"):
        assert not any(re.fullmatch(pattern, url) for pattern in allowed), url


def test_prometheus_metrics_are_served(torchserve, test_images):
    predict(torchserve, "cifar10", test_images[0][0])
    text = requests.get(f"{torchserve.metrics_url}/metrics", timeout=30).text
    assert re.search(r'ts_inference_requests_total\{.*model_name="cifar10"', text)


def test_every_endpoint_listens_on_loopback_only(torchserve):
    """The shipped config binds every endpoint to loopback, and the running server (shipped config, test
    ports) listens on nothing else: no address left to TorchServe's all-interfaces defaults."""
    shipped = parse_properties(SHIPPED_CONFIG.read_text())
    for key in ("inference_address", "management_address", "metrics_address"):
        assert urlparse(shipped[key]).hostname == "127.0.0.1", (key, shipped[key])
    assert shipped["grpc_inference_address"] == shipped["grpc_management_address"] == "127.0.0.1"

    listening = [connection.laddr for process in torchserve.processes()
                 for connection in process.net_connections(kind="inet") if connection.status == psutil.CONN_LISTEN]
    ports = {int(urlparse(torchserve.properties[key]).port)
             for key in ("inference_address", "management_address", "metrics_address")}
    ports |= {int(torchserve.properties[key]) for key in ("grpc_inference_port", "grpc_management_port")}
    assert {address.port for address in listening} >= ports  # every endpoint is up ...
    assert all(address.ip in ("127.0.0.1", "::ffff:127.0.0.1") for address in listening), listening  # ... on loopback


def test_the_shipped_logging_config_logs_each_request_once_and_nothing_per_request_at_debug(torchserve, test_images):
    """log4j2.xml (config.properties' vmargs) is in effect: TorchServe's built-in config would write ~10
    DEBUG/INFO lines per prediction, three times each, on the thread that feeds the model worker."""
    marker = "/predictions/cifar10_torchscript"
    before = torchserve.log_text("access_log.log").count(marker)
    predict_all(torchserve, "cifar10_torchscript", [body for body, _ in test_images[:4]])
    assert torchserve.log_text("access_log.log").count(marker) - before == 4
    ts_log = torchserve.log_text("ts_log.log")
    assert "Inference API bind to" in ts_log  # start-up and model lifecycle stay at INFO
    assert "[DEBUG]" not in ts_log and "Sending response for jobId" not in ts_log
    assert "ACCESS_LOG" not in ts_log  # each logger writes its own file only


def test_the_shipped_log_config_is_found_from_any_start_directory(tmp_path):
    """config.properties names log4j2.xml relative to the repository root, where the README starts the server."""
    assert TorchServe(workdir=tmp_path, model_store=tmp_path).properties["vmargs"] == \
        f"-Dlog4j.configurationFile={REPO_ROOT / 'log4j2.xml'}"
    assert (REPO_ROOT / "log4j2.xml").is_file()
    absolute = "-Xmx2g -Dlog4j.configurationFile=/etc/torchserve/log4j2.xml"
    assert anchored_vmargs(absolute, tmp_path) == absolute
