"""Request bodies made of real CIFAR-10 test images, encoded once per process.

Encoding PNGs costs far more CPU than sending them, so a load generator that encoded per request
would measure itself; the pool is built once and cycled, so the server sees many distinct images
rather than one cached file.
"""
from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from functools import cache

from training.data import CIFAR10


@cache
def test_images(data_dir: str, count: int) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """The first ``count`` test images as PNG bytes, and the class names in label order."""
    dataset = CIFAR10(data_dir, train=False)
    pngs = []
    for index in range(min(count, len(dataset))):
        buffer = io.BytesIO()
        dataset[index][0].save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return tuple(pngs), tuple(dataset.classes)


@cache
def true_labels(data_dir: str, count: int) -> tuple[str, ...]:
    """The class name of each image of ``test_images(data_dir, count)``, in the same order: what a correct
    server answers, so that a load test can count right answers rather than well-formed ones."""
    dataset = CIFAR10(data_dir, train=False)
    return tuple(dataset.classes[label] for label in dataset.targets[:count])


def multipart(images: Sequence[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body with one field per image, and its Content-Type header value.

    Built by hand because the fast Locust client does not encode files; field names are ordered so
    the handler's one-prediction-per-field answer can be matched back to the images.
    """
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image{i}"; filename="image{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n"
        for i, image in enumerate(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
