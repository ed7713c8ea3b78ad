"""Whatever one request holds, it is answered alone: a 4xx with a JSON message for it, correct labels for its batch.

Against a real TorchServe (conftest's production instance, batch size 8): bad and good requests are
sent at the same moment so that they share batches, and every good neighbour must come back 200
with its *correct* label, not just any answer. Hand-picked inputs first (the ones that used to fail
their whole batch with 503 "Prediction failed"), the inputs whose decoding costs more than their
pixels (loadtest/hostile.py), then hypothesis: random, mutated and costly bodies, content types,
headers and multipart fields. Every request must be answered well within the model's responseTimeout,
by the same worker process.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clients.tokens import bearer
from handlers.cifar10_handler import png_chunk_counts
from loadtest import hostile
from loadtest.archive import extract, read_archive
from loadtest.ceiling import import_handler
from server.launcher import TorchServe
from tests.test_serving import batch_log_lines, encode
from training.model import CLASSES

MODEL = "cifar10_onnx_int8_static"  # batchSize 8 in its model-config.yaml, one worker whatever the cores
GOOD_PER_BATCH = 5


@dataclass
class Request:
    """One HTTP request: a raw body or multipart fields, extra headers, and the path it goes to."""

    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str | None, bytes, str | None]]] | None = None
    path: str = "predictions"


def send(server: TorchServe, request: Request) -> requests.Response:
    """The answer, with ``elapsed_s``: seconds from sending to the whole answer (``elapsed`` stops at the headers)."""
    headers = {"Content-Type": "application/octet-stream"} if request.files is None else {}
    headers |= request.headers | bearer(server.keys["inference"])
    start = time.monotonic()
    response = requests.post(f"{server.inference_url}/{request.path}/{MODEL}", data=request.body, files=request.files,
                             headers=headers, timeout=120)
    response.elapsed_s = time.monotonic() - start
    return response


@pytest.fixture(scope="module")
def answer_bound_s(torchserve: TorchServe) -> float:
    """What every request must be answered within: the handler's per-batch limit, half the model's responseTimeout.

    Well under the responseTimeout past which TorchServe would kill the worker, whatever the batch holds.
    """
    return torchserve.describe(MODEL)["responseTimeout"] / 2


@pytest.fixture(scope="module")
def limits(torchserve: TorchServe) -> dict[str, int]:
    """The input limits the served handler reports (``describe``), so that the tests follow the archive's config."""
    response = send(torchserve, Request(b"", {"describe": "True"}))
    return response.json()["limits"]


def send_together(server: TorchServe, batch: list[Request]) -> list[requests.Response]:
    with ThreadPoolExecutor(max_workers=len(batch)) as pool:
        return list(pool.map(lambda request: send(server, request), batch))


@pytest.fixture(scope="module")
def good_images(torchserve: TorchServe, test_images: list[tuple[bytes, int]]) -> list[tuple[bytes, str]]:
    """Test images the served model classifies correctly when each is sent alone, with that label.

    The model is 93% accurate, so a neighbour's expected answer is its true class only where the
    server itself agrees when nothing else is in the request.
    """
    responses = send_together(torchserve, [Request(body) for body, _ in test_images[:32]])
    good = [(body, CLASSES[label]) for (body, label), response in zip(test_images, responses)
            if response.status_code == 200 and response.json()["label"] == CLASSES[label]]
    assert len(good) >= 24
    return good


def is_json_error(response: requests.Response) -> bool:
    body = response.json()
    return body["code"] == response.status_code and body["type"] == "BadInput" and isinstance(body["message"], str)


def worker_pids(server: TorchServe) -> list[int]:
    return [worker["pid"] for worker in server.describe(MODEL)["workers"]]


def check_batch(server: TorchServe, bad: list[Request], good_images: list[tuple[bytes, str]],
                rng: random.Random, bound_s: float | None = None) -> list[requests.Response]:
    """Send ``bad`` interleaved with good requests; every good one must get its label. Returns the bad answers.

    With ``bound_s``, every request (good or bad) must also be answered within that many seconds, and
    the model's workers must be the same processes afterwards (none killed or restarted).
    """
    workers = worker_pids(server) if bound_s is not None else None
    good = rng.sample(good_images, GOOD_PER_BATCH)
    plan = [(Request(body), label) for body, label in good] + [(request, i) for i, request in enumerate(bad)]
    rng.shuffle(plan)
    responses = send_together(server, [request for request, _ in plan])
    answers: list[requests.Response] = [None] * len(bad)
    for (_, expected), response in zip(plan, responses):
        if isinstance(expected, str):
            assert response.status_code == 200, response.text
            assert response.json()["label"] == expected
        else:
            answers[expected] = response
    if bound_s is not None:
        slow = [(round(response.elapsed_s, 1), response.status_code) for response in responses if response.elapsed_s > bound_s]
        assert not slow, f"answered after more than {bound_s} s: {slow}"
        assert worker_pids(server) == workers, "the worker was restarted"
    return answers


def png_header_only(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of this size: a few KiB on the wire, ``width * height`` pixels to decode."""
    return encode(Image.new("1", (width, height)))


def test_requests_nobody_planned_for_fail_alone(torchserve, good_images):
    """The inputs that used to cost their whole batch a 503: each now gets its own 4xx (or its answer)."""
    cat = good_images[0][0]
    cases = {
        "text outside Latin-1": (Request("ünïcödé ✓ 文字".encode(), {"Content-Type": "text/plain"}), 415, "not a PNG"),
        "text that is not UTF-8": (Request(b"\xff\xfe\x00", {"Content-Type": "text/plain; charset=utf-8"}), 415, "not a PNG"),
        "JSON object": (Request(b'{"image": "cat.png"}', {"Content-Type": "application/json"}), 415, "JSON dict"),
        "JSON null": (Request(b"null", {"Content-Type": "application/json"}), 415, "JSON null"),
        "JSON string": (Request(b'"\\ud800"', {"Content-Type": "application/json"}), 415, "not a PNG"),
        "form fields": (Request(b"a=1&topk=2", {"Content-Type": "application/x-www-form-urlencoded"}), 415, "not a PNG"),
        "topk not UTF-8": (Request(files=[("a", ("a.png", cat, "image/png")), ("topk", (None, b"\xff\xfe", None))]),
                           400, "topk"),
        "topk in non-ASCII bytes": (Request(cat, {"X-TopK": "\uff13".encode().decode("latin-1")}), 400, "topk"),
        "field name with CR LF": (Request(files=[("a\r\nb", ("x", b"GIF89a", "image/gif")), ("b", ("b", cat, None))]),
                                  415, "GIF"),
        "explanations": (Request(cat, path="explanations"), 400, "explanations are not available"),
        "16-bit grayscale PNG with the wrong topk": (Request(encode(Image.new("I;16", (40, 30))), {"X-TopK": "0"}),
                                                     400, "topk"),
    }
    before = len(batch_log_lines(torchserve, MODEL))
    answers = check_batch(torchserve, [request for request, _, _ in cases.values()], good_images, random.Random(0))
    for (name, (_, status, text)), response in zip(cases.items(), answers):
        assert response.status_code == status, (name, response.text)
        assert is_json_error(response) and text in response.json()["message"], (name, response.text)
    # They really shared batches with the good requests (the worker logs each batch's make-up).
    assert any(0 < rejected < count for count, _, rejected in batch_log_lines(torchserve, MODEL)[before:])


def test_a_describe_header_describes_that_request_only(torchserve, good_images):
    """BaseHandler answered the whole batch with one description when request 0 carried ``describe: True``."""
    answers = check_batch(torchserve, [Request(good_images[1][0], {"describe": "True"})] * 2, good_images,
                          random.Random(1))
    for response in answers:
        assert response.status_code == 200 and response.json()["classes"] == list(CLASSES)
    # The management API's customized describe sends exactly such a request.
    described = requests.get(f"{torchserve.management_url}/models/{MODEL}", params={"customized": "true"},
                             headers=bearer(torchserve.keys["management"]), timeout=60)
    assert described.json()[0]["customizedMetadata"]["classes"] == list(CLASSES)


def test_the_decode_budget_is_per_request_and_checked_before_decoding(torchserve, good_images, limits):
    """Each image under the per-image limit, together over the per-request one: 413, neighbours unharmed."""
    limit, side = limits["max_image_pixels"], limits["max_image_side"]
    assert limit == 4096 * 4096 and side < limit
    big = png_header_only(4096, 4096)
    over = Request(files=[(f"image{i}", (f"{i}.png", big, "image/png")) for i in range(3)])
    at_limit = Request(files=[("image0", ("0.png", big, "image/png")), ("image1", ("1.png", good_images[2][0], "image/png"))])
    assert 3 * len(big) < int(torchserve.properties["max_request_size"])
    too_many, fits = check_batch(torchserve, [over, at_limit], good_images, random.Random(2))
    assert too_many.status_code == 413 and is_json_error(too_many)
    assert f"{3 * limit} pixels in all" in too_many.json()["message"]
    assert fits.status_code == 413 and f"{limit + 32 * 32} pixels in all" in fits.json()["message"]
    # At the limits alone, even as a one-pixel strip (whose short side must not be scaled up to 32 first);
    # a strip within the pixel limit but past the side limit (PNG rows cost work of their own) is refused.
    for body in (big, png_header_only(side, 1), png_header_only(1, side)):
        alone = send(torchserve, Request(body))
        assert alone.status_code == 200 and alone.json()["label"] in CLASSES
    for width, height in ((side + 1, 1), (1, side + 1), (1, limit)):
        past = send(torchserve, Request(png_header_only(width, height)))
        assert past.status_code == 413 and f"{width}x{height} pixels, a side longer than the limit of {side}" in past.json()["message"]


def test_inputs_that_cost_more_than_their_pixels_are_refused_or_read_within_the_budget(torchserve, good_images,
                                                                                   answer_bound_s):
    """Every member of the class (loadtest/hostile.py, each as large as 2 MiB allows) beside good requests.

    The structures that make decoding cost grow with the file are refused with 422 before decoding;
    the costliest images that are within every limit are classified; none holds up its batch or the worker.
    """
    inputs = hostile.hostile_inputs()
    cases = list(inputs.items())
    for start in range(0, len(cases), 3):  # three at a time beside the good ones, so that they share batches
        chunk = cases[start:start + 3]
        answers = check_batch(torchserve, [Request(body) for _, body in chunk], good_images, random.Random(start),
                              answer_bound_s)
        for (name, body), response in zip(chunk, answers):
            if name.startswith(("JPEG: progressive", "JPEG: 500k", "JPEG: 2 MiB", "PNG: 170k", "PNG: ~2000 iCCP")):
                assert response.status_code == 422 and is_json_error(response), (name, response.text)
            elif name.startswith("PNG: 16-bit RGBA 1x"):  # within the pixel budget, not the side limit
                assert response.status_code == 413 and "a side longer than" in response.json()["message"], (name, response.text)
            elif name.startswith("PNG: ~2000 zTXt"):  # Pillow's own MAX_TEXT_MEMORY refuses it
                assert response.status_code == 400 and "MAX_TEXT_MEMORY" in response.json()["message"], (name, response.text)
            else:
                assert response.status_code == 200 and response.json()["label"] in CLASSES, (name, response.text)


def test_each_structural_limit_is_where_the_handler_says(torchserve, good_images, limits, answer_bound_s):
    """At each limit an image is read; one past it is refused with 422 naming the limit."""
    scans, markers, chunks = limits["max_jpeg_scans"], limits["max_jpeg_header_markers"], limits["max_png_chunks"]
    # jpeg_scans(n) has n AC scans plus its DC scan; jpeg_header_segments(n) adds n marker bytes to the header's own.
    header_own = hostile.jpeg_header_segments(0).split(b"\xff\xda")[0].count(b"\xff")
    chunks_own, _ = png_chunk_counts(hostile.png_chunks(0), chunks)  # IHDR, IDAT, IEND
    at = [hostile.jpeg_scans(scans - 1, 256), hostile.jpeg_header_segments(markers - header_own),
          hostile.png_chunks(chunks - chunks_own)]
    past = [hostile.jpeg_scans(scans, 256), hostile.jpeg_header_segments(markers - header_own + 1),
            hostile.png_chunks(chunks - chunks_own + 1), hostile.png_iccp(2)]
    answers = check_batch(torchserve, [Request(body) for body in at + past], good_images, random.Random(3), answer_bound_s)
    for response in answers[:len(at)]:
        assert response.status_code == 200, response.text
    messages = [f"{scans + 1} scans, more than the limit of {scans}", f"more than the limit of {markers}",
                f"more than {chunks} chunks", "2 iCCP chunks"]
    for response, message in zip(answers[len(at):], messages):
        assert response.status_code == 422 and message in response.json()["message"], response.text


def photo(body: bytes) -> Image.Image:
    """A CIFAR test image enlarged to photo-like size, so that JPEG blocks and rotations are not on 32 pixels."""
    return Image.open(io.BytesIO(body)).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "JPEG"), quality=95, **options)
    return buffer.getvalue()


def stored_sideways(image: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores for an upright scene when it writes this EXIF orientation."""
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    return image.transpose(inverse[orientation])


def probabilities(response: requests.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([response.json()["probabilities"][name] for name in CLASSES])


def test_every_jpeg_a_phone_or_camera_writes_is_classified_upright(torchserve, good_images):
    """MPO (phones' multi-picture JPEG), Adobe CMYK, progressive, and every EXIF orientation."""
    for body, label in good_images[:3]:
        upright = photo(body)
        reference = probabilities(send(torchserve, Request(jpeg(upright))))
        variants = {
            "MPO": jpeg(upright, format="MPO", save_all=True, append_images=[upright.resize((64, 64))]),
            "CMYK": jpeg(upright.convert("CMYK")),
            "progressive": jpeg(upright, progressive=True),
            "grayscale": jpeg(upright.convert("L")),
        }
        assert Image.open(io.BytesIO(variants["MPO"])).format == "MPO"
        for orientation in range(2, 9):
            exif = Image.Exif()
            exif[0x0112] = orientation
            variants[f"EXIF orientation {orientation}"] = jpeg(stored_sideways(upright, orientation), exif=exif)
        responses = dict(zip(variants, send_together(torchserve, [Request(b) for b in variants.values()])))
        for name, response in responses.items():
            served = probabilities(response)
            if name != "grayscale":
                assert (served - reference).abs().max() < 0.05, name
        # Without its tag the sideways photo is a different input: the orientation is what made them agree.
        sideways = probabilities(send(torchserve, Request(jpeg(stored_sideways(upright, 6)))))
        assert (sideways - reference).abs().max() > 0.05
        assert probabilities(responses["MPO"]).argmax().item() == CLASSES.index(label)


# ----------------------------------------------------------------------------------------- hypothesis

CONTENT_TYPES = ["image/png", "image/jpeg", "application/octet-stream", "text/plain", "text/html; charset=utf-8",
                 "application/json", "multipart/form-data; boundary=xyz", "", "image/gif", "x/\u00e9"]
# Printable Latin-1 without leading whitespace: what an HTTP/1.1 header value can carry (requests
# encodes header values as Latin-1 and refuses leading whitespace).
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=40).map(str.lstrip)
header_names = st.sampled_from(["describe", "explain", "X-TopK", "x-topk", "topk", "body", "Accept", "X-Anything",
                                "Content-Encoding", "Transfer-Encoding-Hint", "image0"])


def mutated(data: st.DataObject, seed_body: bytes) -> bytes:
    """A good image with some bytes flipped, cut, or repeated: mostly still PNG-shaped, mostly broken."""
    body = bytearray(seed_body)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
        at = data.draw(st.integers(0, max(0, len(body) - 1)))
        if kind == "flip" and body:
            body[at] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del body[at:]
        elif kind == "insert":
            body[at:at] = data.draw(st.binary(max_size=64))
        else:
            body[at:at] = bytes(body[at:at + data.draw(st.integers(1, 4096))])
    return bytes(body)


def any_body(data: st.DataObject, seeds: list[bytes]) -> bytes:
    return data.draw(st.one_of(
        st.binary(max_size=256),
        st.text(max_size=64).map(lambda text: text.encode("utf-8", errors="surrogatepass")),
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                                      max_size=3),
                     max_leaves=6).map(lambda value: json.dumps(value).encode()),
        st.sampled_from(seeds).map(lambda seed: mutated(data, seed)),
        st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", encode(Image.new("RGB", (2, 2)), "GIF"),
                         png_header_only(5000, 5000), png_header_only(1, 1)]),
        # decoding that costs more than the pixels (loadtest/hostile.py), on both sides of the limits
        st.builds(hostile.jpeg_scans, st.integers(0, 300), st.sampled_from([8, 512, 4096])),
        st.builds(hostile.jpeg_header_segments, st.integers(0, 100_000)),
        st.builds(hostile.jpeg_fill_bytes, st.integers(0, 100_000)),
        st.builds(hostile.png_chunks, st.integers(0, 8192)),
        st.builds(hostile.png_idat_chunks, st.integers(0, 8192)),
        st.builds(hostile.png_iccp, st.integers(0, 3)),
        st.builds(hostile.png_ztxt, st.integers(0, 80)),
    ))


def bad_request(data: st.DataObject, seeds: list[bytes]) -> Request:
    headers = data.draw(st.dictionaries(header_names, header_text, max_size=3))
    if data.draw(st.booleans()):
        fields = data.draw(st.lists(st.tuples(
            # TorchServe's frontend answers a part whose name Java's trim() empties with 500 "empty name"
            # before any handler runs (docs/SERVING_ROBUSTNESS.md); every other name is fair game.
            st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
            .filter(lambda name: any(ord(c) > 0x20 for c in name)),
            st.one_of(st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=10)),
            st.sampled_from([None, "image/png", "image/jpeg", "text/plain", "application/json"])),
            min_size=1, max_size=4))
        files = [(name, (filename, any_body(data, seeds), content_type)) for name, filename, content_type in fields]
        return Request(files=files, headers=headers)
    headers["Content-Type"] = data.draw(st.sampled_from(CONTENT_TYPES))
    return Request(any_body(data, seeds), headers=headers)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=st.data())
def test_no_input_fails_its_batch_or_gets_a_5xx(torchserve, good_images, answer_bound_s, data):
    """Random, mutated and costly bodies, headers and multipart fields beside good requests in the same batches:
    no 5xx, good neighbours their correct label, every request answered within the bound, the same worker."""
    seeds = [body for body, _ in good_images[:4]] + [jpeg(photo(good_images[0][0]))]
    bad = [bad_request(data, seeds) for _ in range(data.draw(st.integers(1, 3)))]
    answers = check_batch(torchserve, bad, good_images, random.Random(data.draw(st.integers())), answer_bound_s)
    for request, response in zip(bad, answers):
        assert response.status_code < 500, (request, response.status_code, response.text)
        assert response.status_code == 200 or is_json_error(response), (request, response.status_code, response.text)


# ------------------------------------------------------------------------------ a model step that fails

def test_when_the_model_fails_on_one_request_only_that_request_fails(model_store: Path, tmp_path: Path,
                                                                      good_images) -> None:
    """The archived handler in-process under TorchServe's own worker Context; its model raises on black images."""
    from ts.context import Context, RequestProcessor

    archive = read_archive(model_store / "cifar10_torchscript.mar")
    model_dir = extract(archive.path, tmp_path)
    context = Context(MODEL, str(model_dir), archive.manifest, 4, None, "0.12.0", model_yaml_config=archive.model_config)
    service = import_handler(model_dir / archive.handler_file, "handler_under_test")._service
    service.initialize(context)
    black = (0.0 - service.mean) / service.std  # what an all-black image becomes after normalisation
    model_run = service.run

    def run(batch: torch.Tensor) -> torch.Tensor:
        if torch.isclose(batch, black.expand_as(batch)).flatten(1).all(1).any():
            raise RuntimeError("the model cannot take this image")
        return model_run(batch)

    service.run = run
    requests_ = [{"body": good_images[0][0]}, {"body": encode(Image.new("RGB", (32, 32)))},
                 {"body": good_images[1][0]}, {"body": good_images[2][0]}]
    context.request_processor = [RequestProcessor({}) for _ in requests_]
    answers = service.postprocess(service.inference(service.preprocess(requests_)))
    assert [answers[i]["label"] for i in (0, 2, 3)] == [good_images[i][1] for i in range(3)]
    assert answers[1]["code"] == 500 and context.get_response_status(1)[0] == 500


# --------------------------------------------------------------------- the work budget's hard stop

def answer_in_process(service, bodies: list[bytes]) -> list[tuple[int, dict[str, str], dict]]:
    """(status, response headers, answer) of each body, sent as one batch to an in-process handler."""
    from ts.context import RequestProcessor

    service.context.request_processor = [RequestProcessor({}) for _ in bodies]
    answers = service.postprocess(service.inference(service.preprocess([{"body": body} for body in bodies])))
    return [(service.context.get_response_status(i)[0], service.context.get_response_headers(i), answer)
            for i, answer in enumerate(answers)]


def test_a_request_past_its_cpu_budget_or_deadline_fails_alone(model_store: Path, tmp_path: Path, good_images) -> None:
    """The archived handler in-process, its scan limit lifted: an input no structural check knows is stopped.

    A progressive JPEG with 20,000 scans (minutes of decoding) gets 422 once its decoder has spent
    the CPU budget; a decoder that gets no CPU at all (stopped, as on a machine too busy to run it)
    gets 503 with Retry-After at the deadline. The neighbours are classified; a new decoder takes over.
    """
    budget_ms, deadline_ms = 200, 3000
    service = hostile.archived_service(model_store, MODEL, tmp_path, {
        "max_jpeg_scans": 10**9, "request_cpu_budget_ms": budget_ms, "request_deadline_ms": deadline_ms})
    good = [body for body, _ in good_images[:2]]
    labels = [label for _, label in good_images[:2]]
    answer_in_process(service, [good[0]])
    first = service.decoder.process.pid
    start = time.monotonic()
    answers = answer_in_process(service, [good[0], hostile.jpeg_scans(20_000), good[1]])
    assert time.monotonic() - start < deadline_ms / 1000
    assert [answers[0][2]["label"], answers[2][2]["label"]] == labels
    status, _, answer = answers[1]
    assert status == 422 and f"CPU budget of {budget_ms} ms" in answer["message"]
    assert not psutil.pid_exists(first) and service.decoder.process.pid != first  # killed, and replaced

    stopped = service.decoder.process.pid
    os.kill(stopped, signal.SIGSTOP)
    start = time.monotonic()
    answers = answer_in_process(service, [good[0], good[1]])
    assert time.monotonic() - start >= deadline_ms / 1000
    (status, headers, answer), (_, _, neighbour) = answers
    assert status == 503 and answer["type"] == "Busy" and headers["Retry-After"] == str(-(-deadline_ms // 1000))
    assert neighbour["label"] == labels[1] and service.decoder.process.pid != stopped
    assert not psutil.pid_exists(stopped)
    service.decoder.stop()
