"""TorchServe handler for the CIFAR-10 classifier, TorchScript and ONNX archives alike.

Request: the image bytes (PNG or JPEG, any size, any mode) as the raw body, or several images as
multipart/form-data fields (one prediction per field, in order). An ``X-TopK: K`` header (or a
``topk`` form field) adds the K best classes.
Response: ``{"label": "cat", "probabilities": {"airplane": ..., ...}}`` (a list of those for a
multipart request).

Everything the handler needs to know about the model (classes, mean/std, variant) comes from the
JSON that the export stage packs beside the serialized model, so this file imports nothing from the
project and the archive is self-contained. The thread count comes from ``CIFAR10_WORKER_THREADS``,
which ``python -m handlers.server start`` sets from the cores the server is given (handlers/resources.py,
docs/SERVING.md), else from the archive's model-config.yaml (``handler.threads``), so that workers x
threads match the cores instead of oversubscribing them.

Bad input is answered per request: the offending request gets a 4xx and a JSON message, while the
rest of the batch is classified normally and the worker stays up.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
ACCEPTED_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGES_PER_REQUEST = 64
PARAMETERS = ("topk",)  # multipart fields that are options, not images
TOPK_HEADER = "X-TopK"  # the same option for a raw-body request (TorchServe does not forward query strings)
THREADS_ENV = "CIFAR10_WORKER_THREADS"  # = handlers.resources.THREADS_ENV (the archive imports nothing from the project)


class BadInput(Exception):
    """A client error in one request: carries the HTTP status to answer it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(payload: Any, max_pixels: int) -> Image.Image:
    """Decode PNG/JPEG bytes into a fully loaded RGB image, or raise BadInput saying what is wrong."""
    if isinstance(payload, str):
        payload = payload.encode("latin-1")
    if not isinstance(payload, (bytes, bytearray)):
        raise BadInput(400, f"expected image bytes, got {type(payload).__name__} (send the PNG/JPEG file as the body)")
    if len(payload) == 0:
        raise BadInput(400, "empty request body: send a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(payload))
    except UnidentifiedImageError:
        raise BadInput(415, f"body is not a PNG or JPEG image ({len(payload)} bytes, starts with {bytes(payload[:8])!r})")
    except Image.DecompressionBombError as err:
        raise BadInput(413, f"image too large: {err}")
    if image.format not in ACCEPTED_FORMATS:
        raise BadInput(415, f"unsupported image format {image.format}: send PNG or JPEG")
    width, height = image.size
    if width * height > max_pixels:
        # Checked from the header, before decoding, so a decompression bomb never allocates its pixels.
        raise BadInput(413, f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise BadInput(400, f"truncated or corrupt {image.format} image: {err}")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited over white rather than dropped to black."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def parse_topk(value: Any, num_classes: int) -> int:
    if value is None:
        return 0
    text = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    try:
        k = int(text)
    except ValueError:
        raise BadInput(400, f"topk must be an integer between 1 and {num_classes}, got {text!r}")
    if not 1 <= k <= num_classes:
        raise BadInput(400, f"topk must be between 1 and {num_classes}, got {k}")
    return k


@dataclass
class Slot:
    """One request of the batch: which rows of the model batch are its images, or why it failed."""

    rows: range = range(0)
    multi: bool = False
    topk: int = 0
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
        self.max_images = int(config.get("max_images_per_request", DEFAULT_MAX_IMAGES_PER_REQUEST))
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}") if torch.cuda.is_available() and gpu_id is not None else torch.device("cpu")
        torch.set_num_threads(self.threads)

        model_path = Path(properties["model_dir"]) / self.manifest["model"]["serializedFile"]
        meta = json.loads(model_path.with_suffix(".json").read_text())
        self.classes: list[str] = list(meta["classes"])
        self.variant: str = meta.get("variant", model_path.stem)
        self.mean = torch.tensor(meta["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], device=self.device).view(1, 3, 1, 1)
        self.resize = v2.Compose([v2.Resize(IMAGE_SIZE, antialias=True), v2.CenterCrop(IMAGE_SIZE)])

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

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """uint8 (3, 32, 32); images already 32x32 (CIFAR itself) skip the resize, the costliest step."""
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = self.resize(image)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def preprocess(self, data: list[dict]) -> tuple[torch.Tensor | None, list[Slot]]:
        """Decode every request; a bad one becomes an error slot instead of failing the batch."""
        images: list[torch.Tensor] = []
        slots: list[Slot] = []
        for idx, request in enumerate(data):
            try:
                payloads = [(name, value) for name, value in request.items() if name not in PARAMETERS]
                if not payloads:
                    raise BadInput(400, "empty request: send a PNG or JPEG image as the body")
                if len(payloads) > self.max_images:
                    raise BadInput(413, f"{len(payloads)} images in one request, more than the limit of {self.max_images}")
                decoded = []
                for name, value in payloads:
                    try:
                        decoded.append(self.to_tensor(decode_image(value, self.max_pixels)))
                    except BadInput as err:
                        if len(payloads) > 1:
                            err.message = f"field {name!r}: {err.message}"
                        raise
                slot = Slot(range(len(images), len(images) + len(decoded)), multi=len(payloads) > 1,
                            topk=parse_topk(request.get("topk") or self.context.get_request_header(idx, TOPK_HEADER),
                                            len(self.classes)))
                images.extend(decoded)
            except BadInput as err:
                slot = Slot(error=err)
            slots.append(slot)
        logger.info("batch of %d request(s), %d image(s), %d rejected", len(slots), len(images),
                    sum(slot.error is not None for slot in slots))
        batch = torch.stack(images).to(self.device) if images else None
        return batch, slots

    @torch.inference_mode()
    def inference(self, data: tuple[torch.Tensor | None, list[Slot]], *args, **kwargs) -> tuple[torch.Tensor | None, list[Slot]]:
        """Normalise, run the model and take the softmax, all on the worker's device."""
        batch, slots = data
        if batch is None:
            return None, slots
        inputs = ((batch.float() / 255.0 - self.mean) / self.std).contiguous()
        probabilities = torch.softmax(self.run(inputs).float(), dim=1)
        return probabilities.cpu(), slots

    def postprocess(self, data: tuple[torch.Tensor | None, list[Slot]]) -> list[Any]:
        probabilities, slots = data
        responses: list[Any] = []
        for idx, slot in enumerate(slots):
            if slot.error is not None:
                self.context.set_response_status(slot.error.status, slot.error.message, idx=idx)
                responses.append({"code": slot.error.status, "type": "BadInput", "message": slot.error.message})
                continue
            predictions = [self._prediction(probabilities[row], slot.topk) for row in slot.rows]
            responses.append(predictions if slot.multi else predictions[0])
        return responses

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
    _service.context = context
    return _service.handle(data, context)
