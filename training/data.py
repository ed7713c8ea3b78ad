"""CIFAR-10 loading from a configurable directory, with the training and evaluation transforms.

The data root is the directory that holds ``cifar-10-batches-py`` (torchvision's layout). It comes
from ``--data-dir`` or the ``CIFAR10_ROOT`` environment variable. Copies rebuilt from other sources
keep the pickle format but not the original files' md5 sums, so torchvision's integrity check is
replaced by a structural one; ``download=True`` still uses torchvision's own downloader.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from training.model import MEAN, STD, IMAGE_SIZE

DATA_ENV = "CIFAR10_ROOT"
DEFAULT_DATA_DIR = "data"


def default_data_dir() -> str:
    return os.environ.get(DATA_ENV, DEFAULT_DATA_DIR)


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 whose integrity check only requires the batch files to exist."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)


def eval_transform() -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def train_transform() -> v2.Compose:
    """Random crop with 4-pixel reflect padding and horizontal flip: cheap, and enough for short schedules."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomCrop(IMAGE_SIZE, padding=4, padding_mode="reflect"),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def load_split(
    root: str | os.PathLike,
    train: bool,
    augment: bool = False,
    subset: int | None = None,
    download: bool = False,
) -> Dataset:
    """One CIFAR-10 split; ``subset`` keeps its first N images (for smoke runs and tests)."""
    root = Path(root)
    try:
        dataset = CIFAR10(
            str(root), train=train, download=download,
            transform=train_transform() if augment else eval_transform(),
        )
    except RuntimeError as err:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root.resolve()} (expected {root / CIFAR10.base_folder}/data_batch_1 "
            f"... test_batch). Point --data-dir or ${DATA_ENV} at the directory that holds "
            f"{CIFAR10.base_folder}, or pass --download."
        ) from err
    if subset is not None:
        dataset = Subset(dataset, range(min(subset, len(dataset))))
    return dataset
