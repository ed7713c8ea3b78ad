"""Accept or reject an artifact by comparing it with the checkpoint's fp32 model on real test images."""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from export.runtime import Runner
from export.variants import FP32_VARIANTS


TOLERANCE = 1e-9  # float rounding of accuracy differences: a loss of exactly the limit is allowed


class ArtifactRejected(RuntimeError):
    """An exported artifact failed verification; it must not be packed."""


def predict(runner: Runner, images: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    starts = range(0, len(images), batch_size)
    return np.concatenate([runner(images[i:i + batch_size]) for i in tqdm(starts, desc=desc, leave=False)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, parity_images: int) -> dict[str, Any]:
    """Accuracy and top-1 agreement on every test image; logit differences on the first ``parity_images``."""
    n = min(parity_images, len(labels))
    return {
        "accuracy": accuracy(logits, labels),
        "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(logits[:n] - reference[:n]).max()),
        "max_abs_logit": float(np.abs(reference[:n]).max()),
        "test_images": len(labels),
        "parity_images": n,
    }


def rejection_reason(variant: str, result: dict[str, Any], reference_accuracy: float, limit: float,
                     min_agreement: float) -> str | None:
    """Why ``variant`` fails, or None.

    fp32: ``limit`` is the largest |logit difference| allowed (the release model's exports differ by ~2e-6).
    INT8: ``limit`` is the accuracy loss allowed, in percentage points, vs the checkpoint on the same
    images, and at least ``min_agreement`` (a fraction) of its top-1 predictions must equal the checkpoint's.
    """
    if variant in FP32_VARIANTS:
        if not result["max_abs_diff"] <= limit:
            return f"max |logit diff| {result['max_abs_diff']:.3g} exceeds {limit:g}"
        return None
    loss = 100 * (reference_accuracy - result["accuracy"])
    if not loss <= limit + TOLERANCE:
        return (f"accuracy {100 * result['accuracy']:.2f}% is {loss:.2f} points below the checkpoint's "
                f"{100 * reference_accuracy:.2f}% (allowed: {limit:g})")
    if not result["top1_agreement"] >= min_agreement:
        return (f"top-1 agreement with the checkpoint {100 * result['top1_agreement']:.2f}% is below "
                f"{100 * min_agreement:g}%")
    return None


def floor_reason(measured: float, images: int, recorded: float | None, recorded_images: int | None,
                 max_points: float) -> str | None:
    """Why the fp32 model's accuracy on the full test set disagrees with the checkpoint's record, or None.

    The checkpoint stores the test accuracy of exactly its weights; an fp32 export of them must
    reproduce it, so a larger gap means a corrupt or wrong checkpoint (or test set).
    """
    if recorded is None:
        return "the checkpoint records no test accuracy to check the export against"
    if recorded_images != images:
        return f"the checkpoint's accuracy is over {recorded_images} test images, this run has {images}"
    gap = 100 * abs(measured - recorded)
    if not gap <= max_points + TOLERANCE:
        return (f"fp32 accuracy {100 * measured:.2f}% on {images} test images differs from the "
                f"{100 * recorded:.2f}% recorded in the checkpoint by {gap:.2f} points (allowed: {max_points:g}): "
                "corrupt or wrong checkpoint")
    return None
