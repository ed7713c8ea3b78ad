"""What a well-formed answer looks like, and how many of its labels are right.

A malformed answer (no CIFAR-10 label, probabilities that do not sum to 1, a missing prediction)
fails its request. A well-formed answer with the wrong label is a served answer, but not goodput:
the load test counts the right labels separately, so a wrong model shows up as served accuracy.
"""
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


def correct_labels(answer: Any, truth: Sequence[str]) -> int:
    """How many predictions of a well-formed answer (see ``answer_error``) carry the true label of their image."""
    predictions = [answer] if len(truth) == 1 else answer
    return sum(prediction["label"] == label for prediction, label in zip(predictions, truth))


def accuracy_floor(expected: float, distinct_images: int, sigmas: float = 3.0) -> float:
    """The lowest served accuracy still consistent with a model whose verified test accuracy is ``expected``.

    The load test cycles a pool of ``distinct_images`` test images, so its served accuracy is that of a
    sample of that size: ``sigmas`` binomial standard errors below ``expected`` it is a wrong model (or
    wrong preprocessing), not an unlucky sample.
    """
    return expected - sigmas * math.sqrt(expected * (1 - expected) / max(distinct_images, 1))
