"""Test accuracy of a checkpoint: ``python -m training.evaluate CHECKPOINT``.

Prints top-1 accuracy and a per-class table, and writes a confusion-matrix PNG. Evaluation runs in
fp32, as the exported artifacts do, so the number printed is the one the export stage checks against.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.checkpoint import load_checkpoint
from training.data import DATA_ENV, default_data_dir, load_split
from training.engine import evaluate
from training.plots import plot_confusion


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-dir", default=default_data_dir(), help=f"directory holding cifar-10-batches-py (default: ${DATA_ENV} or ./data)")
    parser.add_argument("--subset", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--confusion-png", type=Path, help="default: CHECKPOINT with suffix _confusion.png")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser


def per_class_table(confusion: torch.Tensor, classes: list[str]) -> str:
    totals = confusion.sum(dim=1)
    rows = [f"{'class':<12}{'correct':>9}{'total':>8}{'accuracy':>10}"]
    for index, name in enumerate(classes):
        correct, total = int(confusion[index, index]), int(totals[index])
        rows.append(f"{name:<12}{correct:>9}{total:>8}{100 * correct / max(total, 1):>9.2f}%")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model, metadata = load_checkpoint(args.checkpoint)
    model = model.to(device, memory_format=torch.channels_last)
    loader = DataLoader(load_split(args.data_dir, train=False, subset=args.subset), batch_size=args.batch_size)
    stats, confusion = evaluate(model, loader, device, amp=False, num_classes=len(metadata["classes"]))
    print(f"{args.checkpoint}: top-1 accuracy {100 * stats.accuracy:.2f}% on {stats.images} test images "
          f"(checkpoint metadata says {100 * metadata.get('test_accuracy', float('nan')):.2f}%)")
    print(per_class_table(confusion, metadata["classes"]))
    png = args.confusion_png or args.checkpoint.with_name(args.checkpoint.stem + "_confusion.png")
    plot_confusion(confusion, metadata["classes"], png, title=f"{args.checkpoint.name}: {100 * stats.accuracy:.2f}% top-1")
    print(f"confusion matrix: {png}")
    result = {"checkpoint": str(args.checkpoint), "accuracy": stats.accuracy, "images": stats.images,
              "per_class_accuracy": dict(zip(metadata["classes"], (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist())),
              "confusion": confusion.tolist()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
