"""CIFAR-10 splits as whole numpy arrays: verification, benchmarks and calibration slice them freely."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.data import load_split


def load_images(root: str | os.PathLike, train: bool, subset: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float32 NCHW images and int64 labels, exactly as the training code's eval transform makes them."""
    loader = DataLoader(load_split(root, train=train, subset=subset), batch_size=1000)
    batches = list(tqdm(loader, desc=f"load {'train' if train else 'test'} images", leave=False))
    images = torch.cat([images for images, _ in batches]).numpy()
    labels = torch.cat([labels for _, labels in batches]).numpy()
    return np.ascontiguousarray(images), labels


def stratified_indices(labels: np.ndarray, count: int | None) -> np.ndarray:
    """The first ``count // classes`` test images of every class, in test-set order; all images for None.

    A fixed subset, so that a fast verification is repeatable, and stratified, so that every class
    weighs the same in it as in the full test set.
    """
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = max(1, count // len(classes))
    return np.sort(np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in classes]))
