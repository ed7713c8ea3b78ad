"""Export a checkpoint for TorchServe: ``python -m export --checkpoint training/release/resnet18_cifar10.pt``.

Writes into --output-dir the TorchScript, ONNX fp32, ONNX dynamic-INT8 and ONNX static-INT8 (QDQ)
variants, each with a JSON description beside it (and the same description in ONNX metadata_props).
Each is run on real CIFAR-10 test images (all of them, or a fixed stratified subset with
--verify-images) against the checkpoint's fp32 PyTorch model; an fp32 export is also run on the
whole test set, whose accuracy must match the one recorded in the checkpoint. --benchmark adds CPU
latency and throughput. The table goes to --report-dir (EXPORT.md, export.json). Only if every
selected variant is accepted are they packed with torch-model-archiver, as cifar10_<variant>.mar
plus cifar10.mar from --default-variant, into a new model store that replaces --model-store in one
step (archives of variants not selected are kept). A rejection or a failure exits non-zero and
leaves the model store as it was. Method: docs/EXPORT_METHOD.md.
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
from export.data import load_images, stratified_indices
from export.metadata import base_metadata, embed_onnx_metadata, write_sidecar
from export.package import archive, write_index_to_name, write_model_config
from export.quantize import preprocess, quantize_int8_dynamic, quantize_int8_static
from export.report import busy_warning, cpu_name, markdown_table, write_report
from export.runtime import Runner, load_runner, torch_runner
from export.store import export_key, is_current, replacing, write_stamp
from export.variants import FP32_VARIANTS, MODEL_PREFIX, ONNX_VARIANTS, VARIANTS, artifact_name, model_name
from export.verify import ArtifactRejected, accuracy, compare, floor_reason, predict, rejection_reason
from training.checkpoint import file_sha256, load_checkpoint
from training.data import DATA_ENV, default_data_dir

DEFAULT_CHECKPOINT = "training/release/resnet18_cifar10.pt"
DEFAULT_HANDLER = "handlers/cifar10_handler.py"


def image_count(value: str) -> int | None:
    """``all`` (None) or a positive number of test images."""
    if value == "all":
        return None
    count = int(value)
    if count < 10:
        raise argparse.ArgumentTypeError("need at least one image per class (10), or 'all'")
    return count


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"default: {DEFAULT_CHECKPOINT}")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help=f"directory holding cifar-10-batches-py (default: ${DATA_ENV} or ./data)")
    parser.add_argument("--output-dir", default="build/export", help="artifacts and their JSON (default: build/export)")
    parser.add_argument("--model-store", default="model_store", help=".mar files go here (default: model_store)")
    parser.add_argument("--report-dir", default="build/export",
                        help="EXPORT.md and export.json go here (default: build/export; `make docs` writes docs/)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to export, verify and pack (default: all)")
    parser.add_argument("--default-variant", choices=VARIANTS, default="onnx_int8_static",
                        help=f"variant packed as {MODEL_PREFIX}.mar (default: onnx_int8_static)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and onnxruntime intra-op threads for verification and timing (default: 2)")

    parser.add_argument("--skip-if-current", action="store_true",
                        help="do nothing if --model-store already holds these archives, built from this checkpoint, "
                             "these sources and settings and verified on at least as many images")

    check = parser.add_argument_group("verification")
    check.add_argument("--verify-images", type=image_count, default=None, metavar="N|all",
                       help="verify every variant on a fixed stratified subset of N test images (N/10 per class) "
                            "instead of all 10,000; the fp32 accuracy floor always uses all (default: all)")
    check.add_argument("--parity-images", type=int, default=1000,
                       help="verified images over which max |logit diff| is taken (default: 1000)")
    check.add_argument("--fp32-tolerance", type=float, default=1e-4,
                       help="max |logit diff| allowed for fp32 variants (default: 1e-4)")
    check.add_argument("--max-loss-dynamic", type=float, default=1.0,
                       help="accuracy points dynamic INT8 may lose vs the checkpoint (default: 1.0)")
    check.add_argument("--max-loss-static", type=float, default=0.5,
                       help="accuracy points static INT8 may lose vs the checkpoint (default: 0.5)")
    check.add_argument("--min-agreement", type=float, default=99.0,
                       help="percent of INT8 top-1 predictions that must equal the checkpoint's (default: 99.0)")
    check.add_argument("--max-accuracy-gap", type=float, default=0.1,
                       help="points the fp32 accuracy on the full test set may differ from the accuracy recorded "
                            "in the checkpoint (default: 0.1)")
    check.add_argument("--eval-batch-size", type=int, default=32,
                       help="images per verification batch (default: 32; faster on CPU than larger batches, whose "
                            "activations outgrow the caches, and closer to the served batch for dynamic INT8)")
    check.add_argument("--benchmark", action="store_true",
                       help="also time every variant on the CPU (batch-1 latency, batch-64 throughput)")
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
                    args: argparse.Namespace) -> tuple[dict[str, tuple[Path, dict[str, Any]]], Path | None]:
    """Write each selected variant; returns its path and the export fields of its metadata, and the fp32 ONNX file.

    The INT8 variants are quantized from the fp32 ONNX model, which goes to ``scratch`` when the
    fp32 variant itself was not selected.
    """
    built: dict[str, tuple[Path, dict[str, Any]]] = {}
    if "torchscript" in variants:
        path = output_dir / artifact_name("torchscript")
        print(f"exporting {path}", flush=True)
        built["torchscript"] = (path, {"format": "torchscript", "exporter": export_torchscript(model, path)})
    if not set(variants) & set(ONNX_VARIANTS):
        return built, None
    fp32 = (output_dir if "onnx" in variants else scratch) / artifact_name("onnx")
    print(f"exporting {fp32}", flush=True)
    onnx_fields = {"format": "onnx", "exporter": export_onnx(model, fp32)}
    if "onnx" in variants:
        built["onnx"] = (fp32, onnx_fields)
    if not {"onnx_int8_dynamic", "onnx_int8_static"} & set(variants):
        return built, fp32
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
    return built, fp32


@dataclass
class Reference:
    """The verified test images and the checkpoint's fp32 logits on them: what every artifact is held to."""

    indices: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    logits: np.ndarray

    @property
    def accuracy(self) -> float:
        return accuracy(self.logits, self.labels)


def table_row(variant: str, path: Path, result: dict[str, Any], speed: dict[str, Any] | None, status: str,
              reason: str | None = None) -> dict[str, Any]:
    speed = speed or {}
    return {"variant": variant, "file": str(path), "size_mb": path.stat().st_size / 2**20,
            **{key: result[key] for key in ("accuracy", "top1_agreement", "max_abs_diff")},
            **{key: speed.get(key) for key in ("latency_b1_ms", "images_per_s_b64")}, "status": status,
            "reason": reason}


def timing(runner: Runner, reference: Reference, args: argparse.Namespace) -> dict[str, Any] | None:
    return benchmark(runner, reference.images, args.latency_runs, args.throughput_runs) if args.benchmark else None


def check_floor(variant: str, path: Path, reference: Reference, images: np.ndarray, labels: np.ndarray,
                checkpoint_metadata: dict[str, Any], args: argparse.Namespace,
                verified_logits: np.ndarray | None) -> dict[str, Any]:
    """Run one fp32 export on the whole test set: its accuracy must match the checkpoint's recorded one.

    It runs only once every variant passed on the verified images, so a refusal does not wait for it.
    The fp32 ONNX model is used where it exists (the fastest fp32 runtime here), else TorchScript; its
    logits on the verified images must also match the checkpoint's, so that it speaks for the checkpoint.
    ``verified_logits``: its logits from verification, reused when those covered the whole test set.
    """
    logits = (verified_logits if verified_logits is not None and len(reference.labels) == len(labels) else
              predict(load_runner(path, args.threads), images, args.eval_batch_size, f"{variant} (all test images)"))
    measured = accuracy(logits, labels)
    parity = compare(logits[reference.indices], reference.logits, reference.labels, args.parity_images)
    reason = (None if parity["max_abs_diff"] <= args.fp32_tolerance else
              f"the fp32 {variant} model differs from the checkpoint (max |logit diff| {parity['max_abs_diff']:.3g})")
    reason = reason or floor_reason(measured, len(labels), checkpoint_metadata.get("test_accuracy"),
                                    checkpoint_metadata.get("test_images"), args.max_accuracy_gap)
    floor = {"model": variant, "accuracy": measured, "test_images": len(labels),
             "recorded_accuracy": checkpoint_metadata.get("test_accuracy"),
             "recorded_test_images": checkpoint_metadata.get("test_images"), "max_points": args.max_accuracy_gap,
             "max_abs_diff": parity["max_abs_diff"], "passed": reason is None, "reason": reason}
    print(f"accuracy floor ({variant} on {len(labels)} test images, {100 * measured:.2f}%): "
          f"{'passed' if reason is None else 'FAILED, ' + reason}", flush=True)
    return floor


def verify(variant: str, path: Path, metadata: dict[str, Any], reference: Reference, limit: float,
           args: argparse.Namespace) -> tuple[Path, dict[str, Any], np.ndarray]:
    """Run, judge (and with --benchmark time) one artifact; write its JSON description and return it with
    the report row and the artifact's logits on the verified images."""
    runner = load_runner(path, args.threads)
    logits = predict(runner, reference.images, args.eval_batch_size, variant)
    result = compare(logits, reference.logits, reference.labels, args.parity_images)
    reason = rejection_reason(variant, result, reference.accuracy, limit, args.min_agreement / 100)
    verification = {**result, "reference_accuracy": reference.accuracy, "limit": limit,
                    "min_agreement": None if variant in FP32_VARIANTS else args.min_agreement / 100,
                    "accepted": reason is None, "rejection_reason": reason}
    speed = timing(runner, reference, args)
    sidecar = write_sidecar(path, {**metadata, "file_sha256": file_sha256(path), "verification": verification,
                                   **({"benchmark": {**speed, "threads": args.threads}} if speed else {})})
    print(f"{variant}: {'accepted' if reason is None else 'REJECTED, ' + reason}", flush=True)
    return sidecar, table_row(variant, path, result, speed, "accepted" if reason is None else "rejected",
                              reason), logits


def pack(artifacts: dict[str, tuple[Path, Path]], classes: list[str], store: Path,
         args: argparse.Namespace) -> list[str]:
    """One archive per variant, plus the default model; each holds its artifact, its JSON and index_to_name.json."""
    output_dir = Path(args.output_dir)
    config = write_model_config(output_dir / "model-config.yaml", args.batch_size, args.max_batch_delay,
                                args.worker_threads)
    index = write_index_to_name(output_dir / "index_to_name.json", classes)
    targets = [(model_name(variant), variant) for variant in artifacts] + [(MODEL_PREFIX, args.default_variant)]
    for name, variant in targets:
        artifact, sidecar = artifacts[variant]
        print(f"packing {name}.mar from {artifact.name}", flush=True)
        archive(name, artifact, [sidecar, index], Path(args.handler), config, args.model_version, store)
    return [name for name, _ in targets]


def archive_key(args: argparse.Namespace) -> str:
    """The export key (export/store.py) of the checkpoint, sources and the settings that decide what an
    archive holds or whether it is accepted."""
    settings = {name: getattr(args, name) for name in (
        "calibration_images", "calibration_method", "model_version", "batch_size", "max_batch_delay",
        "worker_threads", "default_variant", "fp32_tolerance", "max_loss_dynamic", "max_loss_static",
        "min_agreement", "max_accuracy_gap", "parity_images", "eval_batch_size")}
    return export_key(file_sha256(args.checkpoint), Path(args.handler), settings)


def run_report(argv: list[str], args: argparse.Namespace, common: dict[str, Any], reference: Reference,
               rows: list[dict[str, Any]], floor: dict[str, Any] | None, load_average: list[float],
               busy_percent: float | None) -> dict[str, Any]:
    """Everything EXPORT.md and export.json state about this run, except the archives and duration."""
    return {
        "command": shlex.join(["python", "-m", "export", *argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": args.threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average": load_average,
        "cpu_busy_percent_at_start": busy_percent,
        "versions": f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}",
        "checkpoint": args.checkpoint, "checkpoint_sha256": common["checkpoint_sha256"],
        "checkpoint_test_accuracy": common["checkpoint_test_accuracy"],
        "checkpoint_test_images": common["checkpoint_test_images"],
        "reference": {"accuracy": reference.accuracy, "test_images": len(reference.labels),
                      "stratified_subset": args.verify_images is not None},
        "floor": floor,
        "parity_images": min(args.parity_images, len(reference.labels)),
        "benchmark": {"latency_runs": args.latency_runs, "throughput_runs": args.throughput_runs}
        if args.benchmark else None,
        "limits": {"fp32_tolerance": args.fp32_tolerance, "max_loss_dynamic": args.max_loss_dynamic,
                   "max_loss_static": args.max_loss_static, "min_agreement": args.min_agreement,
                   "max_accuracy_gap": args.max_accuracy_gap},
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
    checkpoint, store = Path(args.checkpoint), Path(args.model_store)
    names = [model_name(variant) for variant in variants] + [MODEL_PREFIX]
    key = archive_key(args)
    if args.skip_if_current and is_current(store, names, key, args.verify_images):
        print(f"{store} is current: built from {checkpoint} with these sources and settings, and verified "
              f"on {'all' if args.verify_images is None else 'at least ' + str(args.verify_images)} test images.",
              flush=True)
        return {"skipped": True, "key": key}
    # what else uses the CPU right now, which matters for timings (the load average lags by minutes)
    busy_percent = psutil.cpu_percent(interval=1.0) if args.benchmark else None
    started, load_average = time.perf_counter(), [round(load, 2) for load in os.getloadavg()]
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model, checkpoint_metadata = load_checkpoint(checkpoint)
    common = base_metadata(checkpoint, checkpoint_metadata)
    images, labels = load_images(args.data_dir, train=False)
    indices = stratified_indices(labels, args.verify_images)
    reference_runner = torch_runner(model)
    reference = Reference(indices, images[indices], labels[indices],
                          predict(reference_runner, images[indices], args.eval_batch_size, "checkpoint"))
    print(f"checkpoint {checkpoint}: fp32 accuracy {100 * reference.accuracy:.2f}% on {len(indices)} "
          f"{'(stratified subset) ' if len(indices) < len(labels) else ''}test images", flush=True)
    reference_result = compare(reference.logits, reference.logits, reference.labels, args.parity_images)
    rows = [table_row("checkpoint (PyTorch eager)", checkpoint, reference_result,
                      timing(reference_runner, reference, args), "reference")]

    limits = {"torchscript": args.fp32_tolerance, "onnx": args.fp32_tolerance,
              "onnx_int8_dynamic": args.max_loss_dynamic, "onnx_int8_static": args.max_loss_static}
    artifacts: dict[str, tuple[Path, Path]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        built, fp32_onnx = build_artifacts(model, variants, output_dir, Path(scratch), args)
        described = {}  # metadata goes in first, so that the verified bytes are the packed bytes
        for variant, (path, fields) in built.items():
            metadata = {"variant": variant, "file": path.name, **common, **fields}
            described[variant] = embed_onnx_metadata(path, metadata) if fields["format"] == "onnx" else metadata
        verified_logits = {}
        for variant, (path, _) in built.items():
            sidecar, row, verified_logits[variant] = verify(variant, path, described[variant], reference,
                                                            limits[variant], args)
            artifacts[variant] = (path, sidecar)
            rows.append(row)
        floor_variant, floor_path = ("onnx", fp32_onnx) if fp32_onnx else ("torchscript", built["torchscript"][0])
        floor = (None if any(row["status"] == "rejected" for row in rows) else
                 check_floor(floor_variant, floor_path, reference, images, labels, checkpoint_metadata, args,
                             verified_logits.get(floor_variant)))

    report = run_report(argv, args, common, reference, rows, floor, load_average, busy_percent)
    if busy_warning(report):
        print(f"warning: {busy_warning(report)}", flush=True)
    refusals = [f"{row['variant']}: {row['reason']}" for row in rows if row["status"] == "rejected"]
    refusals += [f"accuracy floor: {floor['reason']}"] if floor and not floor["passed"] else []
    if not refusals:
        entries = {name: {"key": key, "checkpoint_sha256": common["checkpoint_sha256"],
                          "verified_images": len(indices), "test_images": len(labels)} for name in names}
        with replacing(store, names) as staging:
            pack(artifacts, common["classes"], staging, args)
            write_stamp(staging, store, entries)
        report["archives"] = [str(store / f"{name}.mar") for name in names]
    report["export_seconds"] = round(time.perf_counter() - started, 1)
    markdown, data = write_report(Path(args.report_dir), report)
    print("\n" + markdown_table(rows) + "\n", flush=True)
    if refusals:
        raise ArtifactRejected("; ".join(refusals) + f". Nothing was packed, {store} is as it was "
                               f"(report: {markdown}).")
    print("\n".join([*report["archives"], f"report: {markdown}, {data}",
                     f"export took {report['export_seconds']:.0f} s"]), flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except ArtifactRejected as err:
        raise SystemExit(f"export rejected: {err}") from None
