"""One training epoch and one evaluation pass, shared by the training CLI and the evaluate CLI."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them PyTorch emulates bf16
    and autocast makes training many times slower than fp32 (docs/TRAINING.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA cards and CPUs that compute bf16, fp16 on older CUDA cards, else fp32."""
    if not enabled or (device.type == "cpu" and not cpu_computes_bf16()):
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    device: torch.device,
    amp: bool,
    scaler: torch.amp.GradScaler,
    description: str,
    show_progress: bool,
) -> EpochStats:
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=description, disable=not show_progress, mininterval=2.0, dynamic_ncols=True)
    for images, labels in bar:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.item() * labels.size(0)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.size(0)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        img_s=f"{seen / (time.perf_counter() - start):.0f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
    loss_sum, correct, seen = _all_reduce([loss_sum, correct, seen], device)
    return EpochStats(loss_sum / seen, correct / seen, int(seen), time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = False,
    num_classes: int = 10,
) -> tuple[EpochStats, torch.Tensor]:
    """Loss, top-1 accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = 0.0
    start = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss_sum += criterion(logits.float(), labels).item()
        predictions = logits.argmax(1)
        confusion += torch.bincount(
            labels.cpu() * num_classes + predictions.cpu(), minlength=num_classes * num_classes
        ).view(num_classes, num_classes)
    seen = int(confusion.sum())
    accuracy = confusion.diag().sum().item() / seen
    return EpochStats(loss_sum / seen, accuracy, seen, time.perf_counter() - start), confusion
