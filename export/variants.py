"""The artifact variants and their file names, shared by the exporter, the report and the tests."""
from __future__ import annotations

VARIANTS: tuple[str, ...] = ("torchscript", "onnx", "onnx_int8_dynamic", "onnx_int8_static")
ONNX_VARIANTS: tuple[str, ...] = ("onnx", "onnx_int8_dynamic", "onnx_int8_static")
# fp32 variants must reproduce the checkpoint's logits; INT8 ones are judged on accuracy instead.
FP32_VARIANTS: tuple[str, ...] = ("torchscript", "onnx")
MODEL_PREFIX = "cifar10"


def model_name(variant: str) -> str:
    """TorchServe model name, also the artifact's file stem: cifar10_<variant>."""
    return f"{MODEL_PREFIX}_{variant}"


def artifact_name(variant: str) -> str:
    return model_name(variant) + (".pt" if variant == "torchscript" else ".onnx")
