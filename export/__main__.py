"""Export a checkpoint for TorchServe: ``python -m export --checkpoint training/release/resnet18_cifar10.pt``.

Writes into --output-dir the TorchScript, ONNX fp32, ONNX dynamic-INT8 and ONNX static-INT8 (QDQ)
variants, each with a JSON description beside it (and the same description in ONNX metadata_props).
Each is run on real CIFAR-10 test images against the checkpoint's fp32 PyTorch model and timed on
the CPU with the same thread count; the table goes to --report-dir (EXPORT.md, export.json). Only
if every selected variant is accepted are they packed with torch-model-archiver into --model-store
as cifar10_<variant>.mar, plus cifar10.mar from --default-variant. A rejection exits non-zero and
leaves the model store untouched.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import psutil
import torch
from onnxruntime.quantization import CalibrationMethod
from torch import nn

from export.benchmark import benchmark
from export.convert import export_onnx, export_torchscript
from export.data import load_images
from export.metadata import base_metadata, embed_onnx_metadata, write_sidecar
from export.package import archive, write_index_to_name, write_model_config
from export.quantize import preprocess, quantize_int8_dynamic, quantize_int8_static
from export.report import busy_warning, cpu_name, markdown_table, write_report
from export.runtime import Runner, load_runner, torch_runner
from export.variants import MODEL_PREFIX, ONNX_VARIANTS, VARIANTS, artifact_name, model_name
from export.verify import ArtifactRejected, accuracy, compare, predict, rejection_reason
from training.checkpoint import file_sha256, load_checkpoint
from training.data import DATA_ENV, default_data_dir

DEFAULT_CHECKPOINT = "training/release/resnet18_cifar10.pt"
DEFAULT_HANDLER = "handlers/cifar10_handler.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"default: {DEFAULT_CHECKPOINT}")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help=f"directory holding cifar-10-batches-py (default: ${DATA_ENV} or ./data)")
    parser.add_argument("--output-dir", default="build/export", help="artifacts and their JSON (default: build/export)")
    parser.add_argument("--model-store", default="model_store", help=".mar files go here (default: model_store)")
    parser.add_argument("--report-dir", default="docs", help="EXPORT.md and export.json go here (default: docs)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to export, verify and pack (default: all)")
    parser.add_argument("--default-variant", choices=VARIANTS, default="onnx_int8_static",
                        help=f"variant packed as {MODEL_PREFIX}.mar (default: onnx_int8_static)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and onnxruntime intra-op threads for verification and timing (default: 2)")

    check = parser.add_argument_group("verification")
    check.add_argument("--test-subset", type=int, help="use the first N test images only (default: all 10,000)")
    check.add_argument("--parity-images", type=int, default=1000,
                       help="test images over which max |logit diff| is taken (default: 1000)")
    check.add_argument("--fp32-tolerance", type=float, default=1e-4,
                       help="max |logit diff| allowed for fp32 variants (default: 1e-4)")
    check.add_argument("--max-loss-dynamic", type=float, default=1.0,
                       help="accuracy points dynamic INT8 may lose vs the checkpoint (default: 1.0)")
    check.add_argument("--max-loss-static", type=float, default=0.5,
                       help="accuracy points static INT8 may lose vs the checkpoint (default: 0.5)")
    check.add_argument("--eval-batch-size", type=int, default=250)
    check.add_argument("--latency-runs", type=int, default=100, help="batch-1 runs timed (default: 100)")
    check.add_argument("--throughput-runs", type=int, default=10, help="batch-64 runs timed (default: 10)")

    quant = parser.add_argument_group("static quantization")
    quant.add_argument("--calibration-images", type=int, default=512,
                       help="first N training images used for calibration (default: 512)")
    quant.add_argument("--calibration-method", choices=[m.name for m in CalibrationMethod], default="MinMax")

    pack = parser.add_argument_group("packing")
    pack.add_argument("--handler", default=DEFAULT_HANDLER, help=f"TorchServe handler (default: {DEFAULT_HANDLER})")
    pack.add_argument("--model-version", default="1.0")
    pack.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (default: 8)")
    pack.add_argument("--max-batch-delay", type=int, default=10, help="TorchServe maxBatchDelay in ms (default: 10)")
    pack.add_argument("--worker-threads", type=int, default=1,
                      help="intra-op threads of each TorchServe worker, model-config handler.threads (default: 1)")
    return parser


def build_artifacts(model: nn.Module, variants: list[str], output_dir: Path, scratch: Path,
                    args: argparse.Namespace) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Write each selected variant; returns its path and the export fields of its metadata.

    The INT8 variants are quantized from the fp32 ONNX model, which goes to ``scratch`` when the
    fp32 variant itself was not selected.
    """
    built: dict[str, tuple[Path, dict[str, Any]]] = {}
    if "torchscript" in variants:
        path = output_dir / artifact_name("torchscript")
        print(f"exporting {path}", flush=True)
        built["torchscript"] = (path, {"format": "torchscript", "exporter": export_torchscript(model, path)})
    if not set(variants) & set(ONNX_VARIANTS):
        return built
    fp32 = (output_dir if "onnx" in variants else scratch) / artifact_name("onnx")
    print(f"exporting {fp32}", flush=True)
    onnx_fields = {"format": "onnx", "exporter": export_onnx(model, fp32)}
    if "onnx" in variants:
        built["onnx"] = (fp32, onnx_fields)
    if not {"onnx_int8_dynamic", "onnx_int8_static"} & set(variants):
        return built
    preprocessed = scratch / "preprocessed.onnx"
    preprocess(fp32, preprocessed)
    if "onnx_int8_dynamic" in variants:
        path = output_dir / artifact_name("onnx_int8_dynamic")
        print(f"quantizing {path}", flush=True)
        built["onnx_int8_dynamic"] = (path, {**onnx_fields, "quantization": quantize_int8_dynamic(preprocessed, path)})
    if "onnx_int8_static" in variants:
        path = output_dir / artifact_name("onnx_int8_static")
        print(f"calibrating and quantizing {path}", flush=True)
        calibration, _ = load_images(args.data_dir, train=True, subset=args.calibration_images)
        settings = quantize_int8_static(preprocessed, path, calibration, args.calibration_method)
        built["onnx_int8_static"] = (path, {**onnx_fields, "quantization": settings})
    return built


@dataclass
class Reference:
    """The test images and the checkpoint's fp32 logits on them: what every artifact is held to."""

    images: np.ndarray
    labels: np.ndarray
    logits: np.ndarray

    @property
    def accuracy(self) -> float:
        return accuracy(self.logits, self.labels)


def table_row(variant: str, path: Path, result: dict[str, Any], speed: dict[str, Any], status: str,
              reason: str | None = None) -> dict[str, Any]:
    return {"variant": variant, "file": str(path), "size_mb": path.stat().st_size / 2**20,
            **{key: result[key] for key in ("accuracy", "top1_agreement", "max_abs_diff")},
            **{key: speed[key] for key in ("latency_b1_ms", "images_per_s_b64")}, "status": status, "reason": reason}


def measure(runner: Runner, variant: str, reference: Reference,
            args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    logits = predict(runner, reference.images, args.eval_batch_size, variant)
    result = compare(logits, reference.logits, reference.labels, args.parity_images)
    return result, benchmark(runner, reference.images, args.latency_runs, args.throughput_runs)


def verify(variant: str, path: Path, metadata: dict[str, Any], reference: Reference, limit: float,
           args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Run, judge and time one artifact; write its JSON description and return it with the report row."""
    result, speed = measure(load_runner(path, args.threads), variant, reference, args)
    reason = rejection_reason(variant, result, reference.accuracy, limit)
    verification = {**result, "reference_accuracy": reference.accuracy, "limit": limit,
                    "accepted": reason is None, "rejection_reason": reason}
    sidecar = write_sidecar(path, {**metadata, "file_sha256": file_sha256(path), "verification": verification,
                                   "benchmark": {**speed, "threads": args.threads}})
    print(f"{variant}: {'accepted' if reason is None else 'REJECTED, ' + reason}", flush=True)
    return sidecar, table_row(variant, path, result, speed, "accepted" if reason is None else "rejected", reason)


def pack(artifacts: dict[str, tuple[Path, Path]], classes: list[str], args: argparse.Namespace) -> list[Path]:
    """One archive per variant, plus the default model; each holds its artifact, its JSON and index_to_name.json."""
    output_dir = Path(args.output_dir)
    config = write_model_config(output_dir / "model-config.yaml", args.batch_size, args.max_batch_delay,
                                args.worker_threads)
    index = write_index_to_name(output_dir / "index_to_name.json", classes)
    targets = [(model_name(variant), variant) for variant in artifacts] + [(MODEL_PREFIX, args.default_variant)]
    archives = []
    for name, variant in targets:
        artifact, sidecar = artifacts[variant]
        print(f"packing {name}.mar from {artifact.name}", flush=True)
        archives.append(archive(name, artifact, [sidecar, index], Path(args.handler), config, args.model_version,
                                Path(args.model_store)))
    return archives


def run_report(argv: list[str], args: argparse.Namespace, common: dict[str, Any], reference: Reference,
               rows: list[dict[str, Any]], load_average: list[float], busy_percent: float) -> dict[str, Any]:
    """Everything docs/EXPORT.md and docs/export.json state about this run, except the archives and duration."""
    return {
        "command": shlex.join(["python", "-m", "export", *argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": args.threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average": load_average,
        "cpu_busy_percent_at_start": busy_percent,
        "versions": f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}",
        "checkpoint": args.checkpoint, "checkpoint_sha256": common["checkpoint_sha256"],
        "checkpoint_test_accuracy": common["checkpoint_test_accuracy"],
        "checkpoint_test_images": common["checkpoint_test_images"],
        "reference": {"accuracy": reference.accuracy, "test_images": len(reference.labels)},
        "parity_images": min(args.parity_images, len(reference.labels)),
        "latency_runs": args.latency_runs, "throughput_runs": args.throughput_runs,
        "limits": {"fp32_tolerance": args.fp32_tolerance, "max_loss_dynamic": args.max_loss_dynamic,
                   "max_loss_static": args.max_loss_static},
        "packing": {"handler": args.handler, "model_version": args.model_version, "batch_size": args.batch_size,
                    "max_batch_delay_ms": args.max_batch_delay, "worker_threads": args.worker_threads,
                    "default_variant": args.default_variant},
        "rows": rows, "archives": [],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parser.parse_args(argv)
    variants = [variant for variant in VARIANTS if variant in args.variants]
    if args.default_variant not in variants:
        parser.error(f"--default-variant {args.default_variant} is not among --variants {' '.join(variants)}")
    if not Path(args.handler).is_file():
        parser.error(f"handler {args.handler} not found (run from the repository root or pass --handler)")
    # what else uses the CPU right now (the load average lags by minutes, so it is only reported)
    busy_percent = psutil.cpu_percent(interval=1.0)
    started, load_average = time.perf_counter(), [round(load, 2) for load in os.getloadavg()]
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    checkpoint = Path(args.checkpoint)
    model, checkpoint_metadata = load_checkpoint(checkpoint)
    common = base_metadata(checkpoint, checkpoint_metadata)
    images, labels = load_images(args.data_dir, train=False, subset=args.test_subset)
    reference_runner = torch_runner(model)
    reference = Reference(images, labels, predict(reference_runner, images, args.eval_batch_size, "checkpoint"))
    print(f"checkpoint {checkpoint}: fp32 accuracy {100 * reference.accuracy:.2f}% on {len(labels)} test images",
          flush=True)
    baseline = measure(reference_runner, "checkpoint", reference, args)
    rows = [table_row("checkpoint (PyTorch eager)", checkpoint, *baseline, "reference")]

    with tempfile.TemporaryDirectory() as scratch:
        built = build_artifacts(model, variants, output_dir, Path(scratch), args)
    limits = {"torchscript": args.fp32_tolerance, "onnx": args.fp32_tolerance,
              "onnx_int8_dynamic": args.max_loss_dynamic, "onnx_int8_static": args.max_loss_static}
    artifacts: dict[str, tuple[Path, Path]] = {}
    for variant, (path, fields) in built.items():
        metadata = {"variant": variant, "file": path.name, **common, **fields}
        if fields["format"] == "onnx":
            metadata = embed_onnx_metadata(path, metadata)
        sidecar, row = verify(variant, path, metadata, reference, limits[variant], args)
        artifacts[variant] = (path, sidecar)
        rows.append(row)

    report = run_report(argv, args, common, reference, rows, load_average, busy_percent)
    if busy_warning(report):
        print(f"warning: {busy_warning(report)}", flush=True)
    rejected = [row for row in rows if row["status"] == "rejected"]
    if not rejected:
        report["archives"] = [str(path) for path in pack(artifacts, common["classes"], args)]
    report["export_seconds"] = round(time.perf_counter() - started, 1)
    markdown, data = write_report(Path(args.report_dir), report)
    print("\n" + markdown_table(rows) + "\n", flush=True)
    if rejected:
        raise ArtifactRejected(
            "; ".join(f"{row['variant']}: {row['reason']}" for row in rejected)
            + f". Nothing was packed, {args.model_store} is as it was (report: {markdown}). "
            "Drop the variant with --variants or change its limit."
        )
    print("\n".join([*report["archives"], f"report: {markdown}, {data}",
                     f"export took {report['export_seconds']:.0f} s"]), flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except ArtifactRejected as err:
        raise SystemExit(f"export rejected: {err}") from None
