"""What a correct answer looks like, so a load test counts wrong answers as failures, not as throughput."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PROBABILITY_TOLERANCE = 1e-3


def prediction_error(prediction: Any, classes: Sequence[str]) -> str | None:
    """Why one prediction is malformed, or None: a known label and one probability per class summing to ~1."""
    if not isinstance(prediction, dict):
        return f"prediction is {type(prediction).__name__}, not an object"
    if prediction.get("label") not in classes:
        return f"label {prediction.get('label')!r} is not a CIFAR-10 class"
    probabilities = prediction.get("probabilities")
    if not isinstance(probabilities, dict) or sorted(probabilities) != sorted(classes):
        return f"probabilities must have exactly the {len(classes)} classes as keys"
    total = sum(probabilities.values())
    if not math.isclose(total, 1.0, abs_tol=PROBABILITY_TOLERANCE):
        return f"probabilities sum to {total:.4f}, not 1"
    if max(probabilities, key=probabilities.get) != prediction["label"]:
        return f"label {prediction['label']!r} is not the most probable class"
    return None


def answer_error(answer: Any, classes: Sequence[str], images: int) -> str | None:
    """Why a whole answer is wrong, or None: one object for one image, a list of ``images`` objects otherwise."""
    if images == 1:
        return prediction_error(answer, classes)
    if not isinstance(answer, list) or len(answer) != images:
        length = len(answer) if isinstance(answer, list) else 1
        return f"expected a list of {images} predictions, got {type(answer).__name__} of length {length}"
    for index, prediction in enumerate(answer):
        error = prediction_error(prediction, classes)
        if error is not None:
            return f"image {index}: {error}"
    return None
