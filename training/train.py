"""Train the CIFAR-10 ResNet18: ``python -m training.train --preset cpu``.

Same CLI on one CPU, one GPU, or several GPUs under ``torchrun --nproc_per_node=N -m training.train``
(DistributedDataParallel; NCCL on CUDA, gloo on CPU). ``--batch-size`` is the global batch, split
across processes, so a recipe means the same thing whatever the process count.

Every epoch rewrites ``OUTPUT/last.pt`` (model, optimizer, scheduler, RNG-free data order) and the
metrics files; rerunning the same command resumes after the last finished epoch. The end product
is ``OUTPUT/model.pt``, a self-describing checkpoint (see training.checkpoint).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from training.checkpoint import build_metadata, load_checkpoint, save_checkpoint
from training.data import DATA_ENV, default_data_dir, load_split
from training.engine import evaluate, needs_grad_scaler, train_one_epoch
from training.model import build_model
from training.plots import plot_curves

# Recipes. "cpu" fits a 2-core machine (bf16; its time and accuracy are in docs/TRAINING.md);
# "gpu" is the longer schedule aimed at >= 95% top-1.
PRESETS: dict[str, dict] = {
    "cpu": dict(epochs=18, batch_size=128, lr=0.1, weight_decay=5e-4, label_smoothing=0.1, warmup=0.2, workers=0),
    "gpu": dict(epochs=40, batch_size=512, lr=0.4, weight_decay=5e-4, label_smoothing=0.1, warmup=0.15, workers=8),
}
RECIPE_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "warmup", "seed",
               "amp", "subset_train")
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "train_images_per_sec")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="recipe defaults (default: cpu)")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help=f"directory holding cifar-10-batches-py (default: ${DATA_ENV} or ./data)")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision if missing")
    parser.add_argument("--output-dir", default="runs/cpu", help="checkpoints, metrics and curves go here")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size (split across processes)")
    parser.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--warmup", type=float, help="fraction of steps spent warming up")
    parser.add_argument("--workers", type=int, help="data-loading worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="train in fp32 (default: bf16/fp16 autocast where the device computes it natively)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--subset-train", type=int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--subset-test", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--max-epochs-this-run", type=int,
                        help="stop after this many epochs even if the schedule is longer (resume later)")
    parser.add_argument("--half", action="store_true", help="store the final checkpoint's weights in fp16")
    parser.add_argument("--fresh", action="store_true", help="ignore OUTPUT/last.pt and start over")
    return parser


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option left unset from the chosen preset."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def setup_distributed(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device, rank, world_size


def write_metrics(history: list[dict], output_dir: Path) -> None:
    with open(output_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in METRIC_FIELDS} for row in history)
    (output_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    plot_curves(history, output_dir / "curves.png")


def main(args: argparse.Namespace) -> dict:
    args = resolve_recipe(args)
    device, rank, world_size = setup_distributed(args)
    is_main = rank == 0
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world_size} processes")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe = {key: getattr(args, key) for key in RECIPE_KEYS} | {"preset": args.preset, "world_size": world_size}

    train_set = load_split(args.data_dir, train=True, augment=True, subset=args.subset_train, download=args.download and is_main)
    test_set = load_split(args.data_dir, train=False, subset=args.subset_test)
    generator = torch.Generator()
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed) if world_size > 1 else None
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size // world_size, shuffle=sampler is None, sampler=sampler,
        generator=generator, num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False,
    )
    test_loader = DataLoader(test_set, batch_size=500, num_workers=args.workers, pin_memory=device.type == "cuda")

    torch.manual_seed(args.seed)
    model = build_model().to(device, memory_format=torch.channels_last)
    train_model: nn.Module = DistributedDataParallel(model) if world_size > 1 else model
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * len(train_loader), pct_start=args.warmup,
        anneal_strategy="cos",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, args.amp))

    history: list[dict] = []
    start_epoch = 1
    last_path = output_dir / "last.pt"
    if last_path.exists() and not args.fresh:
        state = torch.load(last_path, map_location=device, weights_only=True)
        if state["recipe"] != recipe:
            raise SystemExit(f"{last_path} was written by another recipe:\n  {state['recipe']}\nvs\n  {recipe}\n"
                             "Use another --output-dir, or --fresh to start over.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        if is_main:
            print(f"resuming from {last_path} after epoch {state['epoch']}", flush=True)

    stop_epoch = args.epochs if args.max_epochs_this_run is None else min(args.epochs, start_epoch - 1 + args.max_epochs_this_run)
    for epoch in range(start_epoch, stop_epoch + 1):
        # The data order and augmentation of epoch e depend only on (seed, e), so a resumed run
        # sees exactly the batches the uninterrupted run would have seen.
        generator.manual_seed(args.seed * 1000 + epoch)
        torch.manual_seed(args.seed * 1000 + epoch + 7919 * rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = scheduler.get_last_lr()[0]
        train_stats = train_one_epoch(train_model, train_loader, optimizer, scheduler, criterion, device, args.amp,
                                      scaler, f"epoch {epoch}/{args.epochs}", show_progress=is_main)
        if is_main:
            test_stats, _ = evaluate(model, test_loader, device, amp=args.amp)
            history.append({
                "epoch": epoch, "lr": lr, "train_loss": train_stats.loss, "train_acc": train_stats.accuracy,
                "test_loss": test_stats.loss, "test_acc": test_stats.accuracy,
                "epoch_seconds": train_stats.seconds + test_stats.seconds,
                "train_images_per_sec": train_stats.images_per_sec,
            })
            print(f"epoch {epoch}: train loss {train_stats.loss:.4f} acc {train_stats.accuracy:.4f} | "
                  f"test loss {test_stats.loss:.4f} acc {test_stats.accuracy:.4f} | "
                  f"{train_stats.images_per_sec:.0f} img/s, {history[-1]['epoch_seconds']:.0f} s", flush=True)
            write_metrics(history, output_dir)
            state = {"epoch": epoch, "recipe": recipe, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history}
            torch.save(state, output_dir / "last.tmp")
            os.replace(output_dir / "last.tmp", last_path)
        if world_size > 1:
            dist.barrier()

    result: dict = {"epochs_done": stop_epoch, "history": history}
    if is_main and stop_epoch == args.epochs:
        result["checkpoint"] = str(finalize(model, history, recipe, test_loader, device, output_dir, args.half))
    if world_size > 1:
        dist.destroy_process_group()
    return result


def finalize(model: nn.Module, history: list[dict], recipe: dict, test_loader: DataLoader, device: torch.device,
             output_dir: Path, half: bool) -> Path:
    """Save model.pt and record the fp32 test accuracy of exactly the weights it holds."""
    path = output_dir / "model.pt"
    train_seconds = sum(row["epoch_seconds"] for row in history)
    metadata = build_metadata(
        epochs=len(history), recipe=recipe, train_wall_seconds=round(train_seconds, 1),
        train_images_per_sec=round(sum(r["train_images_per_sec"] for r in history) / len(history), 1),
        test_images=len(test_loader.dataset),
        device=f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu",
    )
    save_checkpoint(path, model, metadata, half=half)
    saved_model, _ = load_checkpoint(path)
    stats, _ = evaluate(saved_model.to(device, memory_format=torch.channels_last), test_loader, device, amp=False)
    metadata["test_accuracy"] = round(stats.accuracy, 6)
    save_checkpoint(path, saved_model, metadata, half=half)
    print(f"saved {path}: fp32 test accuracy {stats.accuracy:.4f} on {stats.images} images "
          f"({'fp16' if half else 'fp32'} weights)", flush=True)
    return path


if __name__ == "__main__":
    main(get_args_parser().parse_args())
