"""One calling convention for every artifact: float32 NCHW numpy batch in, logits out."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

Runner = Callable[[np.ndarray], np.ndarray]


def torch_runner(model: nn.Module) -> Runner:
    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(images)).numpy()
    return run


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    """CPU session with an explicit thread count, so every variant is timed on the same cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_runner(path: Path, threads: int) -> Runner:
    """TorchScript (.pt) with torch, anything else with onnxruntime."""
    if path.suffix == ".pt":
        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated upstream
            return torch_runner(torch.jit.load(str(path), map_location="cpu"))
    session = onnx_session(path, threads)
    input_name = session.get_inputs()[0].name
    return lambda images: session.run(None, {input_name: images})[0]
