"""Self-describing checkpoints: a state_dict plus the metadata every later stage needs.

Everything stored is a tensor or a plain Python value, so ``torch.load(path, weights_only=True)``
loads it without executing pickled code.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.model import ARCHITECTURE, CLASSES, MEAN, STD, build_model

FORMAT_VERSION = 1


def git_revision() -> str:
    """HEAD's hash, suffixed with -dirty when tracked files differ from it; 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def build_metadata(**extra: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "classes": list(CLASSES),
        "mean": list(MEAN),
        "std": list(STD),
        "input": {"layout": "NCHW", "size": [3, 32, 32], "dtype": "float32",
                  "value_range": "RGB scaled to [0, 1], then (x - mean) / std"},
        "git_revision": git_revision(),
        **extra,
    }


def save_checkpoint(path: str | Path, model: nn.Module, metadata: dict[str, Any], half: bool = False) -> None:
    """Write the release checkpoint; ``half`` stores floating-point tensors as fp16 to halve the file."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "metadata": {**metadata, "weights_dtype": "float16" if half else "float32"}}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the fp32 model in eval mode from a checkpoint, whatever dtype its weights were stored in."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    metadata = payload["metadata"]
    if metadata.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path}: architecture {metadata.get('architecture')!r}, expected {ARCHITECTURE!r}")
    model = build_model(num_classes=len(metadata["classes"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    return model.eval(), metadata


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
