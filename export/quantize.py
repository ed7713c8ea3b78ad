"""INT8 variants of the fp32 ONNX model with onnxruntime.quantization.

Each function returns the settings it used, which go into the artifact's metadata.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.convert import INPUT_NAME


def preprocess(source: Path, target: Path) -> None:
    """Shape inference and graph clean-up that onnxruntime recommends before quantizing."""
    quant_pre_process(str(source), str(target))


def quantize_int8_dynamic(source: Path, target: Path) -> dict[str, Any]:
    """Weights to INT8 offline, activations quantized per batch at run time (ConvInteger/MatMulInteger).

    No calibration is needed, but onnxruntime's ConvInteger kernels are much slower than its fp32
    convolutions, so on a CNN this variant is expected to lose to fp32 on speed.
    """
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return {"method": "dynamic", "weight_type": "QInt8", "per_channel": False}


class ImageBatches(CalibrationDataReader):
    """Feeds calibration images to the calibrator in fixed-size batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 64) -> None:
        self.batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8_static(source: Path, target: Path, images: np.ndarray, method: str = "MinMax") -> dict[str, Any]:
    """QDQ model with per-channel INT8 weights and activation ranges calibrated on ``images``.

    Activations are uint8 and weights int8 (U8S8), about twice as fast as all-int8 (S8S8) QDQ. The
    weights use 7 of their 8 bits (``reduce_range``): on x86 CPUs without VNNI, ONNX Runtime's U8S8
    kernels sum pairs of 8-bit products in saturating 16-bit lanes, and full-range weights overflow
    them, so the same file lost over a point of accuracy on such a CPU (docs/EXPORT_METHOD.md).
    """
    quantize_static(
        str(source), str(target), ImageBatches(images),
        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[method],
    )
    return {"method": "static", "format": "QDQ", "per_channel": True, "reduce_range": True,
            "activation_type": "QUInt8", "weight_type": "QInt8", "calibration_method": method,
            "calibration_images": len(images), "calibration_split": "train"}
