"""The description every artifact carries: in ONNX metadata_props and in a JSON file beside it.

The TorchServe handler reads ``classes``, ``mean``, ``std`` and ``variant`` from the JSON, so
preprocessing in serving comes from the artifact itself, never from a copy of the constants.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from export.convert import INPUT_NAME, OUTPUT_NAME
from training.checkpoint import file_sha256


def base_metadata(checkpoint: Path, checkpoint_metadata: dict[str, Any]) -> dict[str, Any]:
    """Fields shared by every artifact of one export, taken from the checkpoint's own metadata."""
    model_input = checkpoint_metadata["input"]
    return {
        "classes": list(checkpoint_metadata["classes"]),
        "mean": list(checkpoint_metadata["mean"]),
        "std": list(checkpoint_metadata["std"]),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": model_input["layout"],
        "input_shape": ["N", *model_input["size"]],
        "input_dtype": model_input["dtype"],
        "value_range": model_input["value_range"],
        "architecture": checkpoint_metadata["architecture"],
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_test_accuracy": checkpoint_metadata.get("test_accuracy"),
        "checkpoint_test_images": checkpoint_metadata.get("test_images"),
        "checkpoint_git_revision": checkpoint_metadata.get("git_revision"),
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "exported_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def embed_onnx_metadata(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``metadata`` plus the file's real opset into its metadata_props (non-strings as JSON).

    The opset is read back from the model because the quantizers may raise it above the export's.
    """
    model = onnx.load(str(path))
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    metadata = {**metadata, "opset": opset}
    onnx.helper.set_model_props(
        model, {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    )
    onnx.save(model, str(path))
    return metadata


def sidecar_path(artifact: Path) -> Path:
    """Where the handler looks for the description: same stem, .json."""
    return artifact.with_suffix(".json")


def write_sidecar(artifact: Path, metadata: dict[str, Any]) -> Path:
    path = sidecar_path(artifact)
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    return path
