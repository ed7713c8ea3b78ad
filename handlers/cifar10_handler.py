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

Every request is answered on its own. ``handle()`` is a template method over this handler's steps
only (BaseHandler's would switch the whole batch to describe/explain on request 0's headers), and
one boundary per request turns *any* exception while reading that request into its own 4xx with a
JSON message: the rest of the batch is classified normally and the worker stays up.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
# Phones and cameras write JPEGs that PIL reports as MPO (a JPEG with a second, multi-picture frame).
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG"}
JPEG_MAGIC = b"\xff\xd8\xff"
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNG
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Decode budget per request, summed over its images and checked from their headers before any is
# decoded: 2 MiB of well-compressed PNG can otherwise ask for 64 x 4096 x 4096 pixels.
DEFAULT_MAX_REQUEST_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGES_PER_REQUEST = 64
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


def open_image(payload: Any, max_pixels: int) -> Image.Image:
    """PNG/JPEG bytes opened lazily (header only) and checked, or BadInput saying what is wrong."""
    body = as_bytes(payload)
    if not body:
        raise BadInput(400, "empty request body: send a PNG or JPEG image")
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
    if width < 1 or height < 1:
        raise BadInput(400, f"image is {width}x{height} pixels: nothing to classify")
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image into an upright RGB image, or BadInput if its data is broken."""
    fmt = ACCEPTED_FORMATS[image.format]
    try:
        if fmt == "JPEG":
            # libjpeg scales by 1/2, 1/4 or 1/8 while decoding, never below 32x32: a 12-megapixel
            # phone photo decodes as ~190k pixels, at a fraction of the time and memory.
            image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        image.load()
    except Exception as err:  # libpng/libjpeg report truncation and corruption with many exception types
        raise BadInput(400, f"truncated or corrupt {fmt} image: {type(err).__name__}: {err}")
    return to_rgb(upright(image))


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
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square (torchvision's CenterCrop rounding)."""
    width, height = image.size
    side = min(width, height)
    left, top = round((width - side) / 2), round((height - side) / 2)
    return image.crop((left, top, left + side, top + side))


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
        self.max_pixels = int(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
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
                            "limits": {"max_image_pixels": self.max_pixels, "max_request_pixels": self.max_request_pixels,
                                       "max_images_per_request": self.max_images}}
        self.mean = torch.tensor(meta["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], device=self.device).view(1, 3, 1, 1)
        self.resize = v2.Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True)

        if model_path.suffix == ".onnx":
            self.model = self._onnx_session(model_path)
            self.run = self._run_onnx
        else:
            self.model = torch.jit.load(str(model_path), map_location=self.device).eval()
            self.run = self._run_torch
        logger.info("loaded %s (%s) on %s with %d thread(s)", model_path.name, self.variant, self.device, self.threads)
        self.initialized = True

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

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """uint8 (3, 32, 32): the centred square, resized; images already 32x32 (CIFAR itself) skip both.

        Cropping before resizing keeps the work bounded by the image itself: resizing the short side
        of a 16777216x1 image to 32 first would ask for a 536870912x32 intermediate.
        """
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = self.resize(centre_square(image))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def preprocess(self, data: list[Any]) -> tuple[torch.Tensor | None, list[Slot]]:
        """Read every request behind its own boundary: whatever one request holds, it fails alone."""
        images: list[torch.Tensor] = []
        slots: list[Slot] = []
        for idx, request in enumerate(data):
            try:
                slot, decoded = self._read(idx, request)
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

    def _read(self, idx: int, request: Any) -> tuple[Slot, list[torch.Tensor]]:
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
        opened = [self._field(name, multi, open_image, value, self.max_pixels) for name, value in fields]
        total = sum(image.width * image.height for image in opened)
        if total > self.max_request_pixels:
            raise BadInput(413, f"{len(opened)} image(s) of {total} pixels in all, more than the limit of "
                                f"{self.max_request_pixels} per request")
        decoded = [self.to_tensor(self._field(name, multi, load_rgb, image)) for (name, _), image in zip(fields, opened)]
        return Slot(multi=multi, topk=topk), decoded

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
            responses.append({"code": error.status, "type": "BadInput" if error.status < 500 else "InternalServerError",
                              "message": error.message})
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
