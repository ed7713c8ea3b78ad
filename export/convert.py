"""fp32 exports of the checkpoint's model: TorchScript and ONNX."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from training.model import IMAGE_SIZE

# 18 is the dynamo exporter's native opset and is fully covered by onnxruntime's quantization tools.
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def example_input(batch: int = 2) -> torch.Tensor:
    """A batch of 2, not 1, so that torch.export does not specialise the batch dimension to a constant."""
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)


def export_torchscript(model: nn.Module, path: Path) -> str:
    """Trace and freeze the eval-mode model; returns a description of the exporter for the metadata."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated upstream but is still what TorchServe's TorchScript path loads.
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.jit.freeze(torch.jit.trace(model.eval(), example_input())).save(str(path))
    return f"torch.jit.trace + torch.jit.freeze (torch {torch.__version__})"


def export_onnx(model: nn.Module, path: Path) -> str:
    """torch.export-based (dynamo) ONNX export with a dynamic batch axis; BatchNorm is folded into Conv."""
    torch.onnx.export(
        model.eval(), (example_input(),), str(path),
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
    )
    return f"torch.onnx.export(dynamo=True, opset_version={OPSET}) (torch {torch.__version__})"
