"""TorchServe handler for the CIFAR-10 classifier, TorchScript and ONNX archives alike.

Request: the image bytes (PNG or JPEG, any size, any mode) as the raw body, or several images as
multipart/form-data fields (one prediction per field, in order). An ``X-TopK: K`` header (or a
``topk`` form field) adds the K best classes.
Response: ``{"label": "cat", "probabilities": {"airplane": ..., ...}}`` (a list of those for a
multipart request).

Everything the handler needs to know about the model (classes, mean/std, variant) comes from the
JSON that the export stage packs beside the serialized model, so this file imports nothing from the
project and the archive is self-contained. The thread count comes from ``CIFAR10_WORKER_THREADS``,
which ``python -m server start`` sets from the cores the server is given (server/plan.py,
docs/SERVING.md), else from the archive's model-config.yaml (``handler.threads``), so that workers x
threads match the cores instead of oversubscribing them. Input limits come from model-config.yaml too
(``handler.max_image_pixels`` ...).

Reading a request costs bounded work (docs/SERVING.md, "Work budget"). Structures whose decoding cost
grows with the file rather than the pixels (JPEG scans, JPEG header segments, PNG chunks) are
counted before decoding and refused past their limits; and every request's images are opened,
decoded and shrunk to 32x32 in a child process of the worker (``Decoder``) under a CPU budget and a
wall-clock deadline. Pillow's decoders run in C and cannot be interrupted, but a child can be
killed: a request past its CPU budget gets 422, one past its deadline without having used its
budget (a busy machine) 503 with ``Retry-After``, and the worker goes on with the rest of the batch.

Every request is answered on its own. ``handle()`` is a template method over this handler's steps
only (BaseHandler's would switch the whole batch to describe/explain on request 0's headers), and
one boundary per request turns *any* exception while reading that request into its own 4xx with a
JSON message: the rest of the batch is classified normally and the worker stays up.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
# Phones and cameras write JPEGs that PIL reports as MPO (a JPEG with a second, multi-picture frame).
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG"}
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_SOS = b"\xff\xda"  # start of scan: every scan of every frame begins with these two bytes
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNG
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# PNG decoding costs per row as well as per pixel, so a one-pixel strip within the pixel budget can cost
# more than the CPU budget; JPEG's own limit on a side bounds the rows (docs/SERVING.md, "Work budget").
DEFAULT_MAX_IMAGE_SIDE = 65535
# Decode budget per request, summed over its images and checked from their headers before any is
# decoded: 2 MiB of well-compressed PNG can otherwise ask for 64 x 4096 x 4096 pixels.
DEFAULT_MAX_REQUEST_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGES_PER_REQUEST = 64
# Work budget per request (model-config.yaml ``handler.request_cpu_budget_ms`` / ``request_deadline_ms``):
# CPU time its images may cost to open, decode and shrink (past it: 422), and wall-clock time they may
# take (past it with the CPU budget unspent, the machine is busy: 503 with Retry-After).
DEFAULT_REQUEST_CPU_BUDGET_MS = 2000
DEFAULT_REQUEST_DEADLINE_MS = 5000
# A batch stops reading requests at this fraction of the model's responseTimeout, so that TorchServe
# never kills the worker for a slow batch: the requests left get 503 with Retry-After.
BATCH_SHARE_OF_RESPONSE_TIMEOUT = 0.5
DEFAULT_RESPONSE_TIMEOUT_S = 120  # TorchServe's own default_response_timeout
# Structures whose decoding cost is not bounded by the pixels, counted before decoding (docs/SERVING.md).
DEFAULT_MAX_JPEG_SCANS = 100  # libjpeg re-walks every coefficient of a component in each scan
DEFAULT_MAX_JPEG_HEADER_MARKERS = 65536  # 0xFF bytes before the first scan: Pillow parses each segment in Python
DEFAULT_MAX_PNG_CHUNKS = 4096  # Pillow reads every chunk in Python; libpng's encoders write 8 KiB IDATs
DECODER_POLL_S = 0.02  # how often the worker looks at its decoder's CPU time while waiting for it
PARAMETERS = ("topk",)  # multipart fields that are options, not images
TOPK_HEADER = "x-topk"  # the same option for a raw-body request (TorchServe does not forward query strings)
TOPK_PATTERN = re.compile(r"\s*([0-9]{1,4})\s*")
MAX_PHRASE = 200  # the message also goes into the HTTP status line: short, printable ASCII
THREADS_ENV = "CIFAR10_WORKER_THREADS"  # = server.plan.THREADS_ENV (the archive imports nothing from the project)


class BadInput(Exception):
    """A client error in one request: carries the HTTP status to answer it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Busy(BadInput):
    """Not the input's fault: the machine was too busy to read this request in time (503, Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(503, message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Limits:
    """What one image may be: pixels from its header, and the structures that cost work beyond the pixels."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_side: int = DEFAULT_MAX_IMAGE_SIDE
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
    max_jpeg_header_markers: int = DEFAULT_MAX_JPEG_HEADER_MARKERS
    max_png_chunks: int = DEFAULT_MAX_PNG_CHUNKS


def as_bytes(payload: Any) -> bytes:
    """The body as bytes, whatever TorchServe's worker made of it.

    The worker hands over ``text/*`` bodies as ``str`` (UTF-8 decoded, so encoding again restores
    the bytes) and ``application/json`` bodies as parsed JSON (any JSON value, ``None`` included).
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8", errors="surrogatepass")
    kind = "null" if payload is None else type(payload).__name__
    raise BadInput(415, f"expected image bytes, got a JSON {kind}: send the PNG or JPEG file as "
                        "the body with Content-Type image/png, image/jpeg or application/octet-stream")


def png_chunk_counts(body: bytes, limit: int) -> tuple[int, int]:
    """(chunks, iCCP chunks) of a PNG, walking chunk headers only and stopping past ``limit`` chunks."""
    chunks = iccp = 0
    offset = len(PNG_MAGIC)
    while offset + 8 <= len(body) and chunks <= limit:
        length, kind = struct.unpack_from(">I4s", body, offset)
        chunks += 1
        iccp += kind == b"iCCP"
        if kind == b"IEND":
            break
        offset += 12 + length  # length, type, data, CRC
    return chunks, iccp


def check_structure(body: bytes, limits: Limits) -> None:
    """Refuse, before decoding, what would cost work beyond the pixels (docs/SERVING.md, "Work budget")."""
    if body.startswith(JPEG_MAGIC):
        first_scan = body.find(JPEG_SOS)
        markers = body.count(b"\xff", 0, first_scan if first_scan >= 0 else len(body))
        if markers > limits.max_jpeg_header_markers:
            raise BadInput(422, f"JPEG header with {markers} marker bytes before its first scan, more than the "
                                f"limit of {limits.max_jpeg_header_markers}")
        scans = body.count(JPEG_SOS)  # an upper bound: entropy-coded data never holds 0xFF 0xDA
        if scans > limits.max_jpeg_scans:
            raise BadInput(422, f"JPEG with {scans} scans, more than the limit of {limits.max_jpeg_scans} "
                                "(each scan decodes the whole image again): save it as baseline or standard progressive")
    elif body.startswith(PNG_MAGIC):
        chunks, iccp = png_chunk_counts(body, limits.max_png_chunks)
        if chunks > limits.max_png_chunks:
            raise BadInput(422, f"PNG with more than {limits.max_png_chunks} chunks")
        if iccp > 1:
            raise BadInput(422, f"PNG with {iccp} iCCP chunks (colour profiles): the format allows one")


def open_image(body: bytes, limits: Limits) -> Image.Image:
    """PNG/JPEG bytes checked and opened lazily (header only), or BadInput saying what is wrong."""
    if not body:
        raise BadInput(400, "empty request body: send a PNG or JPEG image")
    check_structure(body, limits)
    max_pixels = limits.max_pixels
    try:
        image = Image.open(io.BytesIO(body))
    except UnidentifiedImageError:
        if body.startswith(JPEG_MAGIC):
            raise BadInput(415, "a JPEG this server cannot decode (12-bit or lossless JPEG?): send an 8-bit "
                                "baseline or progressive JPEG, or a PNG")
        raise BadInput(415, f"body is not a PNG or JPEG image ({len(body)} bytes, starts with {body[:8]!r})")
    except Image.DecompressionBombError as err:
        raise BadInput(413, f"image too large: {err}")
    except Exception as err:  # a malformed header can make any PIL plugin raise anything
        raise BadInput(400, f"corrupt image header: {type(err).__name__}: {err}")
    if image.format not in ACCEPTED_FORMATS:
        raise BadInput(415, f"unsupported image format {image.format}: send PNG or JPEG")
    width, height = image.size
    if width * height > max_pixels:
        # Checked from the header, before decoding, so a decompression bomb never allocates its pixels.
        raise BadInput(413, f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
    if max(width, height) > limits.max_side:
        raise BadInput(413, f"image is {width}x{height} pixels, a side longer than the limit of {limits.max_side}")
    if width < 1 or height < 1:
        raise BadInput(400, f"image is {width}x{height} pixels: nothing to classify")
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image into the centred square of its upright self in RGB, or BadInput if its data is broken.

    Cropped before the mode conversion (which is per pixel), so that a long image is converted only
    where the model will look.
    """
    fmt = ACCEPTED_FORMATS[image.format]
    try:
        if fmt == "JPEG":
            # libjpeg scales by 1/2, 1/4 or 1/8 while decoding, never below 32x32: a 12-megapixel
            # phone photo decodes as ~190k pixels, at a fraction of the time and memory.
            image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        image.load()
    except Exception as err:  # libpng/libjpeg report truncation and corruption with many exception types
        raise BadInput(400, f"truncated or corrupt {fmt} image: {type(err).__name__}: {err}")
    return to_rgb(centre_square(upright(image)))


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways and say so); broken EXIF is ignored."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy for the common upright image
    except Exception:  # the pixels are fine; only the metadata is unreadable
        logger.warning("ignoring unreadable EXIF orientation", exc_info=True)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited over white rather than dropped to black."""
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL clips 16-bit values at 255 when converting; keep the high byte instead.
        image = Image.fromarray((np.asarray(image) >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba)  # alpha_composite over white, in one pass instead of four
        return background
    return image.convert("RGB")


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square (torchvision's CenterCrop rounding)."""
    width, height = image.size
    if width == height:
        return image
    side = min(width, height)
    left, top = round((width - side) / 2), round((height - side) / 2)
    return image.crop((left, top, left + side, top + side))


def model_pixels(square: Image.Image) -> bytes:
    """The RGB square from ``load_rgb`` as the model's input, uint8 32x32 RGB (HWC) bytes.

    Cropping (in ``load_rgb``) before resizing keeps the work bounded by the image itself: resizing
    the short side of a 65535x1 image to 32 first would ask for a 2097120x32 intermediate. Bilinear
    with antialiasing, as torchvision's Resize does on PIL images; images already 32x32 (CIFAR itself)
    skip it.
    """
    if square.size != (IMAGE_SIZE, IMAGE_SIZE):
        square = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(square, dtype=np.uint8).tobytes()


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">Q", len(payload)) + payload)


def receive_frame(sock: socket.socket) -> bytes:
    """One length-prefixed frame; EOFError when the other side is gone."""
    def exactly(count: int) -> bytes:
        parts, left = [], count
        while left:
            part = sock.recv(min(left, 1 << 20))
            if not part:
                raise EOFError("decoder connection closed")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    (length,) = struct.unpack(">Q", exactly(8))
    return exactly(length)


class Decoder:
    """A forked child of the worker that runs ``work`` on each job, so that a job can be stopped.

    Pillow decodes in C, which Python cannot interrupt; a process can be killed. The child is forked
    (not spawned): it starts in milliseconds, shares the worker's memory copy-on-write, and needs no
    import of its own. It closes every inherited descriptor but its socket (so that the frontend
    still sees the worker's socket close when the worker dies) and dies with the worker. A job past
    its CPU budget or its deadline, or one that crashes the child, costs only a new child.
    """

    def __init__(self, work: Callable[[Any], Any]) -> None:
        self.work = work
        self.process: psutil.Process | None = None
        self.sock: socket.socket | None = None

    def run(self, job: Any, cpu_budget_s: float, deadline: float, retry_after_s: int) -> Any:
        """``work(job)``'s result from the child, its BadInput re-raised, or BadInput/Busy when stopped.

        ``deadline`` is a ``time.monotonic()`` time; past it, a job that has not spent its CPU budget
        was slowed down by everything else on the machine, not by its input.
        """
        if self.process is None:
            self._start()
        try:
            send_frame(self.sock, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # the child died between jobs (killed from outside): a new one takes the job
            self.stop()
            self._start()
            send_frame(self.sock, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        cpu_start, started = self._cpu_seconds(), time.monotonic()
        while True:
            wait = min(DECODER_POLL_S, deadline - time.monotonic())
            if wait > 0 and select.select([self.sock], [], [], wait)[0]:
                try:
                    ok, value = pickle.loads(receive_frame(self.sock))
                except (EOFError, OSError) as err:
                    self.stop()
                    raise BadInput(422, f"this request's image crashed the decoder ({type(err).__name__})")
                if ok:
                    return value
                raise BadInput(*value)
            used = self._cpu_seconds() - cpu_start
            if used > cpu_budget_s:
                self.stop()
                raise BadInput(422, f"reading this request cost more than its CPU budget of {cpu_budget_s * 1000:.0f} ms "
                                    "(an image whose decoding costs more than its pixels): send a baseline JPEG or a PNG")
            if time.monotonic() >= deadline:
                self.stop()
                raise Busy(f"the server was too busy to read this request in time ({used * 1000:.0f} ms of CPU "
                           f"in {time.monotonic() - started:.1f} s): retry later", retry_after_s)

    def _cpu_seconds(self) -> float:
        try:
            times = self.process.cpu_times()
        except psutil.Error:  # already gone: the answer (EOF) is on the socket
            return 0.0
        return times.user + times.system

    def _start(self) -> None:
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: never returns into TorchServe's worker loop
            try:
                parent.close()
                keep = child.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
                die_with_parent()
                serve_jobs(child, self.work)
            finally:
                os._exit(0)
        child.close()
        self.sock, self.process = parent, psutil.Process(pid)

    def stop(self) -> None:
        """Kill and reap the child; the next job starts a new one."""
        if self.process is None:
            return
        self.sock.close()
        try:
            os.kill(self.process.pid, signal.SIGKILL)
            os.waitpid(self.process.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.process = self.sock = None


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the worker) exits, even while it is decoding."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.warning("the decoder cannot be tied to its worker's life on this platform")


def serve_jobs(sock: socket.socket, work: Callable[[Any], Any]) -> None:
    """The child's loop: each job answered with (True, result) or (False, (status, message)), until EOF."""
    while True:
        try:
            job = pickle.loads(receive_frame(sock))
        except EOFError:
            return
        try:
            reply = (True, work(job))
        except BadInput as err:
            reply = (False, (err.status, err.message))
        except Exception as err:  # the boundary, as in preprocess: an input nobody planned for is still its 4xx
            reply = (False, (400, f"request could not be read: {type(err).__name__}: {err}"))
        send_frame(sock, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def parse_topk(value: Any, num_classes: int) -> int:
    """0 when absent; otherwise an integer 1..num_classes written in ASCII digits."""
    if value is None:
        return 0
    text = bytes(value).decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)
    match = TOPK_PATTERN.fullmatch(text)
    if match is None:
        raise BadInput(400, f"topk must be an integer between 1 and {num_classes}, got {text[:40]!r}")
    k = int(match.group(1))
    if not 1 <= k <= num_classes:
        raise BadInput(400, f"topk must be between 1 and {num_classes}, got {k}")
    return k


def status_phrase(message: str) -> str:
    """The message as an HTTP reason phrase: printable ASCII only (no CR/LF from client data), bounded."""
    text = message.encode("ascii", errors="backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else " " for c in text)[:MAX_PHRASE]


@dataclass
class Slot:
    """One request of the batch: which rows of the model batch are its images, its own reply, or why it failed."""

    rows: range = range(0)
    multi: bool = False
    topk: int = 0
    reply: Any = None
    error: BadInput | None = None


class Cifar10Handler(BaseHandler):
    """Image bytes in, label and class probabilities out; preprocessing and softmax on the worker's device."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        self.context = context
        self.manifest = context.manifest
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.threads = int(os.environ.get(THREADS_ENV) or config.get("threads", 1))
        self.limits = Limits(
            max_pixels=int(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
            max_side=int(config.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)),
            max_jpeg_scans=int(config.get("max_jpeg_scans", DEFAULT_MAX_JPEG_SCANS)),
            max_jpeg_header_markers=int(config.get("max_jpeg_header_markers", DEFAULT_MAX_JPEG_HEADER_MARKERS)),
            max_png_chunks=int(config.get("max_png_chunks", DEFAULT_MAX_PNG_CHUNKS)))
        self.cpu_budget_s = int(config.get("request_cpu_budget_ms", DEFAULT_REQUEST_CPU_BUDGET_MS)) / 1000
        self.deadline_s = int(config.get("request_deadline_ms", DEFAULT_REQUEST_DEADLINE_MS)) / 1000
        response_timeout = int((getattr(context, "model_yaml_config", None) or {}).get("responseTimeout",
                                                                                     DEFAULT_RESPONSE_TIMEOUT_S))
        self.batch_limit_s = response_timeout * BATCH_SHARE_OF_RESPONSE_TIMEOUT
        if self.deadline_s > self.batch_limit_s:  # each request's deadline is capped by its batch's (preprocess)
            logger.warning("request_deadline_ms %.0f is over half of responseTimeout (%d s): requests get %.1f s at most",
                           self.deadline_s * 1000, response_timeout, self.batch_limit_s)
        self._decoders = threading.local()
        self.max_request_pixels = int(config.get("max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS))
        self.max_images = int(config.get("max_images_per_request", DEFAULT_MAX_IMAGES_PER_REQUEST))
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}") if torch.cuda.is_available() and gpu_id is not None else torch.device("cpu")
        torch.set_num_threads(self.threads)

        model_path = Path(properties["model_dir"]) / self.manifest["model"]["serializedFile"]
        meta = json.loads(model_path.with_suffix(".json").read_text())
        self.classes: list[str] = list(meta["classes"])
        self.variant: str = meta.get("variant", model_path.stem)
        self.description = {"variant": self.variant, "classes": self.classes,
                            "checkpoint_test_accuracy": meta.get("checkpoint_test_accuracy"),
                            "accepts": "a PNG or JPEG image as the body, or one per multipart field",
                            "limits": {"max_image_pixels": self.limits.max_pixels,
                                       "max_image_side": self.limits.max_side,
                                       "max_request_pixels": self.max_request_pixels,
                                       "max_images_per_request": self.max_images,
                                       "request_cpu_budget_ms": round(self.cpu_budget_s * 1000),
                                       "request_deadline_ms": round(self.deadline_s * 1000),
                                       "max_jpeg_scans": self.limits.max_jpeg_scans,
                                       "max_jpeg_header_markers": self.limits.max_jpeg_header_markers,
                                       "max_png_chunks": self.limits.max_png_chunks}}
        self.mean = torch.tensor(meta["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], device=self.device).view(1, 3, 1, 1)

        if model_path.suffix == ".onnx":
            self.model = self._onnx_session(model_path)
            self.run = self._run_onnx
        else:
            self.model = torch.jit.load(str(model_path), map_location=self.device).eval()
            self.run = self._run_torch
        logger.info("loaded %s (%s) on %s with %d thread(s)", model_path.name, self.variant, self.device, self.threads)
        self.initialized = True

    @property
    def decoder(self) -> Decoder:
        """This thread's decoder child: one per thread that calls the handler (TorchServe's worker has
        one; in-process peers and micro-batching call it from several), so that jobs never interleave."""
        decoder = getattr(self._decoders, "decoder", None)
        if decoder is None:
            decoder = self._decoders.decoder = Decoder(self._decode)
        return decoder

    def _onnx_session(self, model_path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index}))
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)

    def _run_torch(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)

    def _run_onnx(self, batch: torch.Tensor) -> torch.Tensor:
        (logits,) = self.model.run(None, {self.model.get_inputs()[0].name: batch.cpu().numpy()})
        return torch.from_numpy(logits).to(self.device)

    def handle(self, data: list[dict], context) -> list[Any]:
        """preprocess -> inference -> postprocess, nothing else: every request gets exactly one answer.

        BaseHandler.handle would answer the whole batch with one description (``describe`` header) or
        with explanations (``explain``) when request 0 asks for it; here each request's own headers
        decide its own answer (see ``_read``).
        """
        start = time.time()
        self.context = context
        output = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    def preprocess(self, data: list[Any]) -> tuple[torch.Tensor | None, list[Slot]]:
        """Read every request behind its own boundary: whatever one request holds, it fails alone.

        The batch as a whole stops reading at ``batch_limit_s`` (half the responseTimeout): the
        requests left are answered 503 with Retry-After instead of the worker being killed.
        """
        batch_deadline = time.monotonic() + self.batch_limit_s
        images: list[torch.Tensor] = []
        slots: list[Slot] = []
        for idx, request in enumerate(data):
            try:
                slot, decoded = self._read(idx, request, batch_deadline)
            except BadInput as err:
                slot, decoded = Slot(error=err), []
            except Exception as err:  # the boundary: an input nobody planned for is still that request's 4xx
                logger.exception("request %d of the batch could not be read", idx)
                slot, decoded = Slot(error=BadInput(400, f"request could not be read: {type(err).__name__}: {err}")), []
            slot.rows = range(len(images), len(images) + len(decoded))
            images.extend(decoded)
            slots.append(slot)
        logger.info("batch of %d request(s), %d image(s), %d rejected", len(slots), len(images),
                    sum(slot.error is not None for slot in slots))
        batch = torch.stack(images).to(self.device) if images else None
        return batch, slots

    def _headers(self, idx: int) -> dict[str, str]:
        """This request's headers by lower-case name (the worker also files multipart part headers here, as dicts)."""
        headers = self.context.get_all_request_header(idx) or {}
        return {str(name).lower(): value for name, value in headers.items() if isinstance(value, str)}

    def _read(self, idx: int, request: Any, batch_deadline: float) -> tuple[Slot, list[torch.Tensor]]:
        """One request's answer slot and decoded images; raises BadInput for anything wrong with it."""
        headers = self._headers(idx)
        if headers.get("describe", "").strip().lower() == "true":
            return Slot(reply=self.description), []
        if headers.get("explain", "").strip().lower() == "true":
            raise BadInput(400, "explanations are not available for this model: use /predictions")
        if not isinstance(request, dict):
            raise BadInput(400, f"unreadable request ({type(request).__name__})")
        fields = [(name, value) for name, value in request.items() if name not in PARAMETERS]
        if not fields:
            raise BadInput(400, "empty request: send a PNG or JPEG image as the body")
        if len(fields) > self.max_images:
            raise BadInput(413, f"{len(fields)} images in one request, more than the limit of {self.max_images}")
        topk = parse_topk(request["topk"] if "topk" in request else headers.get(TOPK_HEADER), len(self.classes))
        multi = len(fields) > 1
        job = ([(name, self._field(name, multi, as_bytes, value)) for name, value in fields], multi)
        now = time.monotonic()
        if now >= batch_deadline:
            raise Busy(f"the batch this request came in ran out of time ({self.batch_limit_s:.0f} s): retry later",
                       math.ceil(self.deadline_s))
        pixels = self.decoder.run(job, self.cpu_budget_s, min(now + self.deadline_s, batch_deadline),
                                  math.ceil(self.deadline_s))
        decoded = [torch.frombuffer(bytearray(rgb), dtype=torch.uint8).view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1)
                   for rgb in pixels]
        return Slot(multi=multi, topk=topk), decoded

    def _decode(self, job: tuple[list[tuple[str, bytes]], bool]) -> list[bytes]:
        """In the decoder child: one request's images opened, checked, decoded and shrunk to the model's input.

        Every image's size is read from its header first, so that the per-request pixel budget is
        checked before any of them is decoded.
        """
        fields, multi = job
        opened = [self._field(name, multi, open_image, body, self.limits) for name, body in fields]
        total = sum(image.width * image.height for image in opened)
        if total > self.max_request_pixels:
            raise BadInput(413, f"{len(opened)} image(s) of {total} pixels in all, more than the limit of "
                                f"{self.max_request_pixels} per request")
        return [model_pixels(self._field(name, multi, load_rgb, image)) for (name, _), image in zip(fields, opened)]

    @staticmethod
    def _field(name: str, multi: bool, step, *args):
        """``step(*args)`` with the field's name in the message, so a client knows which of its images is bad."""
        try:
            return step(*args)
        except BadInput as err:
            if multi:
                err.message = f"field {name!r}: {err.message}"
            raise

    @torch.inference_mode()
    def inference(self, data: tuple[torch.Tensor | None, list[Slot]], *args, **kwargs) -> tuple[torch.Tensor | None, list[Slot]]:
        """The model on the whole batch; should that fail, on each request's images alone, so only the culprit fails."""
        batch, slots = data
        if batch is None:
            return None, slots
        try:
            return self._probabilities(batch), slots
        except Exception:
            logger.exception("the model failed on a batch of %d image(s); retrying request by request", len(batch))
        probabilities = torch.zeros(len(batch), len(self.classes))
        for slot in slots:
            if not slot.rows:
                continue
            try:
                probabilities[slot.rows.start:slot.rows.stop] = self._probabilities(batch[slot.rows.start:slot.rows.stop])
            except Exception as err:
                logger.exception("the model failed on a request's %d image(s)", len(slot.rows))
                slot.error = BadInput(500, f"the model failed on this request: {type(err).__name__}")
        return probabilities, slots

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalise, run the model and take the softmax, all on the worker's device."""
        inputs = ((batch.float() / 255.0 - self.mean) / self.std).contiguous()
        return torch.softmax(self.run(inputs).float(), dim=1).cpu()

    def postprocess(self, data: tuple[torch.Tensor | None, list[Slot]]) -> list[Any]:
        probabilities, slots = data
        responses: list[Any] = []
        for idx, slot in enumerate(slots):
            if slot.error is None:
                try:
                    responses.append(self._answer(probabilities, slot))
                    continue
                except Exception as err:
                    logger.exception("request %d of the batch could not be answered", idx)
                    slot.error = BadInput(500, f"the answer could not be built: {type(err).__name__}")
            error = slot.error
            self.context.set_response_status(error.status, status_phrase(error.message), idx=idx)
            if isinstance(error, Busy):
                self.context.set_response_header(idx, "Retry-After", str(error.retry_after_s))
            kind = "Busy" if isinstance(error, Busy) else "BadInput" if error.status < 500 else "InternalServerError"
            responses.append({"code": error.status, "type": kind, "message": error.message})
        return responses

    def _answer(self, probabilities: torch.Tensor | None, slot: Slot) -> Any:
        if slot.reply is not None:
            return slot.reply
        predictions = [self._prediction(probabilities[row], slot.topk) for row in slot.rows]
        return predictions if slot.multi else predictions[0]

    def _prediction(self, probabilities: torch.Tensor, topk: int) -> dict[str, Any]:
        values = probabilities.tolist()
        result: dict[str, Any] = {
            "label": self.classes[int(np.argmax(values))],
            "probabilities": dict(zip(self.classes, values)),
        }
        if topk:
            best = torch.topk(probabilities, topk)
            result["topk"] = [{"label": self.classes[i], "probability": p}
                              for p, i in zip(best.values.tolist(), best.indices.tolist())]
        return result


_service = Cifar10Handler()


def handle(data: list[dict] | None, context) -> list[Any] | None:
    """Module-level entry point, so the archive works with TorchServe's ``--handler file.py``."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
