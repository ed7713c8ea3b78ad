"""The handler's preprocessing against torchvision's, in-process: the served input is what training's transforms give.

The handler crops before converting modes and composites transparency with one ``paste`` (docs/SERVING.md,
"Work budget"); the reference here does it the textbook way: any mode composited over white with
``Image.alpha_composite``, then torchvision's ``CenterCrop`` and ``Resize``. Hypothesis draws the modes,
shapes, pixels and EXIF orientations.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torchvision import transforms

from handlers.cifar10_handler import (
    IMAGE_SIZE,
    BadInput,
    Limits,
    load_rgb,
    model_pixels,
    open_image,
)

MODES = ("1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "I;16")


def reference(body: bytes) -> np.ndarray:
    """Upright, composited over white, RGB, then torchvision's centre crop to a square and resize to 32x32."""
    image = Image.open(io.BytesIO(body))
    if image.format == "JPEG":
        image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # libjpeg's DCT scaling, as the handler decodes JPEGs
    image = ImageOps.exif_transpose(image)
    if image.mode == "I;16":
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    if image.mode in ("LA", "RGBA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    shrink = transforms.Compose([transforms.CenterCrop(min(image.size)), transforms.Resize((IMAGE_SIZE, IMAGE_SIZE))])
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = shrink(image)
    return np.asarray(image)


def served(body: bytes) -> np.ndarray:
    pixels = model_pixels(load_rgb(open_image(body, Limits())))
    return np.frombuffer(pixels, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3)


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """A PNG (or, for RGB, sometimes a JPEG with an EXIF orientation) of a drawn mode, shape and pixels."""
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    channels = {"1": 1, "L": 1, "LA": 2, "P": 1, "P+transparency": 1, "RGB": 3, "RGBA": 4, "I;16": 1}[mode]
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 2**16, (height, width), dtype=np.uint16))
    else:
        array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(array[..., 0] if channels == 1 else array, {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels])
    if mode == "1":
        image = image.convert("1")
    if mode.startswith("P"):
        image = image.convert("P")
    if mode == "P+transparency":
        image.info["transparency"] = draw(st.integers(0, 255))
    buffer = io.BytesIO()
    if mode == "RGB" and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))
        image.save(buffer, "JPEG", exif=exif)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


@settings(max_examples=300, deadline=None)
@given(images())
def test_the_handler_gives_the_model_what_torchvision_would(body: bytes) -> None:
    assert np.array_equal(served(body), reference(body))


@pytest.mark.parametrize("size", [(65535, 1), (1, 65535), (300, 1), (1, 300)])
def test_a_strip_up_to_the_side_limit_is_its_centre_pixel_and_no_more(size: tuple[int, int]) -> None:
    """A one-pixel strip becomes its one centre pixel, not a 32-pixel-wide intermediate of its length."""
    strip = np.zeros((size[1], size[0], 3), np.uint8)
    strip.reshape(-1, 3)[round((max(size) - 1) / 2)] = (200, 100, 50)  # CenterCrop rounds as torchvision does
    buffer = io.BytesIO()
    Image.fromarray(strip, "RGB").save(buffer, "PNG")
    assert (served(buffer.getvalue()) == (200, 100, 50)).all()


def test_a_side_past_the_limit_is_refused_from_the_header() -> None:
    buffer = io.BytesIO()
    Image.new("1", (1, 65536)).save(buffer, "PNG")
    with pytest.raises(BadInput) as refused:
        open_image(buffer.getvalue(), Limits())
    assert refused.value.status == 413 and "1x65536 pixels, a side longer than the limit of 65535" in refused.value.message
